"""Per-sample time arguments, without importing Triton (`qirl.ops` uses this before any backend is chosen)."""

from __future__ import annotations

import torch


def per_sample_scalar(
    value: float | torch.Tensor, batch: int, device: torch.device, name: str
) -> torch.Tensor:
    """Turn a time-like argument (`t`, `dt`) into an fp32 vector [B] on `device`.

    A Python float or a 0-d tensor is shared by the batch; a [B] tensor gives each sample its own
    value (distillation draws a step per sample). fp32 whatever the input: the scalars enter every
    element's formula, and fp64 would promote the whole chain (DESIGN: scalars as fp32).
    """
    if isinstance(value, torch.Tensor):
        if value.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name} must not require grad: no gradient flows to the schedule")
        if value.dim() == 0 or value.numel() == 1:
            return value.detach().reshape(1).to(device=device, dtype=torch.float32).expand(batch).contiguous()
        if value.shape != (batch,):
            raise ValueError(
                f"{name} must be a float, a 0-d tensor or a [B={batch}] tensor, got {tuple(value.shape)}"
            )
        return value.detach().to(device=device, dtype=torch.float32).contiguous()
    value = float(value)
    return torch.full((batch,), value, dtype=torch.float32, device=device)
