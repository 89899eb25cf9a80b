"""Face-identity consistency for portrait edits: is the person in the edit the person in the source?

The report's edit reward includes identity preservation for real portraits; this is its classical,
non-VLM form, built on dlib (optional extra: `pip install qirl[face]`):

1. detect faces with dlib's HOG + linear-SVM frontal detector (`upsample` pyramid doublings, so faces
   down to ~40 px at the default 1) and keep the largest box: the portrait's subject;
2. find the 5 (default) or 68 landmarks with dlib's shape predictor and align the face to a
   150x150 chip (`dlib.get_face_chip`, padding 0.25: the alignment the network was trained with);
3. embed the chip with dlib's ResNet-29 face-recognition network (128-d; the model file ships in the
   `face-recognition-models` package);
4. map the Euclidean distance d between the source and edit embeddings to a similarity in [0, 1]:

       sim = clip(1 - d / 1.2, 0, 1)

   dlib's network is trained so that d < 0.6 means "same person" (99.38 % on LFW at that threshold),
   so the threshold maps to 0.5, the same photo to 1, and d >= 1.2 (far beyond any match; different
   people sit around 0.8-1.0) to 0. A linear map rather than a logistic around 0.6: a logistic
   saturates within a few hundredths of the threshold, and GRPO normalises rewards per group, so it
   needs the ordering of small identity drifts (d = 0.1 vs 0.3), which a logistic flattens to ~1.

Rows: a T2I row, an edit without a source, or a source with no detectable face -> NaN (not applicable,
dropped from the group statistics); a face in the source but none in the edit -> 0 (the edit lost the
person). On the astronaut photo (`skimage.data.astronaut()`, 512 px): +20 % brightness scores 0.89,
a Gaussian blur of sigma 3 px 0.62, heavy noise (sigma 60/255) loses the face: 0.

Cost: ~0.19 s per 512x512 image on one CPU core, nearly all of it HOG detection (it grows with the
pixel count and 4x per `upsample`); source embeddings are cached (LRU keyed by the 8-bit pixels), so a
GRPO group of G edits of one source pays for that source once. dlib's network is not thread-safe: calls
into it are serialised by a lock.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from qirl.errors import UserError
from qirl.rewards.base import RewardModel, RewardRecord, register_reward
from qirl.rewards.codec import to_uint8_hwc

INSTALL_HINT = "pip install qirl[face]"
SAME_PERSON_DISTANCE = 0.6  # dlib's threshold for its 128-d embeddings
ZERO_SIMILARITY_DISTANCE = 2 * SAME_PERSON_DISTANCE
_LANDMARK_FILES = {5: "shape_predictor_5_face_landmarks.dat", 68: "shape_predictor_68_face_landmarks.dat"}
_RECOGNITION_FILE = "dlib_face_recognition_resnet_model_v1.dat"


def similarity(distance: float) -> float:
    """Embedding distance -> identity similarity in [0, 1]: `clip(1 - d / 1.2, 0, 1)` (module doc)."""
    return float(min(1.0, max(0.0, 1.0 - distance / ZERO_SIMILARITY_DISTANCE)))


def _import_dlib() -> Any:
    try:
        import dlib
    except ImportError:
        raise UserError(f"the face_identity reward needs dlib: {INSTALL_HINT}") from None
    return dlib


def models_dir() -> Path:
    """The folder of dlib model files shipped by the `face-recognition-models` package.

    Found without importing the package: its `__init__` imports `pkg_resources`, which setuptools
    >= 81 no longer provides, so `face_recognition_models.face_recognition_model_location()` fails on
    current environments while the files themselves are intact.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the face_identity reward needs the face-recognition-models package: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


class FaceIdentityReward(RewardModel):
    """Identity similarity of the largest face in the edit to the largest face in the source."""

    name = "face_identity"
    tasks = ("edit",)

    def __init__(
        self,
        landmarks: int = 5,
        upsample: int = 1,
        num_jitters: int = 0,
        model_dir: str | Path | None = None,
        cache_size: int = 256,
    ) -> None:
        if landmarks not in _LANDMARK_FILES:
            raise UserError(f"face_identity: landmarks must be 5 or 68, got {landmarks}")
        if upsample < 0 or num_jitters < 0:
            raise UserError("face_identity: upsample and num_jitters must be >= 0")
        dlib = _import_dlib()
        folder = Path(model_dir) if model_dir is not None else models_dir()
        paths = [folder / _LANDMARK_FILES[landmarks], folder / _RECOGNITION_FILE]
        for path in paths:
            if not path.is_file():
                raise UserError(f"face_identity: model file {path} not found ({INSTALL_HINT})")
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(paths[0]))
        self._net = dlib.face_recognition_model_v1(str(paths[1]))
        self._dlib = dlib
        self.upsample, self.num_jitters, self.cache_size = upsample, num_jitters, cache_size
        self._cache: OrderedDict[bytes, np.ndarray | None] = OrderedDict()
        self._lock = threading.Lock()

    def embed(self, image: np.ndarray) -> np.ndarray | None:
        """`[H, W, 3]` uint8 -> the 128-d embedding of its largest face, or None if it has none."""
        return self._embed_many([image])[0]

    def _embed_many(self, images: Sequence[np.ndarray]) -> list[np.ndarray | None]:
        with self._lock:
            chips, where = [], []
            for i, img in enumerate(images):
                boxes = self._detector(img, self.upsample)
                if len(boxes) == 0:
                    continue
                box = max(boxes, key=lambda r: r.area())
                shape = self._predictor(img, box)
                chips.append(self._dlib.get_face_chip(img, shape, size=150, padding=0.25))
                where.append(i)
            out: list[np.ndarray | None] = [None] * len(images)
            if chips:
                vecs = self._net.compute_face_descriptor(chips, self.num_jitters)  # batched, [F][128]
                for i, vec in zip(where, vecs, strict=True):
                    out[i] = np.asarray(vec, dtype=np.float64)
        return out

    def _source_embedding(self, image: np.ndarray) -> np.ndarray | None:
        digest = hashlib.blake2b(str(image.shape).encode(), digest_size=16)
        digest.update(image.tobytes())
        key = digest.digest()
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        emb = self.embed(image)
        with self._lock:
            self._cache[key] = emb
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return emb

    def score(self, images: Tensor, prompts: Sequence[str], records: Sequence[RewardRecord]) -> Tensor:
        out = torch.full((images.shape[0],), math.nan, dtype=torch.float32)  # [B]
        refs: dict[int, np.ndarray] = {}
        for i, rec in enumerate(records):
            if rec.task not in self.tasks or rec.source is None:
                continue
            ref = self._source_embedding(to_uint8_hwc(rec.source))
            if ref is not None:
                refs[i] = ref
        rows = sorted(refs)
        embs = self._embed_many([to_uint8_hwc(images[i]) for i in rows])
        for i, emb in zip(rows, embs, strict=True):
            out[i] = 0.0 if emb is None else similarity(float(np.linalg.norm(emb - refs[i])))
        return out


@register_reward("face_identity")
def _build_face_identity(**kwargs: Any) -> FaceIdentityReward:
    return FaceIdentityReward(**kwargs)
