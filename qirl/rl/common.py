"""Pieces both RL trainers (GRPO and distillation) share: the trained state and its checkpoints, lr
warm-up and the EMA of the trained weights."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from qirl.checkpoint import load_checkpoint, save_checkpoint
from qirl.config import dump_recipe
from qirl.errors import UserError
from qirl.pretrain import ema_decay_at
from qirl.rl.lora import TINY_DIT_TARGETS, add_lora


def lr_at(iteration: int, train: Any) -> float:
    """``train.lr`` after a linear warm-up over ``train.warmup_steps`` iterations, then constant."""
    if iteration < train.warmup_steps:
        return train.lr * (iteration + 1) / train.warmup_steps
    return train.lr


@torch.no_grad()
def ema_update(ema: dict[str, Tensor], params: dict[str, Tensor], iteration: int, decay: float) -> None:
    """``ema <- d ema + (1 - d) theta`` with the warmed-up decay ``d = min(decay, (1 + n) / (10 + n))``
    (`qirl.pretrain.ema_decay_at`, as diffusers' EMAModel)."""
    d = ema_decay_at(iteration, decay)
    for name, p in params.items():
        ema[name].lerp_(p.detach(), 1.0 - d)


@contextmanager
def ema_weights(params: dict[str, Tensor], ema: dict[str, Tensor] | None) -> Iterator[None]:
    """Run the block with the EMA weights in place of the trained ones (no-op without EMA)."""
    if ema is None:
        yield
        return
    saved = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(ema[n])
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])


@dataclass
class TrainState:
    """What both RL trainers train and checkpoint: the trained weights (full DiT or LoRA adapters, by
    name), their optional EMA, AdamW, the numpy data RNG, the torch generator and the iteration."""

    params: list[torch.nn.Parameter]
    named: dict[str, Tensor]
    ema: dict[str, Tensor] | None
    opt: torch.optim.Optimizer
    rng: np.random.Generator
    gen: torch.Generator
    iteration: int = 0

    @classmethod
    def create(cls, policy: Any, train: Any, seed: int) -> TrainState:
        """Freeze all but the trained weights (``train.lora_rank`` > 0: LoRA adapters through peft; else
        the policy's `trainable_parameters`), then AdamW, the EMA copy and seeded RNGs."""
        if train.lora_rank > 0:
            targets = train.lora_targets
            if targets == "auto":  # the policy knows its attention/MLP projections
                targets = getattr(policy, "default_lora_targets", TINY_DIT_TARGETS)
            params = add_lora(policy, train.lora_rank, train.lora_alpha, targets)
        else:
            params = list(policy.trainable_parameters())
            trainable = {id(p) for p in params}
            for p in policy.parameters():
                p.requires_grad_(id(p) in trainable)
        named = {n: p for n, p in policy.named_parameters() if p.requires_grad}
        ema = {n: p.detach().clone() for n, p in named.items()} if train.ema_decay > 0 else None
        opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
        return cls(params, named, ema, opt, np.random.default_rng(seed), torch.Generator().manual_seed(seed))

    def restore(self, path: Path, policy: Any) -> None:
        """Load a checkpoint written by `save`; a mismatched one (other model or LoRA setting) is a UserError."""
        ckpt = load_checkpoint(path)
        missing = set(self.named) - set(ckpt.tensors["model"])
        if missing:
            raise UserError(
                f"{path}: checkpoint lacks weights {sorted(missing)[:3]}; was it made from another model or LoRA setting?"
            )
        policy.load_state_dict(ckpt.tensors["model"], strict=False)
        self.opt.load_state_dict(ckpt.nested("optimizer"))
        if self.ema is not None and "ema" in ckpt.tensors:
            self.ema = {n: ckpt.tensors["ema"][n].clone() for n in self.named}
        self.rng.bit_generator.state = ckpt.state["data_rng"]
        self.gen.set_state(ckpt.tensors["rng"]["torch"])
        self.iteration = ckpt.step

    def step(self, finite: bool, iteration: int, train: Any) -> tuple[float, bool]:
        """Clip the accumulated gradients to ``train.grad_clip`` and take one AdamW step (then the EMA),
        unless the loss or the gradient norm is not finite: then the step is skipped and weights and
        optimizer state stay untouched. Returns (gradient norm before clipping, skipped)."""
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, train.grad_clip))
        skipped = not (finite and math.isfinite(grad_norm))
        if skipped:
            self.opt.zero_grad(set_to_none=True)
        else:
            self.opt.step()
            if self.ema is not None:
                ema_update(self.ema, self.named, iteration, train.ema_decay)
        return grad_norm, skipped

    def save(self, out: Path, iteration: int, recipe: Any, keep: int) -> Path:
        """Atomic checkpoint of everything `restore` needs (`qirl.checkpoint.save_checkpoint`)."""
        tensors = {"model": {n: p.detach().clone() for n, p in self.named.items()}, "rng": {"torch": self.gen.get_state()}}
        if self.ema is not None:
            tensors["ema"] = self.ema
        return save_checkpoint(
            out,
            iteration,
            tensors,
            {"data_rng": self.rng.bit_generator.state, "recipe": dump_recipe(recipe)},
            nested={"optimizer": self.opt.state_dict()},
            keep=keep,
        )
