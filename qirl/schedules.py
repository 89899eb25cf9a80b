"""Learning-rate and EMA-decay schedules, one copy for every trainer (pretraining, reward models, RL)."""

from __future__ import annotations

import math


def lr_at(step: int, lr: float, warmup_steps: int, total_steps: int | None = None) -> float:
    """``lr`` after a linear warm-up over ``warmup_steps`` steps; then constant (``total_steps`` None: the
    RL trainers, whose runs are often extended) or a cosine decay to 10% at ``total_steps`` (pretraining
    and reward models: a common flow-matching / fine-tuning schedule, Loshchilov & Hutter 2017)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if total_steps is None:
        return lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay with warm-up, min(decay, (1 + step) / (10 + step)) (diffusers' EMAModel, Tarvainen &
    Valpola 2017): a fixed 0.999 would still weigh the zero-output initial model by 0.999^2000 = 14%
    after 2000 steps."""
    return min(decay, (1 + step) / (10 + step))
