"""Pieces both RL trainers (GRPO and distillation) share: lr warm-up and the EMA of trained weights."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from qirl.pretrain import ema_decay_at


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
