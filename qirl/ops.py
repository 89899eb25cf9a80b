"""The hot-path functionals the rest of qirl calls; each makes one backend decision per call.

Backends: the Triton kernels of `qirl.kernels` or their pure-torch references (same file, same
arguments). `QIRL_KERNELS` picks:

- `auto` (default): Triton when the tensors are on CUDA and Triton imports, the reference otherwise.
- `triton`: always the kernels. On CPU tensors that needs Triton's interpreter, which must be switched
  on before Triton is first imported: `TRITON_INTERPRET=1 QIRL_KERNELS=triton ...` (the tests do this).
- `torch`: always the reference (to rule a kernel out when debugging, or on an unsupported device).

The choice is logged once per (op, backend, reason) at INFO. The kernel modules are imported on first
use, so `import qirl.ops` does not import Triton (which would fix the interpreter setting too early).
Formulas, shapes and numerics are documented in each kernel module; the functionals only dispatch. The
Triton path goes through the ops registered with `torch.library` (`qirl.kernels._ops`, namespace ``qirl``),
so `torch.compile` keeps each kernel as one graph node with its registered backward; the references are
plain torch, which it traces by itself.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType
from typing import TYPE_CHECKING, Literal

import torch

from qirl.errors import UserError
from qirl.kernels import _ops as custom_ops
from qirl.kernels._scalars import per_sample_scalar

if TYPE_CHECKING:
    from qirl.kernels.cfg_sde_step import SdeStepOutput
    from qirl.kernels.velocity_mse import VelocityMSEOutput

__all__ = ["ENV_VAR", "cfg_sde_step", "group_advantage", "resolve_backend", "sde_logprob", "velocity_mse"]

logger = logging.getLogger(__name__)

ENV_VAR = "QIRL_KERNELS"
Backend = Literal["triton", "torch"]
_MODES = ("auto", "triton", "torch")
_logged: set[tuple[str, str, str]] = set()


_modules: dict[str, ModuleType] = {}


def _kernel_module(name: str) -> ModuleType:
    """The kernel module, imported on first use and then read from a dict (which `torch.compile` traces;
    an import it cannot)."""
    if name not in _modules:
        _modules[name] = importlib.import_module(f"qirl.kernels.{name}")
    return _modules[name]


def resolve_backend(op: str, device: torch.device) -> Backend:
    """Decide which implementation of `op` runs for tensors on `device`, and log it once.

    Raises UserError for an unknown QIRL_KERNELS value, or `triton` where Triton is not installed.
    """
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise UserError(f"{ENV_VAR}={mode!r}: expected one of {', '.join(_MODES)}")
    has_triton = _kernel_module("_runtime").HAS_TRITON
    if mode == "torch":
        backend, reason = "torch", f"{ENV_VAR}=torch"
    elif mode == "triton":
        if not has_triton:
            raise UserError(f"{ENV_VAR}=triton but Triton is not installed (it has wheels for Linux only)")
        backend, reason = "triton", f"{ENV_VAR}=triton"
    elif device.type == "cuda" and has_triton:
        backend, reason = "triton", "CUDA tensors"
    else:
        backend = "torch"
        reason = f"{device.type} tensors" if has_triton else "Triton not installed"
    key = (op, backend, reason)
    if key not in _logged:
        _logged.add(key)
        logger.info("qirl.ops.%s: %s backend (%s)", op, backend, reason)
    return backend


def cfg_sde_step(
    v: torch.Tensor,
    x_t: torch.Tensor,
    eps: torch.Tensor,
    t: float | torch.Tensor,
    dt: float | torch.Tensor,
    noise_level: float,
    *,
    v_uncond: torch.Tensor | None = None,
    guidance: float = 1.0,
    reduction: Literal["mean", "sum"] = "mean",
    return_velocity: bool = False,
) -> SdeStepOutput:
    """Rollout step: guided velocity, Flow-GRPO SDE step and the log-prob of the stored next state.

    v [B, ...]: conditional velocity (the only one when v_uncond is None); v_uncond [B, ...] with
    `guidance` s gives v_u + s (v - v_u); x_t, eps [B, ...]; t, dt = t_next - t < 0: floats or [B].
    Returns (x_next [B, ...] in x_t's dtype, logp [B] fp32, guided velocity or None).
    A sampling op: it has no gradient, so it refuses inputs that require one (call it under
    torch.no_grad(); differentiate the log-prob with `sde_logprob`).
    Formulas: `qirl.kernels.cfg_sde_step`.
    """
    tensors = (v, v_uncond, x_t, eps, t, dt)
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in tensors):
        raise ValueError("cfg_sde_step has no gradient: call it under torch.no_grad() and use sde_logprob")
    mod = _kernel_module("cfg_sde_step")
    if resolve_backend("cfg_sde_step", v.device) == "torch":
        return mod.cfg_sde_step_ref(
            v, x_t, eps, t, dt, noise_level, v_uncond=v_uncond, guidance=guidance, reduction=reduction,
            return_velocity=return_velocity,
        )
    mod._check_args(v, v_uncond, {"x_t": x_t, "eps": eps}, guidance, noise_level, dt, reduction)
    b, device = v.shape[0], v.device
    x_next, logp, velocity = custom_ops.cfg_sde_step(
        v, x_t, eps, per_sample_scalar(t, b, device, "t"), per_sample_scalar(dt, b, device, "dt"),
        float(noise_level), v_uncond, float(guidance), reduction, return_velocity,
    )
    return mod.SdeStepOutput(x_next, logp, velocity if return_velocity else None)


def sde_logprob(
    v: torch.Tensor,
    x_t: torch.Tensor,
    x_next: torch.Tensor,
    t: float | torch.Tensor,
    dt: float | torch.Tensor,
    noise_level: float,
    *,
    v_uncond: torch.Tensor | None = None,
    guidance: float = 1.0,
    reduction: Literal["mean", "sum"] = "mean",
) -> torch.Tensor:
    """Training step: log-prob [B] fp32 of a recorded next state under the current velocity.

    Hybrid CFG trains on the conditional velocity alone (v); the `both` mode passes v_uncond and
    guidance too, and gradients reach both. Differentiable in v, v_uncond, x_t and x_next.
    Formulas: `qirl.kernels.cfg_sde_step`.
    """
    mod = _kernel_module("cfg_sde_step")
    impl = mod.sde_logprob_triton if resolve_backend("sde_logprob", v.device) == "triton" else mod.sde_logprob_ref
    return impl(v, x_t, x_next, t, dt, noise_level, v_uncond=v_uncond, guidance=guidance, reduction=reduction)


def group_advantage(
    rewards: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    eps: float = 1e-4,
    clip: float | None = None,
    unbiased: bool = False,
) -> torch.Tensor:
    """GRPO advantages [P, G] fp32 from rewards [P, G, K] (NaN = missing) and weights [K] or [P, K].

    A = sum_k w_k (R_k - mean_k) / (std_k + eps) per group, optionally clamped to [-clip, clip].
    Advantages are constants of the policy gradient: no gradient flows to the rewards.
    Formula and missing-reward rules: `qirl.kernels.group_advantage`.
    """
    if resolve_backend("group_advantage", rewards.device) == "torch":
        return _kernel_module("group_advantage").group_advantage_ref(
            rewards, weights, eps=eps, clip=clip, unbiased=unbiased
        )
    return custom_ops.group_advantage(rewards, weights, float(eps), None if clip is None else float(clip), unbiased)


def velocity_mse(student: torch.Tensor, teacher: torch.Tensor) -> VelocityMSEOutput:
    """Distillation loss: (loss = mean of per_sample, per_sample [B]) with mse_b = mean_i (s - t)^2.

    student, teacher: [B, ...], any float dtypes; fp32 results. Differentiable in the student (and in
    the teacher if it requires grad). Formulas: `qirl.kernels.velocity_mse`.
    """
    mod = _kernel_module("velocity_mse")
    impl = mod.velocity_mse_triton if resolve_backend("velocity_mse", student.device) == "triton" else mod.velocity_mse_ref
    return impl(student, teacher)
