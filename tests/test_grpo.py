"""GRPO: first ratio is 1, weights move, advantages, NaN / failing rewards, exact resume, bad recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qirl.checkpoint import latest_checkpoint, load_checkpoint
from qirl.config import load_recipe
from qirl.errors import UserError
from qirl.models.registry import load_policy
from qirl.rewards.base import RewardModel, register_reward
from qirl.rl.grpo import GrpoRecipe, GrpoTrain, advantages, grpo

TINY = [
    "train.prompts_per_iter=2",
    "train.group_size=2",
    "train.micro_batch=2",
    "sampling.num_steps=3",
    "sampling.window_size=2",
    "eval.every=0",
    "train.reward_workers=1",
]


class _NanReward(RewardModel):
    name = "test_nan"

    def score(self, images, prompts, records):
        return torch.full((len(prompts),), float("nan"))


class _FailingReward(RewardModel):
    name = "test_fail"

    def score(self, images, prompts, records):
        raise RuntimeError("scorer down")


register_reward("test_nan")(lambda **kw: _NanReward())
register_reward("test_fail")(lambda **kw: _FailingReward())


def recipe(out: Path, *extra: str) -> GrpoRecipe:
    return load_recipe(GrpoRecipe, None, TINY + [f"run.out_dir={out}", *extra])


def rows(cfg: GrpoRecipe, resume: bool = False) -> list[dict]:
    return list(grpo(cfg, resume=resume))


def test_first_iteration_ratio_is_one_and_weights_change(tmp_path):
    out = rows(recipe(tmp_path / "r", "train.iterations=1"))
    first = out[0]
    assert first["step"] == 1 and out[-1]["done"]
    assert abs(first["ratio_mean"] - 1) < 1e-5 and abs(first["ratio_max"] - 1) < 1e-5
    assert first["clip_frac"] == 0.0
    assert first["skipped"] == 0 and first["grad_norm"] > 0
    for key in ("reward/oracle_alignment", "reward/oracle_fidelity", "reward/oracle_aesthetics", "reward"):
        assert key in first
    base = load_policy("base")
    trained = load_policy(str(tmp_path / "r" / "model"))
    base_sd, new_sd = base.state_dict(), trained.state_dict()
    names = {n for n, p in base.named_parameters() if any(p is q for q in base.trainable_parameters())}
    assert any(not torch.equal(base_sd[n], new_sd[n]) for n in names)
    assert (tmp_path / "r" / "metrics.jsonl").read_text().count("\n") == 1


def test_advantages_sum_to_zero_per_group():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.rand(3, 4, 2, generator=gen)  # [P, G, K]
    weights = torch.tensor([[1.0, 1.0], [2.0, 0.5], [1.0, 0.0]])  # [P, K]
    adv = advantages(rewards, weights, GrpoTrain(adv_clip=100.0))  # [P, G]
    assert adv.shape == (3, 4)
    torch.testing.assert_close(adv.sum(dim=1), torch.zeros(3), atol=1e-5, rtol=0)
    assert adv.abs().max() > 0.1


def test_all_nan_reward_gives_zero_advantage(tmp_path):
    cfg = recipe(tmp_path / "n", "train.iterations=1")
    cfg.rewards.models = cfg.rewards.models[:0]
    from qirl.rewards.composite import RewardSpec

    cfg.rewards.models.append(RewardSpec(name="test_nan"))
    first = rows(cfg)[0]
    assert first["adv_std"] == 0.0
    assert first["grad_norm"] == 0.0
    assert first["skipped"] == 0


def test_failing_reward_counts_faults_and_training_continues(tmp_path):
    from qirl.rewards.composite import RewardSpec

    cfg = recipe(tmp_path / "f", "train.iterations=2")
    cfg.rewards.models = [RewardSpec(name="oracle_alignment"), RewardSpec(name="test_fail")]
    out = rows(cfg)
    assert [r["step"] for r in out[:-1]] == [1, 2]
    assert all(r["reward_faults"] >= 1 for r in out[:-1])
    assert out[-1]["reward_faults"]["test_fail"] >= 2 and out[-1]["reward_faults"]["oracle_alignment"] == 0
    assert out[0]["adv_std"] > 0  # the working reward still trains


def test_resume_is_exact(tmp_path):
    rows(recipe(tmp_path / "full", "train.iterations=4", "run.checkpoint_every=2"))
    rows(recipe(tmp_path / "cut", "train.iterations=2", "run.checkpoint_every=2"))
    with pytest.raises(UserError, match="--resume"):
        rows(recipe(tmp_path / "cut", "train.iterations=4", "run.checkpoint_every=2"))
    resumed = rows(recipe(tmp_path / "cut", "train.iterations=4", "run.checkpoint_every=2"), resume=True)
    assert resumed[-1]["resumed_from"] == 2 and resumed[-1]["steps"] == 4
    a = load_checkpoint(latest_checkpoint(tmp_path / "full"))
    b = load_checkpoint(latest_checkpoint(tmp_path / "cut"))
    assert a.step == b.step == 4
    for name, tensor in a.tensors["model"].items():
        assert torch.equal(tensor, b.tensors["model"][name]), name
    assert a.state["data_rng"] == b.state["data_rng"]
    lines_a = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    lines_b = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert len(lines_a) == len(lines_b) == 4


@pytest.mark.parametrize(
    "override, match",
    [
        ("sampling.cfg_mode=bogus", "cfg_mode"),
        ("sampling.window_start=2", "out of range"),
        ("sampling.window_size=0", "out of range"),
        ("data.prompts=heldout-t2i", "held-out"),
        ("train.group_size=1", "group_size"),
    ],
)
def test_bad_recipe_is_a_user_error(tmp_path, override, match):
    with pytest.raises(UserError, match=match):
        rows(recipe(tmp_path / "bad", override))
