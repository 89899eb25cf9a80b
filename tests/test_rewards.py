"""Reward contract, oracle rewards and composites."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qirl.errors import UserError
from qirl.rewards.base import RewardRecord, available_rewards, build_reward
from qirl.rewards.composite import CompositeConfig, CompositeReward, RewardSpec
from qirl.shapes import Scene, random_edit_record, random_t2i_record, render_batch


@pytest.fixture(scope="module")
def t2i_batch():
    rng = np.random.default_rng(0)
    recs = [random_t2i_record(rng) for _ in range(6)]
    images = render_batch([Scene.from_dict(r["scene"]) for r in recs])  # [6, 3, 32, 32]
    return images, [r["prompt"] for r in recs]


@pytest.fixture(scope="module")
def edit_batch():
    rng = np.random.default_rng(1)
    recs = [random_edit_record(rng) for _ in range(4)]
    src = render_batch([Scene.from_dict(r["source_scene"]) for r in recs])
    tgt = render_batch([Scene.from_dict(r["target_scene"]) for r in recs])
    records = [RewardRecord(task="edit", source=s) for s in src]
    return src, tgt, [r["prompt"] for r in recs], records


def test_registry_lists_oracle_rewards_and_rejects_unknown():
    names = available_rewards()
    for n in ("oracle", "oracle_alignment", "oracle_aesthetics", "oracle_fidelity", "oracle_instruction", "oracle_identity"):
        assert n in names
    with pytest.raises(UserError, match="unknown reward 'nope'"):
        build_reward("nope")


def test_oracle_rewards_on_clean_renders(t2i_batch):
    images, prompts = t2i_batch
    for name in ("oracle", "oracle_alignment", "oracle_aesthetics", "oracle_fidelity"):
        r = build_reward(name)(images, prompts)
        assert r.shape == (6,) and r.dtype == torch.float32
        assert torch.all(r > 0.95), (name, r)
    blank = torch.full_like(images, 0.5)
    assert torch.all(build_reward("oracle_alignment")(blank, prompts) < 0.5)


def test_edit_rewards_and_nan_for_other_task(edit_batch, t2i_batch):
    src, tgt, prompts, records = edit_batch
    success = build_reward("oracle_instruction")(tgt, prompts, records)
    kept = build_reward("oracle_identity")(tgt, prompts, records)
    assert torch.all(success > 0.95) and torch.all(kept > 0.95)
    unchanged = build_reward("oracle_instruction")(src, prompts, records)
    assert torch.all(unchanged < 0.5)
    # A T2I-only reward cannot judge edits, and an edit-only reward cannot judge T2I rows.
    assert torch.isnan(build_reward("oracle_alignment")(tgt, prompts, records)).all()
    images, t2i_prompts = t2i_batch
    assert torch.isnan(build_reward("oracle_identity")(images, t2i_prompts)).all()


def test_composite_scores_weights_and_combined(t2i_batch):
    images, prompts = t2i_batch
    comp = CompositeReward.from_config(
        CompositeConfig(
            models=[RewardSpec("oracle_alignment", 1.0), RewardSpec("oracle_identity", 2.0)],
            category_weights={"spatial": {"oracle_alignment": 3.0}},
        )
    )
    scores = comp.score_all(images, prompts, [RewardRecord()] * 6)  # [6, 2]
    assert scores.shape == (6, 2) and torch.isnan(scores[:, 1]).all()
    w = comp.weights(["default", "spatial"])
    assert w.tolist() == [[1.0, 2.0], [3.0, 2.0]]
    combined = comp.combined(scores, ["default"] * 6)
    assert torch.allclose(combined, scores[:, 0])  # NaN column drops out, weights renormalise
    assert math.isnan(comp.combined(torch.full((1, 2), float("nan")), ["default"])[0].item())


def test_composite_config_errors():
    with pytest.raises(UserError, match="category_weights.spatial: unknown reward"):
        CompositeReward.from_config(CompositeConfig(models=[RewardSpec("oracle")], category_weights={"spatial": {"x": 1.0}}))
    with pytest.raises(UserError, match="at least one"):
        CompositeReward.from_config(CompositeConfig(models=[]))
