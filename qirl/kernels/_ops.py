"""qirl's Triton kernels registered with `torch.library` (namespace ``qirl``), so `torch.compile` keeps
each launch as one node of its graph instead of breaking the graph at a Triton launch or at an
autograd.Function.

Each op has a fake (meta) implementation for tracing, and the differentiable ones (`sde_logprob`,
`velocity_mse`) a registered backward that is itself an op launching the fused backward kernel. Only the
Triton path is wrapped: the pure-torch references are plain torch, which `torch.compile` traces (and may
fuse) by itself and autograd differentiates, so `qirl.ops` calls them directly (autograd cannot run
inside an op, and wrapping them would change nothing a compiler sees).

Op schemas take tensors only where qirl's functionals also take floats: `t` and `dt` arrive as per-sample
fp32 vectors [B]. Call the functionals in `qirl.ops` (or a kernel module's ``*_triton`` entry, which wraps
the same op), not these ops. This module imports torch only, never Triton.
"""

import importlib

import torch
from torch import Tensor

# No `from __future__ import annotations` here: torch.library reads the op schemas from the annotations.


def _module(name: str):  # noqa: ANN202 - a kernel module
    return importlib.import_module(f"qirl.kernels.{name}")


def _fresh(x: Tensor, *inputs: Tensor | None) -> Tensor:
    """An op's output must not alias its inputs (the reference can return a view of one)."""
    return x.clone() if any(i is not None and x.data_ptr() == i.data_ptr() for i in inputs) else x


def _logp_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------ cfg_sde_step (no grad)


@torch.library.custom_op("qirl::cfg_sde_step", mutates_args=())
def cfg_sde_step(
    v: Tensor,
    x_t: Tensor,
    eps: Tensor,
    t: Tensor,
    dt: Tensor,
    noise_level: float,
    v_uncond: Tensor | None,
    guidance: float,
    reduction: str,
    return_velocity: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(x_next [B, ...] in x_t's dtype, logp [B] fp32, guided velocity [B, ...] or an empty tensor)."""
    out = _module("cfg_sde_step").cfg_sde_step_triton(
        v, x_t, eps, t, dt, noise_level, v_uncond=v_uncond, guidance=guidance, reduction=reduction,
        return_velocity=return_velocity,
    )
    velocity = _fresh(out.velocity, v, v_uncond) if out.velocity is not None else v.new_empty(0)
    return _fresh(out.x_next, x_t), out.logp, velocity


@cfg_sde_step.register_fake
def _(v, x_t, eps, t, dt, noise_level, v_uncond, guidance, reduction, return_velocity):  # noqa: ANN001, ANN202
    velocity = torch.empty_like(v) if return_velocity else v.new_empty(0)
    return torch.empty_like(x_t), x_t.new_empty(x_t.shape[0], dtype=_logp_dtype(x_t)), velocity


# ------------------------------------------------------------------------------------------ sde_logprob


@torch.library.custom_op("qirl::sde_logprob", mutates_args=())
def sde_logprob(
    v: Tensor,
    x_t: Tensor,
    x_next: Tensor,
    t: Tensor,
    dt: Tensor,
    noise_level: float,
    v_uncond: Tensor | None,
    guidance: float,
    reduction: str,
) -> Tensor:
    """logp [B] fp32 of x_next under the (guided) velocity."""
    mod = _module("cfg_sde_step")
    mod._check_args(v, v_uncond, {"x_t": x_t, "x_next": x_next}, guidance, noise_level, dt, reduction)
    _module("_runtime").check_launchable(v, v_uncond, x_t, x_next)
    return mod._sde_logprob_forward(v, v_uncond, x_t, x_next, t, dt, noise_level, guidance, reduction)


@sde_logprob.register_fake
def _(v, x_t, x_next, t, dt, noise_level, v_uncond, guidance, reduction):  # noqa: ANN001, ANN202
    return x_t.new_empty(x_t.shape[0], dtype=_logp_dtype(x_t))


@torch.library.custom_op("qirl::sde_logprob_backward", mutates_args=())
def sde_logprob_backward(
    grad: Tensor,
    v: Tensor,
    x_t: Tensor,
    x_next: Tensor,
    t: Tensor,
    dt: Tensor,
    noise_level: float,
    v_uncond: Tensor | None,
    guidance: float,
    reduction: str,
    needs: list[bool],
) -> list[Tensor]:
    """Gradients [d v, d v_uncond, d x_t, d x_next]; an empty tensor where ``needs`` is False."""
    need = [bool(n) for n in needs]
    need[1] = need[1] and v_uncond is not None
    grads = _module("cfg_sde_step")._sde_logprob_backward(
        grad, v, v_uncond, x_t, x_next, t, dt, noise_level, guidance, reduction, needs=tuple(need)
    )
    return [g if g is not None else v.new_empty(0) for g in grads]


@sde_logprob_backward.register_fake
def _(grad, v, x_t, x_next, t, dt, noise_level, v_uncond, guidance, reduction, needs):  # noqa: ANN001, ANN202
    like = (v, v_uncond, x_t, x_next)
    return [
        torch.empty_like(x) if n and x is not None else v.new_empty(0) for x, n in zip(like, needs, strict=True)
    ]


def _sde_logprob_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    v, x_t, x_next, t, dt, noise_level, v_uncond, guidance, reduction = inputs
    ctx.save_for_backward(v, x_t, x_next, t, dt, v_uncond)
    ctx.scalars = (noise_level, guidance, reduction)


def _sde_logprob_grad(ctx, grad):  # noqa: ANN001, ANN202
    v, x_t, x_next, t, dt, v_uncond = ctx.saved_tensors
    noise_level, guidance, reduction = ctx.scalars
    nv, nx, nxn, _, _, _, nvu, _, _ = ctx.needs_input_grad
    gv, gvu, gx, gxn = sde_logprob_backward(
        grad, v, x_t, x_next, t, dt, noise_level, v_uncond, guidance, reduction, [nv, nvu, nx, nxn]
    )
    return (gv if nv else None, gx if nx else None, gxn if nxn else None, None, None, None,
            gvu if nvu else None, None, None)


sde_logprob.register_autograd(_sde_logprob_grad, setup_context=_sde_logprob_setup)


# ----------------------------------------------------------------------------------------- velocity_mse


@torch.library.custom_op("qirl::velocity_mse", mutates_args=())
def velocity_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """Per-sample MSE [B] fp32 (fp64 for fp64 inputs)."""
    mod = _module("velocity_mse")
    mod._check_args(student, teacher)
    _module("_runtime").check_launchable(student, teacher)
    return mod._velocity_mse_forward(student, teacher)


@velocity_mse.register_fake
def _(student, teacher):  # noqa: ANN001, ANN202
    dtype = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)
    return student.new_empty(student.shape[0], dtype=dtype)


@torch.library.custom_op("qirl::velocity_mse_backward", mutates_args=())
def velocity_mse_backward(grad: Tensor, student: Tensor, teacher: Tensor, needs: list[bool]) -> list[Tensor]:
    """[d student, d teacher]; an empty tensor where ``needs`` is False."""
    gs, gt = _module("velocity_mse")._velocity_mse_backward(grad, student, teacher, bool(needs[0]), bool(needs[1]))
    return [gs if gs is not None else student.new_empty(0), gt if gt is not None else teacher.new_empty(0)]


@velocity_mse_backward.register_fake
def _(grad, student, teacher, needs):  # noqa: ANN001, ANN202
    return [
        torch.empty_like(student) if needs[0] else student.new_empty(0),
        torch.empty_like(teacher) if needs[1] else teacher.new_empty(0),
    ]


def _velocity_mse_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    ctx.save_for_backward(*inputs)


def _velocity_mse_grad(ctx, grad):  # noqa: ANN001, ANN202
    student, teacher = ctx.saved_tensors
    ns, nt = ctx.needs_input_grad
    gs, gt = velocity_mse_backward(grad, student, teacher, [ns, nt])
    return gs if ns else None, gt if nt else None


velocity_mse.register_autograd(_velocity_mse_grad, setup_context=_velocity_mse_setup)


# --------------------------------------------------------------------------------- group_advantage (no grad)


@torch.library.custom_op("qirl::group_advantage", mutates_args=())
def group_advantage(
    rewards: Tensor, weights: Tensor | None, eps: float, clip: float | None, unbiased: bool
) -> Tensor:
    """Advantages [P, G] fp32 from rewards [P, G, K] and weights [K] or [P, K]."""
    out = _module("group_advantage").group_advantage_triton(rewards, weights, eps=eps, clip=clip, unbiased=unbiased)
    return _fresh(out, rewards, weights)


@group_advantage.register_fake
def _(rewards, weights, eps, clip, unbiased):  # noqa: ANN001, ANN202
    return rewards.new_empty(rewards.shape[:2], dtype=torch.float32)
