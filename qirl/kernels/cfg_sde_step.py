"""Fused classifier-free guidance + flow-matching SDE step + Gaussian transition log-prob.

Why fused: a GRPO rollout step with hybrid CFG reads two velocities, the state and the noise and writes
the next state; eager torch spends about ten elementwise kernels and as many full-size temporaries on it.
One pass reads each input once and writes the state once, and the log-prob comes out of the same
registers. The training step recomputes the log-prob of the recorded next state under the current
policy (`sde_logprob`), with a backward pass that recomputes the mean instead of saving it.

Time convention (diffusers flow matching): t = 1 is noise, t = 0 is data, `x_t = (1 - t) x_0 + t eps`,
velocity `v = eps - x_0`; sampling runs from t = 1 to 0, so `dt = t_next - t < 0`.

Formulas (Flow-GRPO, Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL",
arXiv:2505.05470, Sec. 4.2 "ODE-to-SDE conversion" and its Euler-Maruyama step):

    guided velocity   v = v_u + s (v_c - v_u)                       (Ho & Salimans 2022, CFG)
    noise schedule    sigma_t = a sqrt(t / (1 - t))                  (a = noise_level)
    mean              mu = x_t + [v + sigma_t^2 / (2 t) (x_t + (1 - t) v)] dt
    std               std = sigma_t sqrt(-dt)
    next state        x_next = mu + std * eps,   eps ~ N(0, I)
    log-prob          log p = -(x_next - mu)^2 / (2 std^2) - log std - 0.5 log(2 pi), per element

Why that drift, in this time convention: from `x_t = x_0 + t v` and `eps = x_t + (1 - t) v` (both follow
from the two definitions above), Tweedie gives the score `grad log p_t(x) = -E[eps | x_t] / t =
-(x_t + (1 - t) v) / t`. The SDE that runs t downwards with the ODE's marginals is
`dx = [v - sigma_t^2 / 2 * score] dt + sigma_t dW` with dt < 0, which is the mean above. With a = 0 the
step is the Euler ODE step `x_t + v dt` (tested), and `tests/test_kernels_cfg_sde.py` checks that the
SDE keeps the marginals of a Gaussian data set whose exact velocity is known.

Numerical choices:
- `sigma_t^2 / (2 t)` is computed as `a^2 / (2 (1 - t))`, the same number without the 0/0 at t = 0.
- t = 1 guard: at t >= 1, `1 - t` is replaced by `1 - t_next = -dt`. This is what Flow-GRPO's sampler
  does (it substitutes `sigma_max = sigmas[1]`, the first step's next time, when sigma == 1), so the
  first step from pure noise has `std = a sqrt(-dt * t / -dt) = a` instead of infinity.
- The log-prob is that of the next state *as stored* (rounded to `x_t`'s dtype), so that `sde_logprob`
  of the recorded state with the same velocity gives back the same number: the importance ratio of
  GRPO starts at exactly 1 in bf16 too.
- Reduction over the latent dimensions: `mean` by default, as Flow-GRPO does. The mean keeps the
  log-prob O(1) whatever the resolution, so `exp(logp_new - logp_old)` and the PPO clip range behave
  the same for a 32x32 and a 128x128 latent; `sum` is the joint log-density (for a KL estimate).
- Everything is computed in fp32 whatever the input dtype; log-probs are returned in fp32.
- With a = 0 (ODE sampling) std is 0 and the log-prob is undefined: it comes back NaN.

Where it stops being fast: below about a million elements the step is launch-bound (one kernel plus a
`sum` over the per-tile partials when a sample spans several tiles). Not yet measured on a GPU.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

from ._runtime import (
    FP_FUSION,
    HAS_TRITON,
    LOG_SQRT_2PI,
    block_for,
    check_launchable,
    empty,
    launch_device,
    per_sample_scalar,
    rows,
    tl,
    triton,
)

Reduction = Literal["mean", "sum"]

__all__ = [
    "SdeStepOutput",
    "cfg_sde_step_ref",
    "cfg_sde_step_triton",
    "sde_logprob_ref",
    "sde_logprob_triton",
]


class SdeStepOutput(NamedTuple):
    """What a sampling step returns.

    x_next:   [B, ...] in x_t's dtype.
    logp:     [B] fp32 (fp64 for fp64 inputs, the test oracle), log-density of the stored x_next.
    velocity: [B, ...] guided velocity in v's dtype when asked for (previews: x_0 = x_t - t v), else None.
    """

    x_next: torch.Tensor
    logp: torch.Tensor
    velocity: torch.Tensor | None


# --------------------------------------------------------------------------------------------------
# Argument checks shared by both paths
# --------------------------------------------------------------------------------------------------


def _check_args(
    v: torch.Tensor,
    v_uncond: torch.Tensor | None,
    others: dict[str, torch.Tensor],
    guidance: float,
    noise_level: float,
    dt: float | torch.Tensor,
    reduction: str,
) -> None:
    """Raise on arguments that would give a silently wrong answer."""
    if v.dim() < 1:
        raise ValueError("v must have a leading batch dimension")
    if v.shape[0] > 0 and v.numel() == 0:
        raise ValueError(f"v has shape {tuple(v.shape)}: a sample with no elements has no log-prob")
    for name, tensor in {"v_uncond": v_uncond, **others}.items():
        if tensor is not None and tensor.shape != v.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected v's {tuple(v.shape)}")
    if v_uncond is None and guidance != 1.0:
        raise ValueError(f"guidance={guidance} needs v_uncond (guided velocity v_u + s (v_c - v_u))")
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    if not isinstance(dt, torch.Tensor) and not float(dt) < 0:
        raise ValueError(f"dt = t_next - t must be < 0 (time runs from 1 to 0), got {dt}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


# --------------------------------------------------------------------------------------------------
# Pure-torch reference: the CPU path and the test oracle
# --------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    """fp32 for half inputs when upcasting (the contract), the input dtype otherwise; fp64 stays fp64."""
    if not upcast:
        return dtype
    return torch.promote_types(dtype, torch.float32)


def _sde_coefficients(
    t: torch.Tensor, dt: torch.Tensor, noise_level: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """c = sigma_t^2 / (2 t) = a^2 / (2 (1 - t)) and std = sigma_t sqrt(-dt), with the t = 1 guard.

    t, dt: [B, 1] in the compute dtype. Returns c, std: [B, 1].
    """
    one_minus_t = torch.where(t >= 1, -dt, 1 - t)  # [B, 1]; 1 - t_next at t = 1 (Flow-GRPO)
    a2 = noise_level * noise_level
    c = a2 / (2 * one_minus_t)  # [B, 1]
    std = torch.sqrt(a2 * t / one_minus_t * -dt)  # [B, 1]
    return c, std


def _ref_mean_std(
    v: torch.Tensor,
    v_uncond: torch.Tensor | None,
    x_t: torch.Tensor,
    t: float | torch.Tensor,
    dt: float | torch.Tensor,
    noise_level: float,
    guidance: float,
    cdt: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Guided velocity, SDE mean and std in the compute dtype `cdt`, rows flattened to [B, N]."""
    batch = v.shape[0]
    tv = per_sample_scalar(t, batch, v.device, "t").to(cdt).view(batch, 1)  # [B, 1]
    dtv = per_sample_scalar(dt, batch, v.device, "dt").to(cdt).view(batch, 1)  # [B, 1]
    vc = rows(v).to(cdt)  # [B, N]
    if v_uncond is not None:
        vu = rows(v_uncond).to(cdt)  # [B, N]
        vg = vu + guidance * (vc - vu)  # [B, N]
    else:
        vg = vc
    x = rows(x_t).to(cdt)  # [B, N]
    c, std = _sde_coefficients(tv, dtv, noise_level)  # [B, 1], [B, 1]
    mean = x + (vg + c * (x + (1 - tv) * vg)) * dtv  # [B, N]
    return vg, mean, std


def _ref_logp(
    x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduction: Reduction
) -> torch.Tensor:
    """Per-sample Gaussian log-density of the rows of x_next [B, N]; returns [B]."""
    z = (x_next - mean) / std  # [B, N]
    logp = -0.5 * z * z - torch.log(std) - LOG_SQRT_2PI  # [B, N]
    return logp.mean(dim=1) if reduction == "mean" else logp.sum(dim=1)  # [B]


def _out_dtype(cdt: torch.dtype) -> torch.dtype:
    return torch.float64 if cdt == torch.float64 else torch.float32


def cfg_sde_step_ref(
    v: torch.Tensor,
    x_t: torch.Tensor,
    eps: torch.Tensor,
    t: float | torch.Tensor,
    dt: float | torch.Tensor,
    noise_level: float,
    *,
    v_uncond: torch.Tensor | None = None,
    guidance: float = 1.0,
    reduction: Reduction = "mean",
    return_velocity: bool = False,
    upcast: bool = True,
) -> SdeStepOutput:
    """One SDE sampling step in plain torch (formulas in the module docstring).

    v: [B, ...] conditional velocity (the only one when v_uncond is None); x_t, eps: [B, ...];
    t, dt: floats or [B] tensors. `upcast=False` computes in the input dtype: the tests use it to
    measure torch's own same-dtype error, which bounds the kernel's.
    """
    _check_args(v, v_uncond, {"x_t": x_t, "eps": eps}, guidance, noise_level, dt, reduction)
    cdt = _compute_dtype(x_t.dtype, upcast)
    vg, mean, std = _ref_mean_std(v, v_uncond, x_t, t, dt, noise_level, guidance, cdt)
    x_next = (mean + std * rows(eps).to(cdt)).to(x_t.dtype)  # [B, N], stored dtype
    logp = _ref_logp(x_next.to(cdt), mean, std, reduction)  # [B], of the stored state
    velocity = vg.to(v.dtype).view(v.shape) if return_velocity else None
    return SdeStepOutput(x_next.view(x_t.shape), logp.to(_out_dtype(cdt)), velocity)


def sde_logprob_ref(
    v: torch.Tensor,
    x_t: torch.Tensor,
    x_next: torch.Tensor,
    t: float | torch.Tensor,
    dt: float | torch.Tensor,
    noise_level: float,
    *,
    v_uncond: torch.Tensor | None = None,
    guidance: float = 1.0,
    reduction: Reduction = "mean",
    upcast: bool = True,
) -> torch.Tensor:
    """Log-prob [B] of a given next state under velocity v (or the guided v_u + s (v_c - v_u)).

    Differentiable by torch autograd in every tensor input; the Triton path's backward is checked
    against it.
    """
    _check_args(v, v_uncond, {"x_t": x_t, "x_next": x_next}, guidance, noise_level, dt, reduction)
    cdt = _compute_dtype(x_t.dtype, upcast)
    _, mean, std = _ref_mean_std(v, v_uncond, x_t, t, dt, noise_level, guidance, cdt)
    logp = _ref_logp(rows(x_next).to(cdt), mean, std, reduction)  # [B]
    return logp.to(_out_dtype(cdt))


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------

if HAS_TRITON:
    # Compiled kernels may only read globals that are constexpr.
    _LOG_SQRT_2PI = tl.constexpr(LOG_SQRT_2PI)

    @triton.jit
    def _sde_scalars(t_ptr, dt_ptr, row, noise_level):
        """Per-sample t, dt, c = sigma^2 / (2 t) and std = sigma sqrt(-dt) (module docstring), fp32."""
        t = tl.load(t_ptr + row)
        dt = tl.load(dt_ptr + row)
        one_minus_t = tl.where(t >= 1.0, -dt, 1.0 - t)
        a2 = noise_level * noise_level
        c = a2 / (2.0 * one_minus_t)
        std = tl.sqrt_rn(a2 * t / one_minus_t * -dt)
        return t, dt, c, std

    @triton.jit
    def _guided_velocity(v_ptr, vu_ptr, offs, mask, guidance, GUIDED: tl.constexpr):
        """v, or v_u + s (v_c - v_u) when GUIDED, loaded and combined in fp32."""
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if GUIDED:
            vu = tl.load(vu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            v = vu + guidance * (v - vu)
        return v

    @triton.jit
    def _cfg_sde_step_kernel(
        # inputs, each [B, N] contiguous; vu unused unless GUIDED
        v_ptr,
        vu_ptr,
        x_ptr,
        eps_ptr,
        # outputs [B, N], [B, N] (WRITE_V only), [B, n_tiles] fp32
        xn_ptr,
        vout_ptr,
        part_ptr,
        # [B] fp32
        t_ptr,
        dt_ptr,
        # fp32 scalars; scale = 1/N (mean) or 1 (sum)
        guidance,
        noise_level,
        scale,
        N,  # elements per sample
        GUIDED: tl.constexpr,
        WRITE_V: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        tile = tl.program_id(1)
        n_tiles = tl.num_programs(1)
        cols = tile.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < N
        offs = row * N + cols  # int64: B * N passes 2^31 at Qwen-Image batch sizes

        t, dt, c, std = _sde_scalars(t_ptr, dt_ptr, row, noise_level)
        v = _guided_velocity(v_ptr, vu_ptr, offs, mask, guidance, GUIDED)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        e = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(tl.float32)

        mean = x + (v + c * (x + (1.0 - t) * v)) * dt
        xn = (mean + std * e).to(xn_ptr.dtype.element_ty)  # rounded as stored
        tl.store(xn_ptr + offs, xn, mask=mask)
        if WRITE_V:
            tl.store(vout_ptr + offs, v.to(vout_ptr.dtype.element_ty), mask=mask)

        z = (xn.to(tl.float32) - mean) * (1.0 / std)
        lp = -0.5 * z * z - (tl.log(std) + _LOG_SQRT_2PI)
        tl.store(part_ptr + row * n_tiles + tile, tl.sum(tl.where(mask, lp, 0.0), axis=0) * scale)

    @triton.jit
    def _sde_logprob_fwd_kernel(
        # inputs [B, N] contiguous; vu unused unless GUIDED
        v_ptr,
        vu_ptr,
        x_ptr,
        xn_ptr,
        part_ptr,  # [B, n_tiles] fp32
        # [B] fp32
        t_ptr,
        dt_ptr,
        guidance,
        noise_level,
        scale,
        N,
        GUIDED: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        tile = tl.program_id(1)
        n_tiles = tl.num_programs(1)
        cols = tile.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < N
        offs = row * N + cols

        t, dt, c, std = _sde_scalars(t_ptr, dt_ptr, row, noise_level)
        v = _guided_velocity(v_ptr, vu_ptr, offs, mask, guidance, GUIDED)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xn = tl.load(xn_ptr + offs, mask=mask, other=0.0).to(tl.float32)

        mean = x + (v + c * (x + (1.0 - t) * v)) * dt
        z = (xn - mean) * (1.0 / std)
        lp = -0.5 * z * z - (tl.log(std) + _LOG_SQRT_2PI)
        tl.store(part_ptr + row * n_tiles + tile, tl.sum(tl.where(mask, lp, 0.0), axis=0) * scale)

    @triton.jit
    def _sde_logprob_bwd_kernel(
        g_ptr,  # [B] fp32: d loss / d logp
        # inputs [B, N] contiguous
        v_ptr,
        vu_ptr,
        x_ptr,
        xn_ptr,
        # gradient outputs [B, N], each written only if asked
        gv_ptr,
        gvu_ptr,
        gx_ptr,
        gxn_ptr,
        t_ptr,
        dt_ptr,
        guidance,
        noise_level,
        scale,
        N,
        GUIDED: tl.constexpr,
        NEED_V: tl.constexpr,
        NEED_VU: tl.constexpr,
        NEED_X: tl.constexpr,
        NEED_XN: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # d logp / d mu = (x_next - mu) / std^2 * scale; d mu / d v = (1 + c (1 - t)) dt;
        # d mu / d x_t = 1 + c dt; d logp / d x_next = -(x_next - mu) / std^2 * scale;
        # guided: d v / d v_c = s, d v / d v_u = 1 - s.
        row = tl.program_id(0).to(tl.int64)
        tile = tl.program_id(1)
        cols = tile.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < N
        offs = row * N + cols

        t, dt, c, std = _sde_scalars(t_ptr, dt_ptr, row, noise_level)
        g = tl.load(g_ptr + row)
        v = _guided_velocity(v_ptr, vu_ptr, offs, mask, guidance, GUIDED)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xn = tl.load(xn_ptr + offs, mask=mask, other=0.0).to(tl.float32)

        mean = x + (v + c * (x + (1.0 - t) * v)) * dt
        inv_std = 1.0 / std
        d_mean = (xn - mean) * (g * scale * inv_std * inv_std)
        if NEED_V or NEED_VU:
            d_v = d_mean * ((1.0 + c * (1.0 - t)) * dt)
            if NEED_V:
                if GUIDED:
                    tl.store(gv_ptr + offs, (guidance * d_v).to(gv_ptr.dtype.element_ty), mask=mask)
                else:
                    tl.store(gv_ptr + offs, d_v.to(gv_ptr.dtype.element_ty), mask=mask)
            if NEED_VU:
                tl.store(gvu_ptr + offs, ((1.0 - guidance) * d_v).to(gvu_ptr.dtype.element_ty), mask=mask)
        if NEED_X:
            tl.store(gx_ptr + offs, (d_mean * (1.0 + c * dt)).to(gx_ptr.dtype.element_ty), mask=mask)
        if NEED_XN:
            tl.store(gxn_ptr + offs, (-d_mean).to(gxn_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> contiguous [B, N] (a copy only when the input is not contiguous already)."""
    return rows(x).contiguous()


def _reduce_partials(part: torch.Tensor) -> torch.Tensor:
    """[B, n_tiles] fp32 partial sums -> [B]; no second launch when one tile covers a sample.

    A fixed-order sum instead of atomics: the rollout and the training step must produce the same
    number for the same inputs, or the GRPO ratio does not start at 1.
    """
    return part.view(-1) if part.shape[1] == 1 else part.sum(dim=1)


def cfg_sde_step_triton(
    v: torch.Tensor,
    x_t: torch.Tensor,
    eps: torch.Tensor,
    t: float | torch.Tensor,
    dt: float | torch.Tensor,
    noise_level: float,
    *,
    v_uncond: torch.Tensor | None = None,
    guidance: float = 1.0,
    reduction: Reduction = "mean",
    return_velocity: bool = False,
) -> SdeStepOutput:
    """Launch the fused step (same arguments and outputs as `cfg_sde_step_ref`). No gradient."""
    _check_args(v, v_uncond, {"x_t": x_t, "eps": eps}, guidance, noise_level, dt, reduction)
    check_launchable(v, v_uncond, x_t, eps)
    batch, device = v.shape[0], v.device
    n = math.prod(v.shape[1:])
    v2, x2, e2 = _rows(v), _rows(x_t), _rows(eps)  # [B, N] each
    vu2 = _rows(v_uncond) if v_uncond is not None else v2  # [B, N]
    tv = per_sample_scalar(t, batch, device, "t")  # [B] fp32
    dtv = per_sample_scalar(dt, batch, device, "dt")  # [B] fp32
    block = block_for(n)
    n_tiles = triton.cdiv(n, block)
    x_next = empty((batch, n), x_t.dtype, device)  # [B, N]
    v_out = empty((batch, n), v.dtype, device) if return_velocity else x_next  # [B, N]
    part = empty((batch, n_tiles), torch.float32, device)  # [B, n_tiles]
    if batch and n:
        with launch_device(v):
            _cfg_sde_step_kernel[(batch, n_tiles)](
                v2,
                vu2,
                x2,
                e2,
                x_next,
                v_out,
                part,
                tv,
                dtv,
                float(guidance),
                float(noise_level),
                1.0 / n if reduction == "mean" else 1.0,
                n,
                GUIDED=v_uncond is not None,
                WRITE_V=return_velocity,
                BLOCK=block,
                num_warps=4,
                enable_fp_fusion=FP_FUSION,
            )
    velocity = v_out.view(v.shape) if return_velocity else None
    return SdeStepOutput(x_next.view(x_t.shape), _reduce_partials(part), velocity)


def _sde_logprob_forward(
    v: torch.Tensor,
    v_uncond: torch.Tensor | None,
    x_t: torch.Tensor,
    x_next: torch.Tensor,
    t: torch.Tensor,
    dt: torch.Tensor,
    noise_level: float,
    guidance: float,
    reduction: Reduction,
) -> torch.Tensor:
    """Forward launch of `sde_logprob`: logp [B] fp32. t, dt: [B] fp32 (see `per_sample_scalar`)."""
    batch, device = v.shape[0], v.device
    n = math.prod(v.shape[1:])
    v2, x2, xn2 = _rows(v), _rows(x_t), _rows(x_next)  # [B, N] each
    vu2 = _rows(v_uncond) if v_uncond is not None else v2  # [B, N]
    block = block_for(n)
    n_tiles = triton.cdiv(n, block)
    part = empty((batch, n_tiles), torch.float32, device)  # [B, n_tiles]
    if batch and n:
        with launch_device(v):
            _sde_logprob_fwd_kernel[(batch, n_tiles)](
                v2,
                vu2,
                x2,
                xn2,
                part,
                t,
                dt,
                float(guidance),
                float(noise_level),
                1.0 / n if reduction == "mean" else 1.0,
                n,
                GUIDED=v_uncond is not None,
                BLOCK=block,
                num_warps=4,
                enable_fp_fusion=FP_FUSION,
            )
    return _reduce_partials(part)


def _sde_logprob_backward(
    grad_logp: torch.Tensor,
    v: torch.Tensor,
    v_uncond: torch.Tensor | None,
    x_t: torch.Tensor,
    x_next: torch.Tensor,
    t: torch.Tensor,
    dt: torch.Tensor,
    noise_level: float,
    guidance: float,
    reduction: Reduction,
    needs: tuple[bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """Backward launch: gradients for (v, v_uncond, x_t, x_next), None where not needed.

    Recomputes the mean from v, x_t and x_next instead of saving an fp32 residual in the forward:
    the same bytes read, and nothing full-size held between forward and backward.
    """
    batch, device = v.shape[0], v.device
    n = math.prod(v.shape[1:])
    v2, x2, xn2 = _rows(v), _rows(x_t), _rows(x_next)  # [B, N] each
    vu2 = _rows(v_uncond) if v_uncond is not None else v2  # [B, N]
    need_v, need_vu, need_x, need_xn = needs
    need_vu = need_vu and v_uncond is not None
    gv = empty((batch, n), v.dtype, device) if need_v else None  # [B, N]
    gvu = empty((batch, n), v_uncond.dtype, device) if need_vu else None  # [B, N]
    gx = empty((batch, n), x_t.dtype, device) if need_x else None  # [B, N]
    gxn = empty((batch, n), x_next.dtype, device) if need_xn else None  # [B, N]
    block = block_for(n)
    if batch and n and any((need_v, need_vu, need_x, need_xn)):
        g = grad_logp.reshape(batch).to(torch.float32).contiguous()  # [B]
        with launch_device(v):
            _sde_logprob_bwd_kernel[(batch, triton.cdiv(n, block))](
                g,
                v2,
                vu2,
                x2,
                xn2,
                gv if gv is not None else v2,
                gvu if gvu is not None else v2,
                gx if gx is not None else v2,
                gxn if gxn is not None else v2,
                t,
                dt,
                float(guidance),
                float(noise_level),
                1.0 / n if reduction == "mean" else 1.0,
                n,
                GUIDED=v_uncond is not None,
                NEED_V=need_v,
                NEED_VU=need_vu,
                NEED_X=need_x,
                NEED_XN=need_xn,
                BLOCK=block,
                num_warps=4,
                enable_fp_fusion=FP_FUSION,
            )
    shapes = (v.shape, v.shape, x_t.shape, x_next.shape)
    return tuple(
        g_.view(s) if g_ is not None else None for g_, s in zip((gv, gvu, gx, gxn), shapes, strict=True)
    )


def sde_logprob_triton(
    v: torch.Tensor,
    x_t: torch.Tensor,
    x_next: torch.Tensor,
    t: float | torch.Tensor,
    dt: float | torch.Tensor,
    noise_level: float,
    *,
    v_uncond: torch.Tensor | None = None,
    guidance: float = 1.0,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Triton path of `sde_logprob_ref` (same arguments): logp [B] fp32, differentiable in the tensors."""
    _check_args(v, v_uncond, {"x_t": x_t, "x_next": x_next}, guidance, noise_level, dt, reduction)
    check_launchable(v, v_uncond, x_t, x_next)
    tv = per_sample_scalar(t, v.shape[0], v.device, "t")  # [B] fp32
    dtv = per_sample_scalar(dt, v.shape[0], v.device, "dt")  # [B] fp32
    from qirl.kernels._ops import sde_logprob  # the registered op: fused forward, fused backward

    return sde_logprob(v, x_t, x_next, tv, dtv, float(noise_level), v_uncond, float(guidance), reduction)
