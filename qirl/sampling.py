"""Flow-matching sampling: time grids, classifier-free guidance, the Euler ODE sampler.

Convention (diffusers flow matching, rectified flow): t = 1 is noise, t = 0 is data,

    x_t = (1 - t) x_0 + t eps,        v = dx_t/dt = eps - x_0,

so integrating from t = 1 down to t = 0 turns noise into data, one Euler step being
``x_{t'} = x_t + (t' - t) v`` with ``t' < t``.

Layout: grid (`timesteps`) -> velocity (`guided_velocity`) -> step (`euler_step`, and the SDE step
beside it) -> loops (`sample_ode`, `sample_images`). The training-side helpers `add_noise` and
`flow_matching_loss` live here too, because they are the same interpolation read the other way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, overload

import torch
from torch import Tensor

from qirl.errors import UserError
from qirl.models.policy import Condition, FlowPolicy

# --------------------------------------------------------------------------------------------- grids


def shift_time(t: Tensor, shift: float) -> Tensor:
    """The flow-matching time shift ``t' = s t / (1 + (s - 1) t)``.

    SD3 (Esser et al. 2024, "Scaling Rectified Flow Transformers", sec. 5.3.2) shifts the schedule
    towards noise for larger images; diffusers' ``FlowMatchEulerDiscreteScheduler`` applies the same map
    to its sigmas (``shift * s / (1 + (shift - 1) * s)``). ``s = 1`` is the identity; t = 0 and t = 1
    are fixed points.
    """
    return shift * t / (1 + (shift - 1) * t)


def timesteps(num_steps: int, shift: float = 1.0) -> Tensor:
    """``num_steps + 1`` times from 1 to 0, uniform then shifted: float32 [num_steps + 1], decreasing."""
    if num_steps < 1:
        raise UserError(f"num_steps must be at least 1, got {num_steps}")
    if shift <= 0:
        raise UserError(f"shift must be positive, got {shift}")
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)  # [N + 1]
    return shift_time(t, shift).float()  # [N + 1]


# ------------------------------------------------------------------------------------------ velocity


def guided_velocity(
    policy: FlowPolicy,
    x: Tensor,
    t: Tensor,
    cond: Condition,
    uncond: Condition | None,
    guidance: float,
) -> Tensor:
    """Classifier-free guidance ``v = v_u + s (v_c - v_u)`` (Ho & Salimans 2022, in velocity form).

    ``guidance <= 1`` or ``uncond is None`` means one conditional pass (diffusers' rule: CFG only when
    the scale exceeds 1). Otherwise both branches run as one batch ``[cond ; uncond]`` of size 2B,
    which on a CPU or GPU is cheaper than two forwards of size B.
    x [B, C, H, W], t [B] -> [B, C, H, W].
    """
    b = x.shape[0]
    t = torch.as_tensor(t, device=x.device, dtype=torch.float32).reshape(-1).expand(b)  # [B]
    if uncond is None or guidance <= 1.0:
        return policy.velocity(x, t, cond)
    both = Condition.cat([cond, uncond])
    v = policy.velocity(torch.cat([x, x]), torch.cat([t, t]), both)  # [2B, C, H, W]
    v_c, v_u = v.chunk(2)  # [B, C, H, W] each
    return v_u + guidance * (v_c - v_u)


# --------------------------------------------------------------------------------------------- steps


def euler_step(x: Tensor, v: Tensor, t: Tensor | float, t_next: Tensor | float) -> Tensor:
    """Deterministic ODE step ``x_{t_next} = x_t + (t_next - t) v`` (t_next < t moves towards data)."""
    dt = torch.as_tensor(t_next, dtype=x.dtype, device=x.device) - torch.as_tensor(
        t, dtype=x.dtype, device=x.device
    )
    if dt.dim() == 1:
        dt = dt.view(-1, *([1] * (x.dim() - 1)))  # [B, 1, 1, 1]
    return x + dt * v


# The SDE step with a Gaussian log-prob (Flow-GRPO's reverse-time SDE, used by GRPO rollouts and the
# fused CFG + step + log-prob kernel) belongs here, beside `euler_step`, with the same argument order:
# ``sde_step(x, v, t, t_next, noise_level, generator) -> (x_next, mean, std, log_prob)``.


# --------------------------------------------------------------------------------------------- loops


def initial_noise(policy: FlowPolicy, batch: int, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal latents [B, C, H, W] in float32 on the policy's device.

    Drawn on the generator's device (torch requires it) and then moved, so a CPU generator gives the
    same noise whatever device the policy is on.
    """
    device = generator.device if generator is not None else policy.device
    noise = torch.randn(batch, *policy.latent_shape, generator=generator, device=device, dtype=torch.float32)
    return noise.to(policy.device)  # [B, C, H, W]


@overload
def sample_ode(
    policy: FlowPolicy,
    cond: Condition,
    num_steps: int,
    guidance: float = ...,
    shift: float = ...,
    generator: torch.Generator | None = ...,
    noise: Tensor | None = ...,
    return_trajectory: Literal[False] = ...,
    uncond: Condition | None = ...,
) -> Tensor: ...


@overload
def sample_ode(
    policy: FlowPolicy,
    cond: Condition,
    num_steps: int,
    guidance: float = ...,
    shift: float = ...,
    generator: torch.Generator | None = ...,
    noise: Tensor | None = ...,
    *,
    return_trajectory: Literal[True],
    uncond: Condition | None = ...,
) -> tuple[Tensor, Tensor]: ...


@torch.no_grad()
def sample_ode(
    policy: FlowPolicy,
    cond: Condition,
    num_steps: int,
    guidance: float = 1.0,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    return_trajectory: bool = False,
    uncond: Condition | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Integrate the flow ODE from noise (t = 1) to data (t = 0) with ``num_steps`` Euler steps.

    ``x_{n+1} = x_n + (t_{n+1} - t_n) v(x_n, t_n)`` on the grid `timesteps(num_steps, shift)`, with
    `guided_velocity` (``uncond`` defaults to ``policy.null_condition(cond)`` when guidance > 1).
    Deterministic given ``noise`` or ``generator``. Runs without grad: training recomputes the
    velocities it needs at the recorded states.

    Returns latents [B, C, H, W] (float32), and with ``return_trajectory`` also every state
    [num_steps + 1, B, C, H, W] (index 0 is the noise, the last is the returned latents).
    """
    b = cond.batch_size
    if noise is None:
        x = initial_noise(policy, b, generator)  # [B, C, H, W]
    else:
        expected = (b, *policy.latent_shape)
        if tuple(noise.shape) != expected:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {expected}")
        x = noise.to(device=policy.device, dtype=torch.float32)  # [B, C, H, W]
    if guidance > 1.0 and uncond is None:
        uncond = policy.null_condition(cond)
    grid = timesteps(num_steps, shift).tolist()
    trajectory = [x] if return_trajectory else []
    for t, t_next in zip(grid[:-1], grid[1:], strict=True):
        t_batch = torch.full((b,), t, device=x.device, dtype=torch.float32)  # [B]
        v = guided_velocity(policy, x, t_batch, cond, uncond, guidance).float()  # [B, C, H, W]
        x = euler_step(x, v, t, t_next)  # [B, C, H, W]
        if return_trajectory:
            trajectory.append(x)
    if return_trajectory:
        return x, torch.stack(trajectory)  # [B, C, H, W], [N + 1, B, C, H, W]
    return x


@torch.no_grad()
def sample_images(
    policy: FlowPolicy,
    prompts: Sequence[str],
    sources: Sequence[Tensor | None] | None = None,
    num_steps: int = 20,
    guidance: float = 1.0,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """Prompts (and per-row source images for edits) -> images [B, 3, H, W] in [0, 1]."""
    cond = policy.encode(prompts, sources)
    latents = sample_ode(
        policy, cond, num_steps, guidance=guidance, shift=shift, generator=generator, noise=noise
    )
    return policy.decode(latents)


# ------------------------------------------------------------------------------------------ training


def add_noise(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """The forward interpolation ``x_t = (1 - t) x_0 + t eps`` (t [B] broadcast over [B, C, H, W])."""
    t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)  # [B, 1, 1, 1]
    return (1 - t) * x0 + t * noise


def sample_train_t(
    batch: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    mean: float = 0.0,
    std: float = 1.0,
) -> Tensor:
    """Training times from the logit-normal ``t = sigmoid(n)``, ``n ~ N(mean, std)`` (SD3, sec. 3.1),
    which puts more weight on the middle of the path than uniform t. Returns [B] in (0, 1)."""
    gen_device = generator.device if generator is not None else device
    n = torch.randn(batch, generator=generator, device=gen_device) * std + mean  # [B]
    return torch.sigmoid(n).to(device)


def flow_matching_loss(
    policy: FlowPolicy,
    x0: Tensor,
    cond: Condition,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Conditional flow-matching loss ``E || v_theta(x_t, t, c) - (eps - x_0) ||^2`` (Lipman et al. 2023;
    rectified flow, Liu et al. 2022), mean over all elements. x0: latents [B, C, H, W]."""
    b = x0.shape[0]
    if noise is None:
        gen_device = generator.device if generator is not None else x0.device
        noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(x0.device)
    if t is None:
        t = sample_train_t(b, generator, x0.device)
    x_t = add_noise(x0, noise, t)  # [B, C, H, W]
    v = policy.velocity(x_t, t, cond)  # [B, C, H, W]
    return (v.float() - (noise - x0).float()).square().mean()
