"""The pretraining mix of an RL step (PPO-ptx; Ouyang et al. 2022, arXiv:2203.02155, eq. 2).

Each RL step adds ``ptx_coef`` times the pretraining objective, the flow-matching loss

    ``L_ptx = E_{(c, x0) ~ D_pre, t, eps} || v_theta(x_t, t, c) - (eps - x0) ||^2``,  ``x_t = (1 - t) x0 + t eps``,

on ``ptx_batch`` fresh pairs from the Shapes world's training split (`qirl.pretrain.draw_batch`: the
base's own pretraining distribution, never the `val-*` or `heldout-*` sets), with SD3's logit-normal t
as in pretraining. The RL update learns from the policy's own samples; this term keeps the policy on
the pretraining data of every task and edit kind at the same time, so what the rewards teach on a few
kinds does not drift the others (docs/grpo.md, "Editing RL, fourth round").

The batch of iteration i is drawn from a generator seeded by (run seed, i), not from the run's
checkpointed stream, so a resumed run draws exactly what the uninterrupted one did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qirl.distributed import sync_gradients
from qirl.pretrain import PretrainData, draw_batch
from qirl.rl.common import micro_batches
from qirl.sampling import flow_matching_loss

_STREAM = 0x707478  # "ptx": keeps these draws apart from any other generator seeded by the run seed


@dataclass
class PretrainMix:
    """``coef * L_ptx`` on ``batch`` Shapes pairs a step, ``edit_fraction`` of them edits. ``view``
    computes the velocities (the DDP view or the policy), ``policy`` encodes the conditions."""

    coef: float
    batch: int
    edit_fraction: float
    seed: int
    micro_batch: int
    view: Any
    policy: Any
    last: float = 0.0  # the term's value at the latest step

    def __call__(self, iteration: int) -> float:
        """Accumulate the gradient of ``coef * L_ptx`` for ``iteration`` (no all-reduce: the RL passes
        that follow end with it); returns the term's value."""
        view, policy = self.view, self.policy
        rng = np.random.default_rng([self.seed, iteration, _STREAM])
        data = PretrainData(edit_fraction=self.edit_fraction, task_mix="row")  # caption dropout 0.1 as pretraining
        batch = draw_batch(rng, self.batch, data, policy.image_size)
        with torch.no_grad():  # the text encoder stays frozen, as in the RL passes
            cond = policy.encode(batch.prompts, batch.sources).detach()
        x0 = policy.encode_images(batch.targets.to(policy.device))  # [batch, C, H, W]
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        total = 0.0
        for a, b in micro_batches(self.batch, self.micro_batch):
            with sync_gradients(view, last=False):
                fm = flow_matching_loss(view, x0[a:b], cond.index(slice(a, b)), generator=gen)
                loss = self.coef * fm * (b - a) / self.batch
                loss.backward()
            total += float(loss.detach())
        self.last = total
        return total
