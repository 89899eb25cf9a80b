"""GRPO post-training of a flow policy (`qirl grpo recipe.yaml`), Flow-GRPO style.

One iteration (design, "Data flow: GRPO iteration"):

1. Draw P prompt records (seeded numpy rng; `qirl.rl.prompts`), encode them once under no_grad (the
   text encoder is frozen), repeat each G times. With ``shared_noise`` (the default) a group also
   shares its initial noise (DanceGRPO, Xue et al. 2025, arXiv:2505.07818), so the reward spread inside
   a group comes only from the SDE noises the objective credits; measured in `docs/grpo.md`.
2. Roll out with `sample_sde` (no grad) in micro-batches: SDE steps on the high-noise window
   ``window_start .. window_start + window_size - 1`` (grid index from t = 1), ODE steps elsewhere.
   Each micro-batch is decoded and handed to the `RewardService` at once, so scoring overlaps the next
   micro-batch's rollout. Rewards R [P, G, K].
3. Advantages (`qirl.ops.group_advantage`), per group and per reward, with the prompt's category
   weights w(c) [P, K]:  ``A = sum_k w_k (R_k - mu_k) / (sigma_k + eps)``, clamped to [-adv_clip, adv_clip].
   NaN rewards drop out; a row with no valid reward gets A = 0.
4. Train on the recorded window steps n (CFG-free in `hybrid`), for each micro-batch:

       logp   = log p_theta(x_{n+1} | x_n, c)            (`trajectory_logprob`, mean over latent dims)
       r      = exp(logp - logp_old[n])                   (= 1 before the update)
       L_clip = -mean( min(r A, clip(r, 1 - eps, 1 + eps) A) )
       L_kl   = kl_coef * mean || v_theta(x_n, t_n, c) - v_ref(x_n, t_n, c) ||^2   (optional)

   The loss is the mean over the window steps and all P G rows (micro-batches are weighted by their
   size), gradients are accumulated, clipped to ``grad_clip`` and applied in ONE AdamW step per
   iteration (``updates_per_iter`` > 1 repeats the update on the same rollouts; only then does the
   ratio leave 1 and the clip bind). A non-finite loss or gradient norm skips the step (weights and
   optimizer untouched). ``objective=raft`` replaces this step with reward-ranked fine-tuning on the
   same rollouts (`_raft_update`: flow matching on each group's best rows, an optional anchor), and
   ``objective=dpo`` with online Diffusion-DPO on each group's best and worst rows (`_dpo_update`;
   ``updates_per_iter`` AdamW steps on the same pairs).
   ``ptx_coef`` > 0 adds the pretraining flow-matching loss to every step (`qirl.rl.ptx`).
5. Metrics per iteration (JSONL, and TensorBoard when installed); every ``eval.every`` iterations the
   oracle scores on held-out prompts (`qirl.rl.heldout`: deterministic ODE sampling, fixed noise, a
   sample grid per task under ``<out_dir>/grids``) so reward hacking shows against the training reward.
   Monitors (`rewards.monitors`, `qirl.rewards.composite`) are scored with the rewards but never enter
   the advantage; each logs its mean `monitor/<name>` and `monitor_agreement/<name>`, the mean over
   groups of the within-group Spearman between the trained (combined) reward and the monitor.
   Options: LoRA adapters (peft) instead of full weights, an EMA of the trained weights (used for
   evaluation and export), a KL to the frozen reference in velocity or transition-mean space, and a
   window that slides towards t = 0 (MixGRPO).
6. Atomic checkpoints (trainable weights, optimizer, numpy + torch RNG states, iteration);
   ``resume=True`` continues bit-exactly on CPU. The final policy is saved to ``<out_dir>/model``.

The run is a generator of metric dicts; it never prints.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from qirl import ops
from qirl.distributed import DistributedConfig, sync_gradients
from qirl.errors import UserError
from qirl.models.registry import PolicyOptions
from qirl.prompt_sets import record_source
from qirl.rewards.base import RewardRecord, build_reward
from qirl.rewards.composite import CompositeConfig, CompositeReward, RewardSpec
from qirl.rewards.service import RewardFaultGuard, RewardService
from qirl.rl.common import TrainOptions, TrainRun, micro_batches, step_noises, validate_common
from qirl.rl.heldout import HeldoutConfig
from qirl.rl.loop import Session
from qirl.rl.lora import adapters_disabled
from qirl.rl.prompts import PromptSource
from qirl.rl.ptx import PretrainMix
from qirl.rl.rollout import SdeSpec, encode_groups, roll_out_groups
from qirl.sampling import (
    CFG_MODES,
    add_noise,
    guided_velocity,
    sample_train_t,
    sde_kl_factor,
    trajectory_logprob,
)

SHAPES_T2I = "shapes-t2i"


@dataclass
class GrpoData:
    prompts: str = SHAPES_T2I  # shapes-t2i | shapes-edit | shapes-mix (generated train splits) or a JSONL
    edit_fraction: float = 0.5  # share of edit prompts drawn by shapes-mix


def _default_rewards() -> CompositeConfig:
    return CompositeConfig(
        models=[
            RewardSpec(name="oracle_alignment", weight=1.0),
            RewardSpec(name="oracle_fidelity", weight=1.0),
            RewardSpec(name="oracle_aesthetics", weight=1.0),
        ]
    )


@dataclass
class GrpoSampling:
    num_steps: int = 10
    guidance: float = 3.0
    shift: float = 1.0
    noise_level: float = 0.7
    cfg_mode: str = "hybrid"  # hybrid | both | none (see qirl.sampling.sample_sde)
    window_start: int = 0  # first trained (SDE) step, grid index counted from t = 1
    window_size: int = 4  # number of trained steps
    window_slide: int = 0  # > 0: the window moves one step towards t = 0 every this many iterations, wrapping
    shared_noise: bool = True  # one initial noise per group (DanceGRPO): the spread comes from the SDE steps
    detach_uncond: bool = False  # cfg_mode both: no gradient through the unconditional branch


@dataclass
class GrpoTrain(TrainOptions):
    """`TrainOptions` (P = ``prompts_per_iter`` groups) and GRPO's own."""

    group_size: int = 8  # G
    clip_range: float = 1e-3  # PPO ratio clip eps (small: log-probs are means over latent dims)
    kl_coef: float = 0.0  # weight of the KL to the frozen reference (0: no reference kept)
    kl_space: str = "velocity"  # velocity: ||v - v_ref||^2 | mean: Gaussian KL of the SDE transition
    advantage: str = "per_reward"  # per_reward: sum_k w_k normalised R_k (report) | combined: normalise sum_k w_k R_k
    adv_clip: float = 5.0
    adv_eps: float = 1e-4
    updates_per_iter: int = 1  # AdamW steps on each rollout batch (grpo: > 1 lets the ratio clip bind; dpo; not raft)
    objective: str = "grpo"  # grpo: clipped surrogate | raft: flow matching on each group's best | dpo: best vs worst
    raft_keep: int = 1  # raft: rows kept per group (the highest advantages; without raft_require only A > 0); dpo: pairs
    raft_require: str = ""  # raft, dpo: a trained reward's name; only rows scoring >= raft_threshold on it are kept
    raft_threshold: float = 0.5
    raft_times: str = "window"  # raft: t uniform over the window's times | all: logit-normal over (0, 1)
    raft_anchor_times: str = "kept"  # raft anchor's t: the kept rows' draws | all: logit-normal (worse: docs/grpo.md R11)
    ptx_coef: float = 0.0  # > 0: add this times the pretraining flow-matching loss each step (`qirl.rl.ptx`)
    ptx_batch: int = 16  # Shapes pretraining pairs a step for the ptx term
    dpo_beta: float = 1000.0  # dpo: the preference's inverse temperature on the velocity-error gap (Diffusion-DPO)
    reward_workers: int = 2  # RewardService threads
    max_nan_reward_fraction: float = 0.5  # a run stops (exit 2) when more of an iteration's rewards are NaN
    nan_reward_patience: int = 3  # ... in this many iterations in a row (0: never stop)


@dataclass
class GrpoRecipe:
    model: str = "base"  # policy spec for `load_policy` (also the frozen KL reference)
    policy: PolicyOptions = field(default_factory=PolicyOptions)  # device, dtype, resolution, ...
    data: GrpoData = field(default_factory=GrpoData)
    rewards: CompositeConfig = field(default_factory=_default_rewards)
    sampling: GrpoSampling = field(default_factory=GrpoSampling)
    train: GrpoTrain = field(default_factory=GrpoTrain)
    eval: HeldoutConfig = field(default_factory=HeldoutConfig)
    run: TrainRun = field(default_factory=lambda: TrainRun(out_dir="runs/grpo"))
    distributed: DistributedConfig = field(default_factory=DistributedConfig)  # torchrun runs only


# ----------------------------------------------------------------------------------------- helpers

KL_SPACES = ("velocity", "mean")
ADVANTAGES = ("per_reward", "combined")
OBJECTIVES = ("grpo", "raft", "dpo")
RAFT_TIMES = ("window", "all")
ANCHOR_TIMES = ("kept", "all")


def validate(recipe: GrpoRecipe, world_size: int = 1) -> None:
    """UserError naming the key for every setting a run cannot use (on ``world_size`` processes)."""
    s, t = recipe.sampling, recipe.train
    if s.cfg_mode not in CFG_MODES:
        raise UserError(f"sampling.cfg_mode must be one of {', '.join(CFG_MODES)}, got {s.cfg_mode!r}")
    if s.detach_uncond and s.cfg_mode != "both":
        raise UserError(f"sampling.detach_uncond applies to cfg_mode both only (cfg_mode is {s.cfg_mode!r})")
    if s.num_steps < 1:
        raise UserError(f"sampling.num_steps must be >= 1, got {s.num_steps}")
    if s.window_size < 1 or s.window_start < 0 or s.window_start + s.window_size > s.num_steps:
        raise UserError(
            f"sampling window {s.window_start}..{s.window_start + s.window_size - 1} "
            f"(window_start={s.window_start}, window_size={s.window_size}) is out of range: "
            f"steps are 0..{s.num_steps - 1} for num_steps={s.num_steps}"
        )
    if s.window_slide < 0:
        raise UserError(f"sampling.window_slide must be >= 0, got {s.window_slide}")
    if s.noise_level <= 0:
        raise UserError(
            f"sampling.noise_level must be > 0 for GRPO (it needs SDE steps), got {s.noise_level}"
        )
    for key in ("iterations", "prompts_per_iter", "micro_batch", "updates_per_iter"):
        if getattr(t, key) < 1:
            raise UserError(f"train.{key} must be >= 1, got {getattr(t, key)}")
    if t.group_size < 2:
        raise UserError(f"train.group_size must be >= 2 (group statistics), got {t.group_size}")
    if t.clip_range <= 0:
        raise UserError(f"train.clip_range must be > 0, got {t.clip_range}")
    if t.kl_coef < 0:
        raise UserError(f"train.kl_coef must be >= 0, got {t.kl_coef}")
    if t.advantage not in ADVANTAGES:
        raise UserError(f"train.advantage must be one of {', '.join(ADVANTAGES)}, got {t.advantage!r}")
    if t.objective not in OBJECTIVES:
        raise UserError(f"train.objective must be one of {', '.join(OBJECTIVES)}, got {t.objective!r}")
    if not 1 <= t.raft_keep < t.group_size:
        raise UserError(f"train.raft_keep must be in [1, group_size), got {t.raft_keep}")
    if t.objective == "dpo" and 2 * t.raft_keep > t.group_size:
        raise UserError(f"train.raft_keep must be <= group_size / 2 for dpo (pairs of best and worst), got {t.raft_keep}")
    if t.objective == "raft" and t.updates_per_iter > 1:
        raise UserError(f"train.updates_per_iter must be 1 for raft (one update per iteration), got {t.updates_per_iter}")
    if t.objective == "dpo" and s.cfg_mode == "both":
        raise UserError("train.objective=dpo trains the conditional velocity: use sampling.cfg_mode hybrid or none")
    if t.ptx_coef < 0 or t.ptx_batch < 1:
        raise UserError(f"train.ptx_coef must be >= 0 and train.ptx_batch >= 1, got {t.ptx_coef} and {t.ptx_batch}")
    if t.dpo_beta <= 0:
        raise UserError(f"train.dpo_beta must be > 0, got {t.dpo_beta}")
    if t.raft_times not in RAFT_TIMES:
        raise UserError(f"train.raft_times must be one of {', '.join(RAFT_TIMES)}, got {t.raft_times!r}")
    if t.raft_anchor_times not in ANCHOR_TIMES:
        raise UserError(
            f"train.raft_anchor_times must be one of {', '.join(ANCHOR_TIMES)}, got {t.raft_anchor_times!r}"
        )
    if t.kl_space not in KL_SPACES:
        raise UserError(f"train.kl_space must be one of {', '.join(KL_SPACES)}, got {t.kl_space!r}")
    if t.lora_rank < 0:
        raise UserError(f"train.lora_rank must be >= 0, got {t.lora_rank}")
    if not 0.0 <= t.ema_decay < 1.0:
        raise UserError(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
    if t.reward_workers < 1:
        raise UserError(f"train.reward_workers must be >= 1, got {t.reward_workers}")
    if not 0.0 <= t.max_nan_reward_fraction < 1.0 or t.nan_reward_patience < 0:
        raise UserError(
            "train.max_nan_reward_fraction must be in [0, 1) and train.nan_reward_patience >= 0, got "
            f"{t.max_nan_reward_fraction} and {t.nan_reward_patience}"
        )
    validate_common(recipe, world_size)


def nfe_per_iteration(recipe: GrpoRecipe) -> int:
    """Network evaluations per iteration, the convention of `qirl.rl.distill` (a forward of b rows counts
    b, a CFG forward 2b, a training forward + backward 3b): ``B (N r + U W (3 + q))`` with B = P G,
    r = 2 when the rollout uses CFG, U = updates_per_iter, W = window_size, q = 1 with the KL reference
    (the reference's no-grad forward; the KL reuses the surrogate's own forward) else 0, plus g = 2 per
    trained step in `both` mode (guided objective: 2 rows). RAFT trains P keep rows W times, once, and
    with the anchor as many unkept rows (a reference forward and a training forward + backward):
    ``B N r + P keep W (3 g + 4 q)``; DPO trains P keep pairs W times in each of U updates, each a
    reference forward and a training forward + backward on both rows: ``B N r + 8 U P keep W``. The
    pretraining mix adds a training forward + backward on its batch: ``3 ptx_batch`` per update."""
    s, t = recipe.sampling, recipe.train
    steps = t.updates_per_iter if t.objective in ("grpo", "dpo") else 1
    return _nfe_objective(s, t) + (3 * t.ptx_batch * steps if t.ptx_coef > 0 else 0)


def _nfe_objective(s: GrpoSampling, t: GrpoTrain) -> int:
    b = t.prompts_per_iter * t.group_size
    r = 2 if (s.cfg_mode != "none" and s.guidance > 1.0) else 1
    g = 2 if (s.cfg_mode == "both" and s.guidance > 1.0) else 1
    q = 1 if t.kl_coef > 0 else 0
    if t.objective == "raft":  # one update, window_size flow-matching draws on P keep rows (+ anchor rows)
        return b * s.num_steps * r + t.prompts_per_iter * t.raft_keep * s.window_size * (3 * g + 4 * q)
    if t.objective == "dpo":  # U updates, window_size draws on P keep pairs: 2 rows trained, 2 reference rows
        return b * s.num_steps * r + t.updates_per_iter * t.prompts_per_iter * t.raft_keep * s.window_size * 8
    return b * (s.num_steps * r + t.updates_per_iter * s.window_size * (3 * g + q))


def window_at(iteration: int, s: GrpoSampling) -> list[int]:
    """The trained SDE steps of an iteration: fixed, or sliding towards t = 0 (MixGRPO, Li et al. 2025,
    arXiv:2507.21802, sec. 3.2) by one step every ``window_slide`` iterations, wrapping back."""
    start = s.window_start
    if s.window_slide > 0:
        span = s.num_steps - s.window_size - s.window_start + 1  # possible starts
        start += (iteration // s.window_slide) % span
    return list(range(start, start + s.window_size))


def advantages(rewards: Tensor, weights: Tensor, train: GrpoTrain) -> Tensor:
    """GRPO advantages [P, G] from rewards [P, G, K] (NaN = missing) and per-prompt weights [P, K].

    ``per_reward`` (the report's multi-reward advantage; `ops.group_advantage`):
        ``A = clip(sum_k w_k (R_k - mu_k) / (sigma_k + eps), -adv_clip, adv_clip)``
    ``combined`` (Flow-GRPO / DanceGRPO with several rewards: combine, then normalise once):
        ``R = sum_k w_k R_k / sum_k w_k`` over the valid rewards, ``A = clip((R - mu) / (sigma + eps))``
    mu and sigma are per group. Per-reward normalisation gives every reward the same share of the
    advantage whatever its spread, so a reward that barely varies in a group (e.g. Fidelity stuck near
    0) has its noise scaled up to +-1; `combined` weighs each reward by its actual spread. A row
    without any valid reward gets 0.
    """
    clip = train.adv_clip or None
    if train.advantage == "combined":
        w = torch.where(rewards.isnan(), torch.zeros_like(rewards), weights[:, None, :])  # [P, G, K]
        total = w.sum(-1)  # [P, G]
        r = (torch.nan_to_num(rewards) * w).sum(-1) / total  # [P, G], NaN where nothing is valid
        r = torch.where(total > 0, r, torch.full_like(r, float("nan")))
        adv = ops.group_advantage(r[..., None], None, eps=train.adv_eps, clip=clip)  # [P, G]
    else:
        adv = ops.group_advantage(rewards, weights, eps=train.adv_eps, clip=clip)  # [P, G]
    return torch.nan_to_num(adv, nan=0.0, posinf=0.0, neginf=0.0)


def _stats(values: list[Tensor]) -> Tensor:
    return torch.cat([v.reshape(-1) for v in values]) if values else torch.zeros(0)


def _nanmean(col: Tensor) -> float:
    ok = ~col.isnan()
    return float(col[ok].mean()) if ok.any() else float("nan")


def group_agreement(trained: Tensor, monitor: Tensor, group_size: int) -> float:
    """Mean over groups of Spearman(trained, monitor) within the group ([B] each, rows grouped by
    `group_size`); groups where either is constant or has fewer than 3 valid rows are skipped (NaN if
    all are). GRPO only uses within-group order, so this is the agreement that matters to it."""
    from qirl.stats import spearman

    values = []
    for a, b in zip(trained.reshape(-1, group_size), monitor.reshape(-1, group_size), strict=True):
        ok = ~(a.isnan() | b.isnan())
        if int(ok.sum()) >= 3:
            rho = spearman(a[ok].numpy(), b[ok].numpy())
            if not np.isnan(rho):
                values.append(rho)
    return float(np.mean(values)) if values else float("nan")


# -------------------------------------------------------------------------------------------- loop


def grpo(recipe: GrpoRecipe, resume: bool = False) -> Iterator[dict[str, Any]]:
    """Run GRPO; yield a metrics dict every `log_every` iterations (and eval rows), then `done`.

    Set-up, checkpoints, evaluation, logging and export are the shared loop's (`qirl.rl.loop`); this
    function supplies one iteration (module docstring, steps 1-4)."""
    validate(recipe)
    session = Session.start(recipe, resume)
    P, G, M = recipe.train.prompts_per_iter, recipe.train.group_size, recipe.train.micro_batch
    s, tr = recipe.sampling, recipe.train
    composite = CompositeReward.from_config(recipe.rewards)
    names = composite.names
    if tr.raft_require and tr.raft_require not in names:
        raise UserError(f"train.raft_require must name a trained reward ({', '.join(names)}), got {tr.raft_require!r}")
    prompts_src = PromptSource(recipe.data.prompts, recipe.data.edit_fraction, composite.category_weights)
    reference: list[Any] = []  # the frozen KL reference; a LoRA run gets it by disabling its adapters instead

    def keep_reference(policy: Any) -> None:
        if (tr.kl_coef > 0 or tr.objective == "dpo") and tr.lora_rank == 0:
            reference.append(copy.deepcopy(policy).requires_grad_(False))

    policy = session.load(recipe.model, prompts_src.tasks, prepare=keep_reference)
    ref = reference[0] if reference else None
    state, world = session.state, session.world
    view, gen, rng = state.view, state.gen, state.rng
    B = P * G  # global rows; this rank's are rows[lo:hi]
    lo, hi = session.mine.start * G, session.mine.stop * G
    B_local = hi - lo
    img_size = policy.image_size  # edit sources are rendered at the decoder's size
    global_chunks = micro_batches(B, M)
    chunks = micro_batches(B_local, M)  # this rank's micro-batches
    monitors = [build_reward(spec.name, **spec.args) for spec in recipe.rewards.monitors]
    monitor_labels = [m.name for m in monitors]
    if len(set(monitor_labels)) != len(monitor_labels):
        raise UserError(f"rewards.monitors: monitor names must be unique, got {monitor_labels}")
    # Prefixed in the service: a monitor may be the same model as a trained reward (e.g. the oracle).
    scorers = dict(zip(names, composite.rewards, strict=True))
    scorers |= {f"monitor/{label}": m for label, m in zip(monitor_labels, monitors, strict=True)}
    service = RewardService(scorers, workers=tr.reward_workers)
    fault_guard = RewardFaultGuard(tr.max_nan_reward_fraction, tr.nan_reward_patience)
    ptx = None
    if tr.ptx_coef > 0:  # each rank draws its own pairs: the ranks' gradients average over all of them
        seed = recipe.run.seed * 1000 + world.rank
        ptx = PretrainMix(tr.ptx_coef, tr.ptx_batch, prompts_src.edit_share, seed, M, view, policy)

    def one_iteration(iteration: int) -> dict[str, Any]:
        window = window_at(iteration, s)
        faults_before = sum(service.faults.values())
        # 1. prompts and conditions (every rank draws the global batch, keeps its groups) -----------
        records = prompts_src.draw(rng, P)
        local = records[session.mine]
        sources = [record_source(r, img_size) for r in local]
        cond = encode_groups(policy, [r.prompt for r in local], sources, G)  # rows 0,0,..,1,1,..
        rows = [r for r in records for _ in range(G)]  # global, for the metrics
        reward_records = [
            RewardRecord(task=r.task, category=r.category, source=src)
            for r, src in zip(local, sources, strict=True)
            for _ in range(G)
        ]
        if s.shared_noise:  # the group differs only by its SDE noises, which the objective credits
            noise = torch.randn((P, *policy.latent_shape), generator=gen).repeat_interleave(G, 0)
        else:
            noise = torch.randn((B, *policy.latent_shape), generator=gen)  # [B, C, H, W]
        noise = noise[lo:hi]  # [B_local, C, H, W]
        step_noise = step_noises(gen, global_chunks, window, policy.latent_shape, lo, hi)
        # 2. rollouts, scoring overlapped ----------------------------------------------------------
        spec = SdeSpec(s.num_steps, s.guidance, s.shift, s.noise_level, s.cfg_mode, window)
        group = roll_out_groups(
            policy, cond, noise, chunks, spec, service, [r.prompt for r in rows[lo:hi]], reward_records,
            generator=gen, step_noise=step_noise, view=view,
        )
        scored, wait_s = group.rewards()  # [B_local, K + monitors]
        rewards = scored[:, : len(names)].reshape(-1, G, len(names))  # [P_local, G, K]
        # 3. advantages (per group, so per rank) ---------------------------------------------------
        weights = composite.weights([r.category for r in local])  # [P_local, K]
        adv = advantages(rewards, weights, tr).reshape(B_local)  # [B_local]
        # 4. policy update -------------------------------------------------------------------------
        t_train = time.perf_counter()
        ratios: list[Tensor] = []
        kls: list[float] = []
        extra: dict[str, float] = {}
        if tr.objective in ("raft", "dpo"):
            ok = None
            if tr.raft_require:  # NaN (a failed scorer) does not pass
                ok = rewards[..., names.index(tr.raft_require)].reshape(B_local) >= tr.raft_threshold
            if tr.objective == "raft":
                anchor = _Reference(policy, ref, tr.kl_coef) if tr.kl_coef > 0 else None
                loss_total, kl_total = _raft_update(
                    view, state, iteration, tr, group.rollouts, cond, adv, ok, G, window, gen, anchor, ptx
                )
                kls.append(kl_total)
            else:
                # updates_per_iter > 1: more AdamW steps on the same pairs, each at fresh (t, eps)
                # draws. The logged accuracy and margin are the first step's: how the policy ranked
                # pairs it had not been trained on.
                reference = _Reference(policy, ref, 0.0)
                steps = [
                    _dpo_update(
                        view, state, iteration, tr, group.rollouts, cond, adv, ok, G, window, gen, reference, ptx
                    )
                    for _epoch in range(tr.updates_per_iter)
                ]  # [(loss, metrics)] per AdamW step
                loss_total = sum(loss for loss, _ in steps) / len(steps)
                extra = steps[0][1]
            ratios.append(torch.ones(1))  # no importance ratio in RAFT or DPO: logged as 1
        else:
            passes = [(k, n) for k in range(len(chunks)) for n in window]
            for _epoch in range(tr.updates_per_iter):
                state.opt.zero_grad(set_to_none=True)
                loss_total = ptx(iteration) if ptx is not None else 0.0
                finite = True
                for k, n in passes:
                    (a, b), ro = chunks[k], group.rollouts[k]
                    c_mb = cond.index(slice(a, b))
                    # Each rank's loss is the mean over its rows; DDP/FSDP average the gradients, which
                    # is the global mean because every rank has B_local rows.
                    share = (b - a) / (B_local * len(window))
                    # The reference velocity comes first: with LoRA it is the policy with its adapters
                    # switched off, which must not happen between the forward and its backward.
                    v_ref = _reference_velocity(policy, ref, ro, n, c_mb) if tr.kl_coef > 0 else None
                    with sync_gradients(view, last=(k, n) == passes[-1]):
                        logp, v_c = trajectory_logprob(
                            view, ro, n, c_mb, return_velocity=True, detach_uncond=s.detach_uncond
                        )  # [b - a], [b - a, C, H, W]
                        a_mb = adv[a:b].to(logp.device)  # [b - a]
                        ratio = torch.exp(logp - ro.logps_old[n])
                        clipped = ratio.clamp(1 - tr.clip_range, 1 + tr.clip_range)
                        loss = -torch.minimum(ratio * a_mb, clipped * a_mb).mean()
                        if v_ref is not None:  # on the surrogate's own forward: no second forward/backward
                            kl = _kl(v_c, v_ref, ro, n, tr.kl_space)
                            loss = loss + tr.kl_coef * kl
                            kls.append(float(kl.detach()))
                        loss = loss * share
                        if not torch.isfinite(loss):
                            finite = False
                        loss_total += float(loss.detach())
                        loss.backward()
                    ratios.append(ratio.detach().float().cpu())
                state.step(finite, iteration, tr)  # a skipped step leaves the weights untouched
        train_s = time.perf_counter() - t_train
        # 5. metrics (gathered over ranks: the global batch) -----------------------------------------
        r_all = world.gather_rows(_stats(ratios))
        flat = world.gather_rows(rewards.reshape(B_local, len(names)))  # [B, K]
        fault_guard.check(flat, service.faults)  # the global batch: every rank stops alike
        adv = world.gather_rows(adv)  # [B]
        combined = composite.combined(flat, [r.category for r in rows])
        row: dict[str, Any] = {}
        for k, name in enumerate(names):
            row[f"reward/{name}"] = _nanmean(flat[:, k])
        if monitors:
            watched = world.gather_rows(scored[:, len(names) :].contiguous())  # [B, monitors]
            for k, label in enumerate(monitor_labels):
                row[f"monitor/{label}"] = _nanmean(watched[:, k])
                row[f"monitor_agreement/{label}"] = group_agreement(combined, watched[:, k], G)
        valid = ~combined.isnan()
        row.update(
            {
                "reward": float(combined[valid].mean()) if valid.any() else float("nan"),
                "adv_std": float(adv.std()),
                "loss": world.mean(loss_total),
                "ratio_mean": float(r_all.mean()),
                "ratio_max": float(r_all.max()),
                "clip_frac": float(((r_all - 1).abs() > tr.clip_range).float().mean()),
                "kl": world.mean(float(np.mean(kls))) if kls else 0.0,
                "reward_faults": sum(service.faults.values()) - faults_before,
                "window": window[0],
                "rollout_s": group.rollout_s,
                "reward_wait_s": wait_s,
                "train_s": train_s,
            }
        )
        if ptx is not None:
            extra["ptx"] = ptx.last
        row.update({k: world.mean(v) for k, v in extra.items()})
        return row

    try:
        yield from session.loop(one_iteration, nfe_per_iteration(recipe))
    finally:
        service.close(wait=True)
    yield session.finish(reward_faults=dict(service.faults))


@torch.no_grad()
def _reference_velocity(policy: Any, reference: Any | None, ro: Any, n: int, cond: Any) -> Tensor:
    """The frozen reference's conditional velocity [b, C, H, W] fp32 at the recorded state n: the copy
    ``reference``, or, for a LoRA run (``reference`` None), the policy with its adapters disabled (the
    base weights themselves, so no copy of the model is kept)."""
    x_n = ro.state(n)  # [b, C, H, W]
    t_n = torch.full((x_n.shape[0],), float(ro.timesteps[n]), dtype=torch.float32, device=x_n.device)  # [b]
    if reference is not None:
        return reference.velocity(x_n, t_n, cond).float()
    with adapters_disabled(policy):
        return policy.velocity(x_n, t_n, cond).float()


def _kl(v: Tensor, v_ref: Tensor, ro: Any, n: int, space: str) -> Tensor:
    """KL regulariser at the recorded state n, CFG-free, on the policy's conditional velocity v (with
    grad): ``mean ||v - v_ref||^2`` (velocity) or the Gaussian KL of the SDE transition,
    ``sde_kl_factor * mean ||v - v_ref||^2`` (mean; Flow-GRPO, Liu et al. 2025, eq. 6)."""
    sq = (v.float() - v_ref.float()).square().mean()  # fp32 whatever the model's dtype
    if space == "mean":
        sq = sq * sde_kl_factor(float(ro.timesteps[n]), float(ro.timesteps[n + 1]), ro.noise_level)
    return sq


def raft_rows(adv: Tensor, group_size: int, keep: int, ok: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The rows RAFT trains on: per group the ``keep`` highest advantages (indices [P keep] into the
    flat [P G] rows) and their weights. Without ``ok`` a row counts where A > 0 (a group whose rows
    all tie teaches nothing). With ``ok`` [P G] (rejection sampling: the row passed the required
    reward) the rows that pass rank first and exactly those count, whatever their A: otherwise a group
    where every row fails the instruction would teach its least-changed output, that is, not to edit.
    Every group contributes ``keep`` rows, so every rank runs the same number of passes."""
    rank = adv if ok is None else torch.where(ok, adv, adv - 1e6)  # passing rows first
    top = rank.reshape(-1, group_size).topk(keep, dim=1).indices  # [P, keep]
    rows = (top + torch.arange(top.shape[0])[:, None] * group_size).reshape(-1)  # [P keep]
    return rows, ((adv[rows] > 0) if ok is None else ok[rows]).float()


def _train_times(tr: GrpoTrain, grid: Tensor, window: list[int], n: int, gen: torch.Generator) -> Tensor:
    """RAFT's and DPO's t [n]: uniform over the times the SDE window's steps span (``raft_times=window``;
    ``grid`` [N + 1] from 1 to 0) or SD3's logit-normal over (0, 1) (``all``)."""
    if tr.raft_times == "window":
        t_hi, t_lo = float(grid[window[0]]), float(grid[window[-1] + 1])
        return t_lo + (t_hi - t_lo) * torch.rand(n, generator=gen)
    return sample_train_t(n, gen)


def _raft_update(
    view: Any, state: Any, iteration: int, tr: GrpoTrain, rollouts: list[Any], cond: Any, adv: Tensor,
    ok: Tensor | None, group_size: int, window: list[int], gen: torch.Generator, anchor: _Reference | None,
    ptx: PretrainMix | None = None,
) -> tuple[float, float]:
    """One AdamW step of reward-ranked fine-tuning (RAFT; Dong et al. 2023, arXiv:2304.06767): the
    conditional flow-matching loss (`qirl.sampling.flow_matching_loss`) on each group's best rollouts,

        ``L = sum_i w_i E_{t, eps} || v_theta(x_t, t, c_i) - (eps - x0_i) ||^2 / sum_i w_i``,

    x0_i the rollout's final latents, ``W`` (t, eps) pairs per row (W the window's size), t uniform
    over the times the SDE window spans (``raft_times=window``: the steps where an outcome is decided,
    docs/grpo.md; the few-step samples' missing detail, learned at low t, is not taught) or SD3's
    logit-normal over (0, 1) (``all``). v_theta is the velocity the rollout sampled with: the guided
    ``v_u + s (v_c - v_u)`` in `both`, the conditional one in `hybrid` and `none`. In `hybrid` the
    conditional velocity learns guided samples, and sampling with guidance then guides them again. It
    regresses on the whole path towards the selected samples instead of crediting the window's noises,
    so its gradient has none of the surrogate's sampling noise; the price is that rows below the best
    teach nothing. With an ``anchor`` (``kl_coef`` > 0) the rows not kept, as many as were kept, hold
    their velocity at the frozen reference's at their own noised latents, ``kl_coef mean || v_theta -
    v_ref ||^2``, so what is learned on the kept rows does not drift the rest. The anchor's t is the
    kept rows' draw (``raft_anchor_times=kept``) or its own logit-normal draw over (0, 1) (``all``:
    it also holds the low-noise steps, where the outputs' detail is drawn). ``ptx`` adds the pretraining
    mix (`qirl.rl.ptx`) to the same step. Returns (loss, anchor term)."""
    latents = torch.cat([ro.latents for ro in rollouts])  # [B_local, C, H, W]
    draws = len(window)
    guidance = rollouts[0].guidance
    guided = rollouts[0].cfg_mode == "both" and guidance > 1.0
    rows, w = raft_rows(adv, group_size, tr.raft_keep, ok)  # [R], [R]
    others = torch.ones(len(adv), dtype=torch.bool)
    others[rows[w > 0]] = False
    pool = others.nonzero().reshape(-1)  # the rows not learned from
    held = pool[torch.randperm(len(pool), generator=gen)[: len(rows)]]  # [<= R] anchor rows
    norm = max(float(w.sum()), 1.0) * draws
    chunks_r = micro_batches(len(rows), tr.micro_batch)
    passes = [(k, d) for k in range(len(chunks_r)) for d in range(draws)]
    kl_total, finite = 0.0, True
    state.opt.zero_grad(set_to_none=True)
    loss_total = ptx(iteration) if ptx is not None else 0.0
    for k, _d in passes:
        a, b = chunks_r[k]
        idx = rows[a:b]
        x0 = latents[idx]  # [b - a, C, H, W]
        t = _train_times(tr, rollouts[0].timesteps, window, b - a, gen).to(x0.device)  # [b - a]
        eps = torch.randn(x0.shape, generator=gen).to(x0.device)  # [b - a, C, H, W]
        h = held[a:b] if anchor is not None else held[:0]
        if len(h):  # the reference first: with LoRA it switches the adapters off (see _reference_velocity)
            t_h = t[: len(h)] if tr.raft_anchor_times == "kept" else sample_train_t(len(h), gen).to(t.device)
            x_h, c_h = add_noise(latents[h], eps[: len(h)], t_h), cond.index(h)  # [h, C, H, W]
            v_ref = anchor.reference_velocity(x_h, t_h, c_h)  # [h, C, H, W]
        with sync_gradients(view, last=(k, _d) == passes[-1]):
            c = cond.index(idx)
            uncond = view.null_condition(c) if guided else None
            v = guided_velocity(view, add_noise(x0, eps, t), t, c, uncond, guidance)  # [b - a, C, H, W]
            per_row = (v.float() - (eps - x0).float()).square().mean(dim=(1, 2, 3))  # [b - a]
            loss = (per_row * w[a:b].to(per_row.device)).sum() / norm
            if len(h):
                sq = (view.velocity(x_h, t_h, c_h).float() - v_ref).square().mean()
                kl = sq * len(h) / (len(held) * draws)  # this pass's share of the mean over held rows
                loss = loss + anchor.coef * kl
                kl_total += float(kl.detach())
            finite = finite and bool(torch.isfinite(loss))
            loss_total += float(loss.detach())
            loss.backward()
    state.step(finite, iteration, tr)
    return loss_total, kl_total


def dpo_pairs(adv: Tensor, group_size: int, keep: int, ok: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """DPO's pairs per group: the ``keep`` rows RAFT would keep (`raft_rows`) against the ``keep`` lowest
    advantages, best with worst. Returns winners [P keep], losers [P keep] (flat row indices) and
    weights [P keep]: 1 where the winner counts for RAFT and is strictly better than its loser."""
    winners, w = raft_rows(adv, group_size, keep, ok)
    bottom = (-adv).reshape(-1, group_size).topk(keep, dim=1).indices  # [P, keep], worst first
    losers = (bottom + torch.arange(bottom.shape[0])[:, None] * group_size).reshape(-1)  # [P keep]
    return winners, losers, w * (adv[winners] > adv[losers]).float()


def _dpo_update(
    view: Any, state: Any, iteration: int, tr: GrpoTrain, rollouts: list[Any], cond: Any, adv: Tensor,
    ok: Tensor | None, group_size: int, window: list[int], gen: torch.Generator, reference: _Reference,
    ptx: PretrainMix | None = None,
) -> tuple[float, dict[str, float]]:
    """One AdamW step of online Diffusion-DPO (Wallace et al. 2023, arXiv:2311.12908, eq. 14; in flow
    matching's velocity form as Flow-DPO, Liu et al. 2025, arXiv:2501.13918) on each group's pairs
    (`dpo_pairs`). For a pair (w, l) at one shared (t, eps), with ``e_m(x0) = || v_m(x_t, t, c) - (eps -
    x0) ||^2`` (mean over latent dims, ``x_t = (1 - t) x0 + t eps``) for the policy m = theta and the
    frozen reference m = ref,

        ``L = - log sigmoid( -beta / 2 [ (e_theta(w) - e_ref(w)) - (e_theta(l) - e_ref(l)) ] )``,

    averaged over the pairs (by weight) and ``W`` draws of (t, eps) per pair, t as RAFT's
    (``raft_times``). The policy lowers its error on the better output relative to the reference more
    than on the worse one: what the two share, the rollouts' common look, cancels, so only what tells
    them apart is learned, and the reference holds the rest (the sigmoid saturates once the gap is a
    few times ``1 / beta``, which bounds how far a pair moves the policy). v_theta is the conditional
    velocity (CFG-free, as `hybrid`). Returns (loss, metrics): ``dpo_accuracy``, the share of pairs
    whose implicit reward ranks the winner first, and ``dpo_margin``, the mean of the sigmoid's
    argument. ``ptx`` adds the pretraining mix to the step."""
    latents = torch.cat([ro.latents for ro in rollouts])  # [B_local, C, H, W]
    draws = len(window)
    winners, losers, w = dpo_pairs(adv, group_size, tr.raft_keep, ok)  # [R], [R], [R]
    norm = max(float(w.sum()), 1.0) * draws
    chunks_r = micro_batches(len(winners), max(tr.micro_batch // 2, 1))  # two rows per pair in a forward
    passes = [(k, d) for k in range(len(chunks_r)) for d in range(draws)]
    finite = True
    margins: list[Tensor] = []
    state.opt.zero_grad(set_to_none=True)
    loss_total = ptx(iteration) if ptx is not None else 0.0
    for k, _d in passes:
        a, b = chunks_r[k]
        idx = torch.cat([winners[a:b], losers[a:b]])  # [2 n]: winners then losers
        x0 = latents[idx]  # [2 n, C, H, W]
        t = _train_times(tr, rollouts[0].timesteps, window, b - a, gen)  # [n]
        eps = torch.randn((b - a, *x0.shape[1:]), generator=gen)  # [n, C, H, W], shared by a pair
        t, eps = t.repeat(2).to(x0.device), eps.repeat(2, 1, 1, 1).to(x0.device)  # [2 n], [2 n, C, H, W]
        x_t, target, c = add_noise(x0, eps, t), (eps - x0).float(), cond.index(idx)
        # The reference first: with LoRA it switches the adapters off (see _reference_velocity).
        e_ref = (reference.reference_velocity(x_t, t, c) - target).square().mean(dim=(1, 2, 3))  # [2 n]
        with sync_gradients(view, last=(k, _d) == passes[-1]):
            e = (view.velocity(x_t, t, c).float() - target).square().mean(dim=(1, 2, 3))  # [2 n]
            gap = (e - e_ref).reshape(2, b - a)  # [2, n]: winners' row, losers' row
            inside = -0.5 * tr.dpo_beta * (gap[0] - gap[1])  # [n]
            loss = -(torch.nn.functional.logsigmoid(inside) * w[a:b].to(inside.device)).sum() / norm
            finite = finite and bool(torch.isfinite(loss))
            loss_total += float(loss.detach())
            loss.backward()
        margins.append(inside.detach().float().cpu()[w[a:b] > 0])
    state.step(finite, iteration, tr)
    m = torch.cat(margins)  # NaN when no pair counts (every rank logs the same keys)
    return loss_total, {"dpo_margin": _nanmean(m), "dpo_accuracy": _nanmean((m > 0).float())}


@dataclass
class _Reference:
    """The frozen reference's conditional velocity at noised latents ``x_t = (1 - t) x0 + t eps``: the
    frozen copy or, for LoRA, the policy with its adapters off. RAFT's anchor weighs
    ``coef mean || v_theta(x_t, t, c) - v_ref(x_t, t, c) ||^2`` (CFG-free, velocity space, as GRPO's
    `_kl`); DPO compares the policy's errors with the reference's (coef unused)."""

    policy: Any
    reference: Any | None
    coef: float

    @torch.no_grad()
    def reference_velocity(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        if self.reference is not None:
            return self.reference.velocity(x_t, t, cond).float()
        with adapters_disabled(self.policy):
            return self.policy.velocity(x_t, t, cond).float()
