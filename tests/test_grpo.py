"""GRPO: first ratio is 1, weights move, advantages, NaN / failing rewards, exact resume, bad recipes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from qirl.checkpoint import latest_checkpoint, load_checkpoint
from qirl.config import load_recipe
from qirl.errors import UserError
from qirl.models.registry import load_policy
from qirl.rewards.base import RewardModel, register_reward
from qirl.rl.grpo import GrpoRecipe, GrpoTrain, advantages, dpo_pairs, grpo, nfe_per_iteration, raft_rows

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


def test_a_scorer_that_always_raises_stops_the_run_with_one_line_exit_2(tmp_path, caplog):
    """Every reward NaN for `nan_reward_patience` iterations in a row: one line, exit 2, at that iteration
    (not after all 10), and the scorer's exception is in the log with its traceback."""
    import logging

    from qirl.cli.main import app
    from typer.testing import CliRunner

    (tmp_path / "r.yaml").write_text("rewards:\n  models:\n    - {name: test_fail, weight: 1.0}\n")
    args = ["grpo", str(tmp_path / "r.yaml"), *TINY, "train.iterations=10", f"run.out_dir={tmp_path / 'run'}", "--quiet"]
    with caplog.at_level(logging.WARNING, logger="qirl.rewards.service"):
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "rewards failed" in result.output and "3 iterations in a row" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    steps = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if line]
    assert len(steps) == 2  # iterations 1 and 2 logged; the third stopped the run
    assert any(r.exc_info and "scorer down" in r.getMessage() for r in caplog.records)


def test_a_scorer_bug_is_logged_as_an_error_with_its_traceback(caplog):
    import logging

    from qirl.rewards.service import RewardService

    class Buggy(RewardModel):
        name = "buggy"

        def score(self, images, prompts, records):
            return None + 1  # a TypeError: a bug, not a flaky scorer

    with caplog.at_level(logging.WARNING, logger="qirl.rewards.service"), RewardService({"buggy": Buggy()}) as service:
        out = service.score(torch.zeros(2, 3, 8, 8), ["a", "b"])
        service.score(torch.zeros(2, 3, 8, 8), ["a", "b"])
    assert out.isnan().all() and service.faults["buggy"] == 2
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info and "a bug in the scorer" in errors[0].getMessage()


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
        ("data.prompts=heldout-t2i", "evaluation set"),
        ("sampling.detach_uncond=true", "cfg_mode both only"),
        ("data.prompts=val-t2i", "evaluation set"),
        ("train.group_size=1", "group_size"),
        ("train.objective=ppo", "objective"),
        ("train.raft_keep=2", "raft_keep"),  # group_size 2: keeping both rows ranks nothing
        ("train.objective=raft train.raft_require=oracle_bogus", "raft_require"),
        ("train.raft_anchor_times=late", "raft_anchor_times"),
        ("train.objective=dpo sampling.cfg_mode=both", "conditional velocity"),
        ("train.objective=dpo train.group_size=3 train.raft_keep=2", "group_size / 2"),
        ("train.objective=dpo train.dpo_beta=0", "dpo_beta"),
        ("train.objective=raft train.updates_per_iter=2", "updates_per_iter"),
        ("train.ptx_coef=-1", "ptx_coef"),
        ("train.ptx_batch=0", "ptx_batch"),
    ],
)
def test_bad_recipe_is_a_user_error(tmp_path, override, match):
    with pytest.raises(UserError, match=match):
        rows(recipe(tmp_path / "bad", *override.split()))


def test_raft_keeps_each_groups_best_rows_and_drops_ties():
    adv = torch.tensor([0.5, -1.0, 1.5, -1.0, 0.0, 0.0, 0.0, 0.0, -0.2, 0.9, 0.1, -0.8])  # 3 groups of 4
    rows_, w = raft_rows(adv, group_size=4, keep=2)
    assert sorted(rows_[:2].tolist()) == [0, 2] and sorted(rows_[4:].tolist()) == [9, 10]
    assert len(rows_) == 6
    assert w[2:4].tolist() == [0.0, 0.0]  # a group whose rows tie teaches nothing
    assert w[:2].tolist() == [1.0, 1.0] and w[4:].tolist() == [1.0, 1.0]


def test_raft_with_a_required_reward_keeps_only_rows_that_pass():
    adv = torch.tensor([1.5, -0.5, 0.5, -1.5, 1.0, 0.5, -0.5, -1.0])  # 2 groups of 4
    ok = torch.tensor([False, True, False, False, False, False, False, False])
    rows_, w = raft_rows(adv, group_size=4, keep=2, ok=ok)
    assert rows_[0].item() == 1 and w[0] == 1.0  # the passing row ranks first, below-mean A or not
    assert w[1:].tolist() == [0.0, 0.0, 0.0]  # the best failures teach nothing (they would teach not to edit)


def test_raft_loss_comes_from_the_kept_rows_only():
    """Changing an output that was not kept leaves RAFT's loss as it was; changing a kept one does not."""
    from types import SimpleNamespace

    from qirl.rl.grpo import _raft_update
    from qirl.rl.rollout import encode_groups
    from qirl.sampling import timesteps

    policy = load_policy("base")
    tr = GrpoTrain(objective="raft", raft_keep=1, micro_batch=4)
    state = SimpleNamespace(opt=torch.optim.SGD(policy.trainable_parameters(), lr=0.0), step=lambda *a: None)
    cond = encode_groups(policy, ["a red circle", "a blue square"], [None, None], 3)  # 2 groups of 3
    adv = torch.tensor([1.0, -0.5, -0.5, -0.5, 1.0, -0.5])  # kept: rows 0 and 4

    def loss(latents: torch.Tensor) -> float:
        ro = SimpleNamespace(latents=latents, timesteps=timesteps(4), guidance=1.0, cfg_mode="hybrid")
        gen = torch.Generator().manual_seed(0)
        return _raft_update(policy, state, 0, tr, [ro], cond, adv, None, 3, [0, 1], gen, None)[0]

    x = torch.randn((6, *policy.latent_shape), generator=torch.Generator().manual_seed(1))
    unkept, kept = x.clone(), x.clone()
    unkept[[1, 2, 3, 5]] += 1.0
    kept[4] += 1.0
    assert loss(unkept) == loss(x) != loss(kept)


@pytest.mark.parametrize("anchor_times", ["kept", "all"])
def test_raft_anchor_holds_the_window_or_the_whole_path(anchor_times):
    """The anchor rows' t lie in the window's span as the kept rows' do (``kept``) or range over (0, 1) (``all``)."""
    from types import SimpleNamespace

    from qirl.rl.grpo import _raft_update
    from qirl.rl.rollout import encode_groups
    from qirl.sampling import timesteps

    policy = load_policy("base")
    tr = GrpoTrain(objective="raft", raft_keep=1, micro_batch=8, raft_anchor_times=anchor_times)
    state = SimpleNamespace(opt=torch.optim.SGD(policy.trainable_parameters(), lr=0.0), step=lambda *a: None)
    cond = encode_groups(policy, ["a red circle"] * 8, [None] * 8, 4)  # 8 groups of 4
    adv = torch.tensor([1.0, -1.0, -1.0, -1.0] * 8)  # kept: the first row of each group
    seen: list[torch.Tensor] = []

    class Recorder:
        coef = 1.0

        def reference_velocity(self, x_t, t, c):
            seen.append(t.clone())
            return policy.velocity(x_t, t, c).detach().float()

    grid = timesteps(10)  # the window is steps 0..1: t over [grid[2], 1]
    ro = SimpleNamespace(latents=torch.randn(32, *policy.latent_shape), timesteps=grid, guidance=1.0,
                         cfg_mode="hybrid")
    _raft_update(policy, state, 0, tr, [ro], cond, adv, None, 4, [0, 1], torch.Generator().manual_seed(0),
                 Recorder())
    t = torch.cat(seen)  # [8 anchor rows x 2 draws]
    inside = bool((t >= float(grid[2]) - 1e-6).all())
    assert inside == (anchor_times == "kept")


@pytest.mark.parametrize(
    "update",
    [["train.objective=raft"], ["train.objective=dpo"], ["train.objective=raft", "train.ptx_coef=1.0", "train.ptx_batch=3"]],
)
def test_raft_and_dpo_train_and_resume_exactly(tmp_path, update):
    raft = [*update, "train.group_size=3", "run.checkpoint_every=1"]
    full = rows(recipe(tmp_path / "full", "train.iterations=2", *raft))
    assert full[0]["loss"] > 0 and full[0]["grad_norm"] > 0 and full[-1]["done"]
    rows(recipe(tmp_path / "cut", "train.iterations=1", *raft))
    rows(recipe(tmp_path / "cut", "train.iterations=2", *raft), resume=True)
    a = load_checkpoint(latest_checkpoint(tmp_path / "full"))
    b = load_checkpoint(latest_checkpoint(tmp_path / "cut"))
    base = load_policy("base").state_dict()
    assert any(not torch.equal(t, base[n]) for n, t in a.tensors["model"].items() if n in base)
    for name, tensor in a.tensors["model"].items():
        assert torch.equal(tensor, b.tensors["model"][name]), name


def test_dpo_pairs_each_groups_best_with_its_worst():
    adv = torch.tensor([0.5, -1.0, 1.5, -0.2, 0.0, 0.0, 0.0, 0.0])  # 2 groups of 4
    winners, losers, w = dpo_pairs(adv, group_size=4, keep=2)
    assert winners[:2].tolist() == [2, 0] and losers[:2].tolist() == [1, 3]  # best with worst, next with next
    assert w.tolist() == [1.0, 1.0, 0.0, 0.0]  # a group whose rows tie has no preference
    ok = torch.tensor([False, True, False, False] * 2)  # rejection sampling: only row 1 carries the edit out
    winners, losers, w = dpo_pairs(adv, group_size=4, keep=1, ok=ok)
    assert winners[0].item() == 1 and losers[0].item() == 1 and w.tolist() == [0.0, 0.0]  # no pair beats itself


def _dpo_loss_and_grad(latents: torch.Tensor, adv: torch.Tensor) -> tuple[float, float]:
    """`_dpo_update` on 2 groups of 3 rows with the policy as its own reference: (loss, gradient norm)."""
    from types import SimpleNamespace

    from qirl.rl.grpo import _dpo_update, _Reference
    from qirl.rl.rollout import encode_groups
    from qirl.sampling import timesteps

    policy = load_policy("base")
    frozen = load_policy("base").requires_grad_(False)
    tr = GrpoTrain(objective="dpo", raft_keep=1, micro_batch=4)
    state = SimpleNamespace(opt=torch.optim.SGD(policy.trainable_parameters(), lr=0.0), step=lambda *a: None)
    cond = encode_groups(policy, ["a red circle", "a blue square"], [None, None], 3)
    ro = SimpleNamespace(latents=latents, timesteps=timesteps(4), guidance=1.0, cfg_mode="hybrid")
    loss, metrics = _dpo_update(policy, state, 0, tr, [ro], cond, adv, None, 3, [0, 1],
                                torch.Generator().manual_seed(0), _Reference(policy, frozen, 0.0))
    grad = torch.cat([p.grad.reshape(-1) for p in policy.trainable_parameters() if p.grad is not None])
    assert metrics["dpo_margin"] == 0.0  # at the reference the implicit rewards tie
    return loss, float(grad.norm())


def test_dpo_starts_at_log_two_and_learns_only_what_tells_a_pair_apart():
    adv = torch.tensor([1.0, 0.0, -1.0, 1.0, 0.0, -1.0])  # pairs: rows 0 vs 2 and 3 vs 5
    x = torch.randn((6, *load_policy("base").latent_shape), generator=torch.Generator().manual_seed(1))
    loss, grad = _dpo_loss_and_grad(x, adv)
    assert loss == pytest.approx(math.log(2.0), rel=1e-6) and grad > 0
    same = x.clone()
    same[[2, 5]] = x[[0, 3]]  # each loser is its winner: nothing tells them apart
    assert _dpo_loss_and_grad(same, adv)[1] < 1e-4 * grad  # zero up to the batched forward's rounding


def test_dpo_counts_its_network_evaluations_and_repeats_its_update(tmp_path):
    """U = updates_per_iter AdamW steps on one iteration's pairs: U times the training evaluations, and
    weights that move on from the one-step run's."""
    one = recipe(tmp_path / "u1", "train.iterations=1", "train.objective=dpo")
    two = recipe(tmp_path / "u2", "train.iterations=1", "train.objective=dpo", "train.updates_per_iter=2")
    first, second = rows(one)[0], rows(two)[0]
    assert first["nfe"] == nfe_per_iteration(one) == 4 * 3 * 2 + 2 * 1 * 2 * 8  # rollouts + 2 pairs x 2 draws
    assert second["nfe"] == nfe_per_iteration(two) == 4 * 3 * 2 + 2 * (2 * 1 * 2 * 8)
    assert {"dpo_margin", "dpo_accuracy"} <= first.keys()
    # the first step's metrics: at the reference, before any update, the implicit rewards tie
    assert second["dpo_margin"] == first["dpo_margin"] == 0.0
    a = load_checkpoint(latest_checkpoint(tmp_path / "u1")).tensors["model"]
    b = load_checkpoint(latest_checkpoint(tmp_path / "u2")).tensors["model"]
    assert any(not torch.equal(t, b[n]) for n, t in a.items())


def test_pretrain_mix_draws_by_iteration_and_counts_its_evaluations(tmp_path):
    """The ptx batch depends on (seed, iteration) only, so a resumed run draws it again; its share of
    edits follows the prompts'; it is a training forward + backward per row in `nfe`."""
    from qirl.rl.ptx import PretrainMix

    policy = load_policy("base")
    mix = PretrainMix(1.0, 4, 1.0, seed=0, micro_batch=2, view=policy, policy=policy)

    def grads() -> list[torch.Tensor]:
        out = [p.grad.clone() for p in policy.trainable_parameters() if p.grad is not None]
        policy.zero_grad(set_to_none=True)
        return out

    first = mix(0)
    g0 = grads()
    assert mix(0) == first > 0 and mix.last == first
    assert g0 and all(torch.equal(a, b) for a, b in zip(g0, grads(), strict=True))
    assert mix(1) != first
    cfg = recipe(tmp_path / "p", "train.iterations=1", "train.ptx_coef=0.5", "train.ptx_batch=3")
    first_row = rows(cfg)[0]
    assert first_row["nfe"] == nfe_per_iteration(cfg) == 4 * 3 * 2 + 4 * 2 * 3 + 3 * 3  # rollouts, update, ptx
    assert first_row["ptx"] > 0


def test_lora_trains_only_adapters_and_exports_a_merged_model(tmp_path):
    out = rows(recipe(tmp_path / "l", "train.iterations=2", "train.lora_rank=4", "run.checkpoint_every=1"))
    assert abs(out[0]["ratio_mean"] - 1) < 1e-5 and out[0]["grad_norm"] > 0
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "l"))
    assert ckpt.tensors["model"] and all("lora_" in n for n in ckpt.tensors["model"])
    merged = load_policy(str(tmp_path / "l" / "model"))  # an ordinary model directory
    base = load_policy("base")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    changed = [n for n, p in base.state_dict().items() if not torch.equal(p, merged.state_dict()[n])]
    assert changed and all(n.startswith("blocks.") for n in changed)  # only the adapted DiT layers moved
    resumed = rows(recipe(tmp_path / "l", "train.iterations=3", "train.lora_rank=4", "run.checkpoint_every=1"), resume=True)
    assert resumed[-1]["steps"] == 3


def test_ema_is_checkpointed_and_used_for_export(tmp_path):
    rows(recipe(tmp_path / "e", "train.iterations=2", "train.ema_decay=0.5", "run.checkpoint_every=1"))
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "e"))
    exported = load_policy(str(tmp_path / "e" / "model")).state_dict()
    name = next(n for n in ckpt.tensors["ema"] if n.startswith("blocks."))
    assert not torch.equal(ckpt.tensors["ema"][name], ckpt.tensors["model"][name])
    torch.testing.assert_close(exported[name], ckpt.tensors["ema"][name].to(exported[name].dtype))


@pytest.mark.parametrize("space, lora", [("velocity", 0), ("mean", 0), ("velocity", 4)])
def test_kl_to_reference_is_zero_then_positive(tmp_path, space, lora):
    """Full weights keep a frozen copy; LoRA takes the reference by disabling its adapters."""
    run = tmp_path / f"{space}{lora}"
    extra = ["train.iterations=2", "train.kl_coef=0.1", f"train.kl_space={space}", f"train.lora_rank={lora}"]
    if lora:
        extra.append("train.lr=1e-2")  # LoRA's B starts at 0: a larger step makes the adapters matter
    out = rows(recipe(run, *extra))
    assert out[0]["kl"] == pytest.approx(0.0, abs=1e-12)  # policy == reference before the first step
    assert out[1]["kl"] > 0


def test_kl_on_the_surrogates_forward_equals_a_separate_forward():
    """The KL built from trajectory_logprob's own v_c equals the one a second forward gave (the math
    of the removed forward-backward), in value and in gradient; adapters_disabled is the base model."""
    from qirl.rl.grpo import _kl, _reference_velocity
    from qirl.rl.lora import adapters_disabled, add_lora
    from qirl.sampling import sample_sde, trajectory_logprob

    policy = load_policy("base")
    reference = load_policy("base")
    with torch.no_grad():  # move the policy away from the reference
        for p in policy.trainable_parameters():
            p.add_(1e-3 * torch.randn_like(p))
    cond = policy.encode(["a red circle", "two blue squares"])
    gen = torch.Generator().manual_seed(0)
    ro = sample_sde(policy, cond, 3, guidance=3.0, noise_level=0.7, sde_window=[0], generator=gen)
    v_ref = _reference_velocity(policy, reference, ro, 0, cond)
    logp, v_c = trajectory_logprob(policy, ro, 0, cond, return_velocity=True)
    kl = _kl(v_c, v_ref, ro, 0, "mean")
    x, t = ro.state(0), torch.full((2,), float(ro.timesteps[0]))
    kl_sep = _kl(policy.velocity(x, t, cond).float(), v_ref, ro, 0, "mean")
    torch.testing.assert_close(kl, kl_sep)
    params = policy.trainable_parameters()  # the source projection is unused by text-to-image rows
    g1 = torch.autograd.grad(kl, params, allow_unused=True)
    g2 = torch.autograd.grad(kl_sep, params, allow_unused=True)
    assert sum(g is not None for g in g1) > len(params) // 2
    for a, b in zip(g1, g2, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)
    assert float(kl.detach()) > 0
    add_lora(policy, 4, 16.0, policy.default_lora_targets)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
        adapted = policy.velocity(x, t, cond)
        with adapters_disabled(policy):
            base = policy.velocity(x, t, cond)
        assert not torch.allclose(adapted, base)
        assert torch.equal(base, _reference_velocity(policy, None, ro, 0, cond))
    assert all(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n)  # switched back on


def test_sde_kl_factor_is_the_gaussian_kl_of_the_transition():
    from qirl import ops
    from qirl.sampling import sde_kl_factor

    gen = torch.Generator().manual_seed(0)
    for t, t_next in [(1.0, 0.9), (0.7, 0.6), (0.3, 0.2)]:
        x = torch.randn(2, 3, 4, 4, generator=gen)
        v1 = torch.randn(x.shape, generator=gen)
        v2 = v1 + 0.1 * torch.randn(x.shape, generator=gen)
        # Equal-variance Gaussians: log p1(mu1) - log p2(mu1) is exactly their KL.
        step = ops.cfg_sde_step(v1, x, torch.zeros_like(x), t, t_next - t, 0.7)
        kl = step.logp - ops.sde_logprob(v2, x, step.x_next, t, t_next - t, 0.7)
        expected = sde_kl_factor(t, t_next, 0.7) * (v1 - v2).square().flatten(1).mean(1)
        torch.testing.assert_close(kl, expected, rtol=1e-3, atol=1e-7)


def test_window_slides_and_wraps():
    from qirl.rl.grpo import GrpoSampling, window_at

    s = GrpoSampling(num_steps=6, window_start=1, window_size=2, window_slide=2)
    assert [window_at(i, s) for i in (0, 1, 2, 4, 6, 8)] == [[1, 2], [1, 2], [2, 3], [3, 4], [4, 5], [1, 2]]
    assert window_at(5, GrpoSampling(window_start=0, window_size=4)) == [0, 1, 2, 3]


def test_nan_loss_skips_the_step_and_keeps_weights(tmp_path, monkeypatch):
    import qirl.rl.grpo as g

    real = g.trajectory_logprob

    def nan_logprob(*args, **kwargs):
        logp, v_c = real(*args, **kwargs)
        return logp * float("nan"), v_c

    monkeypatch.setattr(g, "trajectory_logprob", nan_logprob)
    out = rows(recipe(tmp_path / "nan", "train.iterations=2"))
    assert out[-1]["skipped"] == 2 and out[1]["skipped"] == 2
    base, after = load_policy("base").state_dict(), load_policy(str(tmp_path / "nan" / "model")).state_dict()
    assert all(torch.equal(base[n], after[n]) for n in base)


def test_edit_prompts_train_and_evaluate_with_grids(tmp_path):
    out = rows(
        recipe(
            tmp_path / "ed",
            "data.prompts=shapes-edit",
            "rewards.models=[{name: oracle_instruction}, {name: oracle_identity}]",
            "train.group_size=4",  # 2 rollouts of an edit often score the same (the rewards are coarse)
            "train.iterations=1",
            "eval.every=1",
            "eval.prompts=heldout-edit",
            "eval.n=2",
            "eval.num_steps=2",
            "eval.grid=2",
        )
    )
    assert out[0]["step"] == 0 and {"eval/edit/success", "eval/edit/preservation"} <= set(out[0])
    assert out[1]["adv_std"] > 0 and "eval_oracle_overall" in out[1]
    assert (tmp_path / "ed" / "grids" / "step_00001_edit.png").is_file()
    assert list((tmp_path / "ed" / "tb").iterdir())  # TensorBoard event file (tensorboard is a dev extra)


def test_unknown_category_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="category"):
        rows(recipe(tmp_path / "c", "rewards.category_weights={nonexistent: {oracle_alignment: 1.0}}"))


def test_full_disk_while_checkpointing_exits_2_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    from qirl.cli.main import app
    from typer.testing import CliRunner

    import qirl.checkpoint as ck

    out = tmp_path / "d"
    args = ["grpo", "-", *TINY, f"run.out_dir={out}", "run.checkpoint_every=1"]
    runner = CliRunner()
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("train: {iterations: 1}\n")
    args[1] = str(recipe_file)
    assert runner.invoke(app, args).exit_code == 0
    monkeypatch.setattr(ck, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    recipe_file.write_text("train: {iterations: 2}\n")
    result = runner.invoke(app, [*args, "--resume"])
    assert result.exit_code == 2 and "disk full" in result.output
    assert latest_checkpoint(out).name == "step_00000001"


def test_combined_advantage_normalises_the_weighted_mean_once():
    rewards = torch.tensor([[[0.0, 0.50], [1.0, 0.51], [0.5, float("nan")]]])  # [P=1, G=3, K=2]
    weights = torch.tensor([[1.0, 3.0]])
    adv = advantages(rewards, weights, GrpoTrain(advantage="combined", adv_clip=100.0, adv_eps=1e-9))
    r = torch.tensor([0.375, 0.6325, 0.5])  # weighted means of the valid rewards
    expected = (r - r.mean()) / r.std(unbiased=False)
    torch.testing.assert_close(adv[0], expected, atol=1e-5, rtol=1e-5)
    per = advantages(rewards, weights, GrpoTrain(adv_clip=100.0, adv_eps=1e-9))
    assert per[0, 1] > adv[0, 1]  # per-reward scales the tiny spread of reward 2 up to +-1 x 3


def test_wandb_offline_logs_the_metrics_rows(tmp_path, monkeypatch):
    """run.wandb=true writes an offline W&B run beside metrics.jsonl with the same scalar keys."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = rows(recipe(tmp_path / "w", "train.iterations=2", "run.wandb=true", "run.tensorboard=false"))
    assert out[-1]["done"]
    files = list((tmp_path / "w" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    data = files[0].read_bytes()
    for key in ("reward/oracle_alignment", "ratio_mean", "grad_norm"):
        assert key.encode() in data, key


def test_wandb_asked_for_but_missing_is_a_user_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(UserError, match=r"run.wandb=true needs Weights & Biases"):
        rows(recipe(tmp_path / "m", "train.iterations=1", "run.wandb=true"))


def test_checkpoints_load_as_policies_for_annotation_rounds(tmp_path):
    """`load_policy` reads a GRPO checkpoint (a run in progress, or one step of it), as `qirl score
    annotate model=...` does for an on-policy round: the starting model with the trained EMA weights."""
    out = tmp_path / "ck"
    rows(recipe(out, "train.iterations=2", "run.checkpoint_every=1", "run.keep_checkpoints=2"))
    exported = load_policy(str(out / "model")).state_dict()
    last = load_policy(str(out / "checkpoints" / "step_00000002")).state_dict()
    first = load_policy(str(out / "checkpoints" / "step_00000001")).state_dict()
    assert all(torch.equal(last[k], exported[k]) for k in exported)
    assert not all(torch.equal(first[k], last[k]) for k in last)
    lora = tmp_path / "lora"
    rows(recipe(lora, "train.iterations=1", "run.checkpoint_every=1", "train.lora_rank=2", "train.lr=1e-3"))
    with pytest.raises(UserError, match="LoRA run's checkpoint"):
        load_policy(str(lora / "checkpoints" / "step_00000001"))


def test_group_agreement_is_within_group_spearman():
    from qirl.rl.grpo import group_agreement

    trained = torch.tensor([1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0])
    same, reversed_ = trained.clone(), torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 3.0, 2.0, 1.0])
    assert group_agreement(trained, same, 4) == pytest.approx(1.0)
    assert group_agreement(trained, reversed_, 4) == pytest.approx(0.0)  # +1 and -1 average out
    # A constant group (no order to agree on) and a group with NaNs left under 3 rows are skipped.
    flat = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, float("nan"), float("nan"), 4.0])
    assert group_agreement(trained, flat, 4) != group_agreement(trained, flat, 4)  # NaN


def test_monitors_are_logged_but_do_not_change_training(tmp_path):
    """A monitor is scored and logged with its agreement; weights and advantages are those of the run
    without it (monitors never enter the objective)."""
    plain = rows(recipe(tmp_path / "a", "train.iterations=1"))[0]
    watched_rows = rows(recipe(tmp_path / "b", "train.iterations=1", "rewards.monitors=[{name: oracle}]"))
    watched = watched_rows[0]
    assert "monitor/oracle" in watched and "monitor_agreement/oracle" in watched
    assert 0.0 <= watched["monitor/oracle"] <= 1.0
    assert watched["adv_std"] == plain["adv_std"] and watched["loss"] == plain["loss"]
    a = load_policy(str(tmp_path / "a" / "model")).state_dict()
    b = load_policy(str(tmp_path / "b" / "model")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_duplicate_monitor_names_are_a_user_error(tmp_path):
    cfg = recipe(tmp_path / "d", "train.iterations=1", "rewards.monitors=[{name: oracle}, {name: oracle}]")
    with pytest.raises(UserError, match="monitor names must be unique"):
        rows(cfg)


@pytest.mark.parametrize("anchor_times", ["kept", "all"])
def test_raft_anchor_is_zero_at_the_reference_then_positive(tmp_path, anchor_times):
    out = rows(
        recipe(
            tmp_path / "a", "train.iterations=2", "train.objective=raft", "train.group_size=3",
            "train.kl_coef=1.0", "train.raft_require=oracle_alignment", "train.raft_threshold=0.0",
            f"train.raft_anchor_times={anchor_times}",
        )
    )
    assert out[0]["kl"] == 0.0 and out[1]["kl"] > 0.0
