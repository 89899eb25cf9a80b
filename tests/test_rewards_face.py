"""Face identity on scikit-image's astronaut portrait (skipped cleanly without the `face` extra)."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from qirl.errors import UserError
from qirl.rewards.base import RewardRecord, build_reward
from qirl.rewards.face import INSTALL_HINT, FaceIdentityReward, similarity


def test_similarity_mapping():
    assert similarity(0.0) == 1.0
    assert similarity(0.6) == pytest.approx(0.5)  # dlib's same-person threshold
    assert similarity(1.2) == 0.0 and similarity(3.0) == 0.0
    assert similarity(0.1) > similarity(0.3) > similarity(0.5)


def test_missing_dlib_is_a_user_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "dlib", None)  # makes `import dlib` raise ImportError
    with pytest.raises(UserError, match=r"pip install qirl\[face\]"):
        FaceIdentityReward()
    assert INSTALL_HINT == "pip install qirl[face]"


def tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / 255  # [3, H, W]


@pytest.fixture(scope="module")
def reward() -> FaceIdentityReward:
    pytest.importorskip("dlib")  # the tests below need the `face` extra; the two above do not
    return build_reward("face_identity")


@pytest.fixture(scope="module")
def skdata():
    return pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def astronaut(skdata) -> np.ndarray:
    return skdata.astronaut()  # [512, 512, 3] uint8, one face


def test_identity_kept_by_brightness_lowered_by_distortion(reward, astronaut, skdata):
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    a = astronaut.astype(np.float64)
    edits = {
        "same": astronaut,
        "brighter": np.clip(a * 1.2 + 10, 0, 255).astype(np.uint8),
        "blurred": ndimage.gaussian_filter(a, (3, 3, 0)).astype(np.uint8),
        "noise": np.clip(a + rng.normal(0, 60, a.shape), 0, 255).astype(np.uint8),
        "cat": skdata.chelsea()[:300, :300],  # a different image: no human face at all
    }
    src = tensor(astronaut)
    # every edit cropped to one 300x300 window around the face, so they batch together
    images = torch.stack(
        [tensor(edits[n])[:, :300, 100:400] if n != "cat" else tensor(edits[n]) for n in edits]
    )
    records = [RewardRecord(task="edit", source=src)] * len(edits)
    scores = dict(zip(edits, reward(images, list(edits), records).tolist(), strict=True))
    print({k: round(v, 3) for k, v in scores.items()})
    assert scores["same"] > 0.95, scores
    assert scores["brighter"] > 0.8, scores
    assert scores["blurred"] < scores["brighter"] - 0.15, scores
    assert scores["noise"] == 0.0 and scores["cat"] == 0.0, scores  # the face is lost -> 0


def test_no_face_in_source_or_not_an_edit_is_nan(reward, astronaut, skdata):
    cat = tensor(skdata.chelsea())  # [3, 300, 451]
    face = tensor(astronaut)
    images = torch.stack([face, face, face])
    records = [
        RewardRecord(task="edit", source=cat),  # no face in the source: N/A
        RewardRecord(task="t2i"),  # not an edit
        RewardRecord(task="edit", source=None),
    ]
    assert torch.isnan(reward(images, ["p"] * 3, records)).all()


def test_sources_are_cached_and_any_size_is_accepted(reward, astronaut):
    src = tensor(astronaut)
    small = torch.nn.functional.interpolate(src[None], size=(384, 384), mode="bilinear", antialias=True)
    out = reward(small.expand(2, -1, -1, -1), ["p", "q"], [RewardRecord(task="edit", source=src)] * 2)
    assert out[0] == out[1] and out[0] > 0.8 and not math.isnan(out[0])
    assert len(reward._cache) >= 1
