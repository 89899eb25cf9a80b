"""Group rollouts, shared by GRPO and prompt curation: G SDE samples per prompt, scored as they finish.

Each prompt is encoded once (the text encoder is frozen) and its condition repeated G times; micro-batch
by micro-batch the rows are rolled out with `sample_sde` (no grad), decoded, and handed to the
`RewardService`, so scoring one micro-batch overlaps the rollout of the next. The caller chooses the
initial and SDE noises (GRPO: drawn from its run generator as one process would draw them; curation:
`image_noise` per prompt, so a prompt's group does not depend on the batch it falls in).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from torch import Tensor

from qirl.models.policy import Condition, FlowPolicy
from qirl.rewards.base import RewardRecord
from qirl.rewards.service import RewardService
from qirl.sampling import Rollout, sample_sde


@dataclass
class SdeSpec:
    """How a group is rolled out (`sample_sde`'s options)."""

    num_steps: int
    guidance: float
    shift: float
    noise_level: float
    cfg_mode: str
    window: list[int] | None  # SDE steps (grid index from t = 1); None: every step


@dataclass
class GroupRollout:
    rollouts: list[Rollout]  # one per micro-batch, rows in order
    futures: list[Future[Tensor]]  # rewards [b, K] of each micro-batch
    rollout_s: float  # wall time of the rollouts (scoring overlaps it)

    def rewards(self) -> tuple[Tensor, float]:
        """(rewards [rows, K], seconds spent waiting for the scorers after the last rollout)."""
        t0 = time.perf_counter()
        out = torch.cat([f.result() for f in self.futures])
        return out, time.perf_counter() - t0


@torch.no_grad()
def encode_groups(
    policy: FlowPolicy, prompts: Sequence[str], sources: Sequence[Tensor | None], group_size: int
) -> Condition:
    """Each prompt's condition once, repeated ``group_size`` times: rows 0,0,..,1,1,.."""
    return policy.encode(list(prompts), list(sources)).detach().repeat_interleave(group_size)


def roll_out_groups(
    policy: FlowPolicy,
    cond: Condition,
    noise: Tensor,
    chunks: Sequence[tuple[int, int]],
    spec: SdeSpec,
    service: RewardService,
    prompts: Sequence[str],
    records: Sequence[RewardRecord],
    *,
    generator: torch.Generator,
    step_noise: dict[int, Tensor] | None = None,
    view: FlowPolicy | None = None,
    cond_logprobs: bool = True,
) -> GroupRollout:
    """Roll out rows ``cond`` [R] from ``noise`` [R, C, H, W] in micro-batches ``chunks`` and submit each
    decoded micro-batch to ``service`` with its ``prompts`` / ``records`` (one per row). ``view`` is what
    computes velocities (GRPO's DDP view; default the policy); ``step_noise`` {n: [R, C, H, W]} fixes
    the SDE noises; ``cond_logprobs=False`` skips the CFG-free log-probs nobody trains on."""
    view = policy if view is None else view
    rollouts, futures = [], []
    t0 = time.perf_counter()
    for a, b in chunks:
        ro = sample_sde(
            view,
            cond.index(slice(a, b)),
            spec.num_steps,
            guidance=spec.guidance,
            shift=spec.shift,
            noise_level=spec.noise_level,
            cfg_mode=spec.cfg_mode,
            sde_window=spec.window,
            generator=generator,
            noise=noise[a:b],
            step_noise=None if step_noise is None else {n: eps[a:b] for n, eps in step_noise.items()},
            cond_logprobs=cond_logprobs,
        )
        rollouts.append(ro)
        with torch.no_grad():
            images = policy.decode(ro.latents)  # [b - a, 3, H, W]
        futures.append(service.submit(images, list(prompts[a:b]), list(records[a:b])))
    return GroupRollout(rollouts, futures, time.perf_counter() - t0)
