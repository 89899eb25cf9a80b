"""Velocity-matching loss of on-policy distillation, forward and fused backward.

Formula (DESIGN, on-policy distillation; the per-step term of L = sum_n || v_s(x_n) - v_T(x_n) ||^2,
normalised by the number of latent elements so that the loss scale does not depend on resolution):

    mse_b = (1 / N) sum_i (s_bi - t_bi)^2          per sample, N elements per sample
    loss  = (1 / B) sum_b mse_b
    d mse_b / d s_bi = 2 (s_bi - t_bi) / N         (so d loss / d s = 2 (s - t) / (N B))
    d mse_b / d t_bi = -2 (s_bi - t_bi) / N        (only if the teacher requires grad)

The forward reads s and t once and writes B floats; the backward reads s and t once more and writes the
gradient. Saving `s - t` in the forward instead would move as many bytes in total (one more write
forward, one read fewer backward) and hold a full-size tensor between the passes, so it recomputes.
Squares are summed in fp32 whatever the input dtype; NaN and inf propagate into their own sample's
value only, never into another sample's.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._runtime import (
    FP_FUSION,
    HAS_TRITON,
    block_for,
    empty,
    launch_device,
    rows,
    tl,
    triton,
)

__all__ = ["VelocityMSEOutput", "velocity_mse_ref", "velocity_mse_triton"]


class VelocityMSEOutput(NamedTuple):
    """loss: scalar fp32, the mean of per_sample; per_sample: [B] fp32 (fp64 for fp64 inputs)."""

    loss: torch.Tensor
    per_sample: torch.Tensor


def _check_args(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} shapes differ")
    if student.dim() < 1:
        raise ValueError("velocities must have a leading batch dimension")
    if student.shape[0] > 0 and student.numel() == 0:
        raise ValueError(f"velocities of shape {tuple(student.shape)}: a sample with no elements has no MSE")


def velocity_mse_ref(
    student: torch.Tensor, teacher: torch.Tensor, *, upcast: bool = True
) -> VelocityMSEOutput:
    """Per-sample MSE and its mean in plain torch; differentiable by autograd in both inputs.

    `upcast=False` computes in the inputs' dtype (the tests' measure of torch's own error).
    """
    _check_args(student, teacher)
    cdt = torch.promote_types(student.dtype, teacher.dtype)
    if upcast:
        cdt = torch.promote_types(cdt, torch.float32)
    diff = rows(student).to(cdt) - rows(teacher).to(cdt)  # [B, N]
    per_sample = (diff * diff).mean(dim=1)  # [B]
    out = torch.float64 if cdt == torch.float64 else torch.float32
    per_sample = per_sample.to(out)
    return VelocityMSEOutput(per_sample.mean(), per_sample)


if HAS_TRITON:

    @triton.jit
    def _velocity_mse_fwd_kernel(
        # [B, N] contiguous, any float dtype
        s_ptr,
        t_ptr,
        part_ptr,  # [B, n_tiles] fp32 partial sums of (s - t)^2 / N
        inv_n,  # fp32 scalar 1 / N
        N,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        tile = tl.program_id(1)
        cols = tile.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < N
        offs = row * N + cols  # int64 offsets
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = s - t
        tl.store(part_ptr + row * tl.num_programs(1) + tile, tl.sum(d * d, axis=0) * inv_n)

    @triton.jit
    def _velocity_mse_bwd_kernel(
        g_ptr,  # [B] fp32: d loss / d mse_b
        # [B, N] contiguous
        s_ptr,
        t_ptr,
        # [B, N] gradient outputs, written if NEED_S / NEED_T
        gs_ptr,
        gt_ptr,
        two_inv_n,  # fp32 scalar 2 / N
        N,
        NEED_S: tl.constexpr,
        NEED_T: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        tile = tl.program_id(1)
        cols = tile.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < N
        offs = row * N + cols
        coef = tl.load(g_ptr + row) * two_inv_n
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        grad = (s - t) * coef
        if NEED_S:
            tl.store(gs_ptr + offs, grad.to(gs_ptr.dtype.element_ty), mask=mask)
        if NEED_T:
            tl.store(gt_ptr + offs, (-grad).to(gt_ptr.dtype.element_ty), mask=mask)


def _velocity_mse_forward(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Forward launch: per-sample MSE [B] fp32 (no autograd; the registered op `qirl.kernels._ops.velocity_mse` has the backward)."""
    batch = student.shape[0]
    n = math.prod(student.shape[1:])
    s2 = rows(student).contiguous()  # [B, N]
    t2 = rows(teacher).contiguous()  # [B, N]
    block = block_for(n)
    n_tiles = triton.cdiv(n, block)
    part = empty((batch, n_tiles), torch.float32, student.device)  # [B, n_tiles]
    if batch and n:
        with launch_device(student):
            _velocity_mse_fwd_kernel[(batch, n_tiles)](
                s2, t2, part, 1.0 / n, n, BLOCK=block, num_warps=4, enable_fp_fusion=FP_FUSION
            )
    # fixed-order reduction of the tiles (deterministic, unlike atomics); no launch for one tile
    return part.view(-1) if n_tiles == 1 else part.sum(dim=1)


def _velocity_mse_backward(
    grad: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, need_s: bool, need_t: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    batch = student.shape[0]
    n = math.prod(student.shape[1:])
    s2 = rows(student).contiguous()  # [B, N]
    t2 = rows(teacher).contiguous()  # [B, N]
    gs = empty((batch, n), student.dtype, student.device) if need_s else None  # [B, N]
    gt = empty((batch, n), teacher.dtype, teacher.device) if need_t else None  # [B, N]
    block = block_for(n)
    if batch and n and (need_s or need_t):
        g = grad.reshape(batch).to(torch.float32).contiguous()  # [B]
        with launch_device(student):
            _velocity_mse_bwd_kernel[(batch, triton.cdiv(n, block))](
                g,
                s2,
                t2,
                gs if gs is not None else s2,
                gt if gt is not None else s2,
                2.0 / n,
                n,
                NEED_S=need_s,
                NEED_T=need_t,
                BLOCK=block,
                num_warps=4,
                enable_fp_fusion=FP_FUSION,
            )
    return (
        gs.view(student.shape) if gs is not None else None,
        gt.view(teacher.shape) if gt is not None else None,
    )


def velocity_mse_triton(student: torch.Tensor, teacher: torch.Tensor) -> VelocityMSEOutput:
    """Triton path of `velocity_mse_ref`: the per-sample MSE from the kernel, the loss as its mean."""
    from qirl.kernels._ops import velocity_mse  # the registered op: fused forward, fused backward

    per_sample = velocity_mse(student, teacher)  # [B] fp32
    return VelocityMSEOutput(per_sample.mean(), per_sample)
