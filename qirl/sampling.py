"""Flow-matching sampling: time grids, classifier-free guidance, the Euler ODE sampler.

Convention (diffusers flow matching, rectified flow): t = 1 is noise, t = 0 is data,

    x_t = (1 - t) x_0 + t eps,        v = dx_t/dt = eps - x_0,

so integrating from t = 1 down to t = 0 turns noise into data, one Euler step being
``x_{t'} = x_t + (t' - t) v`` with ``t' < t``.

Layout: grid (`timesteps`) -> velocity (`guided_velocity`) -> step (`euler_step`, and the SDE step
beside it) -> loops (`sample_ode`, `sample_images`) -> GRPO rollouts (`sample_sde` -> `Rollout`,
`trajectory_logprob`). The training-side helpers `add_noise` and `flow_matching_loss` live here too,
because they are the same interpolation read the other way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args, overload

import torch
from torch import Tensor

from qirl import ops
from qirl.errors import UserError
from qirl.models.policy import Condition, FlowPolicy

CfgMode = Literal["hybrid", "both", "none"]
CFG_MODES: tuple[str, ...] = get_args(CfgMode)

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
    x [B, C, H, W], t [B] -> [B, C, H, W] fp32 (combined in fp32 whatever the model's dtype).
    """
    b = x.shape[0]
    t = torch.as_tensor(t, device=x.device, dtype=torch.float32).reshape(-1).expand(b)  # [B]
    if uncond is None or guidance <= 1.0:
        return policy.velocity(x, t, cond).float()
    both = Condition.cat([cond, uncond])
    v = policy.velocity(torch.cat([x, x]), torch.cat([t, t]), both).float()  # [2B, C, H, W]
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


def _step_dt(t: float, t_next: float) -> float:
    """``t_next - t`` computed in fp32, exactly as `euler_step` does, so an SDE step with noise level 0
    and an Euler step give the same bits."""
    return float(torch.tensor(t_next, dtype=torch.float32) - torch.tensor(t, dtype=torch.float32))


def sde_kl_factor(t: float, t_next: float, noise_level: float) -> float:
    """k with ``KL(N(mu_theta, std^2 I) || N(mu_ref, std^2 I)) = k ||v_theta - v_ref||^2`` per element.

    Both transitions share std (Flow-GRPO's SDE step, `qirl.kernels.cfg_sde_step`), and the mean
    ``mu = x + [v + c (x + (1 - t) v)] dt`` with ``c = a^2 / (2 (1 - t))`` is affine in v with slope
    ``(1 + c (1 - t)) dt``, so the Gaussian KL ``(mu_theta - mu_ref)^2 / (2 std^2)`` (Flow-GRPO's KL
    term, Liu et al. 2025, eq. 6) is ``k (v_theta - v_ref)^2`` with
    ``k = ((1 + c (1 - t)) dt)^2 / (2 std^2)``, ``std^2 = a^2 t / (1 - t) (-dt)``. The t = 1 guard of the
    kernel (``1 - t`` -> ``-dt`` inside c and std) is applied the same way.
    """
    dt = _step_dt(t, t_next)
    one_minus_t = -dt if t >= 1.0 else 1.0 - t
    a2 = noise_level * noise_level
    c = a2 / (2.0 * one_minus_t)
    var = a2 * t / one_minus_t * -dt
    return ((1.0 + c * (1.0 - t)) * dt) ** 2 / (2.0 * var)


def _branch_velocities(
    policy: FlowPolicy, x: Tensor, t: float, cond: Condition, uncond: Condition | None, guidance: float
) -> tuple[Tensor, Tensor | None]:
    """(v_c, v_u) in the model's dtype from one forward: [cond ; uncond] as a batch of 2B when CFG is on
    (as in `guided_velocity`), else (v_c, None). The combination ``v_u + s (v_c - v_u)`` is left to the
    fused kernels, which read bf16/fp16 velocities once and compute in fp32 (no fp32 copy in between)."""
    b = x.shape[0]
    t_batch = torch.full((b,), t, device=x.device, dtype=torch.float32)  # [B]
    if uncond is None or guidance <= 1.0:
        return policy.velocity(x, t_batch, cond), None  # [B, C, H, W]
    both = Condition.cat([cond, uncond])
    v = policy.velocity(torch.cat([x, x]), torch.cat([t_batch, t_batch]), both)  # [2B, C, H, W]
    v_c, v_u = v.chunk(2)  # [B, C, H, W] each
    return v_c, v_u


def _step_noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal [B, C, H, W] fp32 drawn on the generator's device, then moved to x's."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(x.device)


@torch.no_grad()
def sde_step(
    policy: FlowPolicy,
    x: Tensor,
    t: float,
    t_next: float,
    cond: Condition,
    uncond: Condition | None,
    guidance: float,
    noise_level: float,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One rollout step of Flow-GRPO's SDE (formulas: `qirl.kernels.cfg_sde_step`), without grad.

    ``v = v_u + s (v_c - v_u)`` (one batched forward when ``guidance > 1`` and ``uncond`` is given),
    ``sigma_t = a sqrt(t / (1 - t))``, ``mu = x + [v + sigma_t^2 / (2 t) (x + (1 - t) v)] dt``,
    ``x_next = mu + sigma_t sqrt(-dt) eps`` with ``dt = t_next - t < 0``, through the fused
    `qirl.ops.cfg_sde_step`. ``noise`` is eps [B, C, H, W] (drawn from ``generator`` when None).
    ``noise_level = 0`` is exactly `euler_step` (the log-prob is then NaN).

    x [B, C, H, W] -> (x_next [B, C, H, W] in x's dtype, logp [B] fp32: the mean-over-elements Gaussian
    log-density of the stored x_next under the guided velocity).
    """
    v_c, v_u = _branch_velocities(policy, x, t, cond, uncond, guidance)
    eps = _step_noise(x, generator) if noise is None else noise.to(device=x.device, dtype=torch.float32)
    out = ops.cfg_sde_step(
        v_c,
        x,
        eps,
        t,
        _step_dt(t, t_next),
        noise_level,
        v_uncond=v_u,
        guidance=guidance if v_u is not None else 1.0,
    )
    return out.x_next, out.logp


# --------------------------------------------------------------------------------------------- loops


def initial_noise(policy: FlowPolicy, batch: int, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal latents [B, C, H, W] in float32 on the policy's device.

    Drawn on the generator's device (torch requires it) and then moved, so a CPU generator gives the
    same noise whatever device the policy is on.
    """
    device = generator.device if generator is not None else policy.device
    noise = torch.randn(batch, *policy.latent_shape, generator=generator, device=device, dtype=torch.float32)
    return noise.to(policy.device)  # [B, C, H, W]


def _start_noise(policy: FlowPolicy, b: int, generator: torch.Generator | None, noise: Tensor | None) -> Tensor:
    """The given initial noise (shape-checked, fp32 on the policy's device), else a fresh draw."""
    if noise is None:
        return initial_noise(policy, b, generator)  # [B, C, H, W]
    expected = (b, *policy.latent_shape)
    if tuple(noise.shape) != expected:
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {expected}")
    return noise.to(device=policy.device, dtype=torch.float32)  # [B, C, H, W]


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
    x = _start_noise(policy, b, generator, noise)  # [B, C, H, W]
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


# ------------------------------------------------------------------------------------------ rollouts


@dataclass
class Rollout:
    """A GRPO rollout batch: what `sample_sde` recorded and what `trajectory_logprob` replays.

    Grid: ``timesteps`` [N + 1] from 1 to 0; step n goes from state n (time t_n) to state n + 1.
    Only the states a trained step needs are kept (design, data flow step 2): ``states[i]`` is grid
    state ``state_steps[i]``, the union of n and n + 1 over ``trained_steps`` (K + 1 states for a
    contiguous window of K steps), or all N + 1 with ``keep_all_states``. Use `state(n)`.

    latents:        [B, C, H, W] fp32, the final x_0 (decode and score these).
    states:         [S, B, C, H, W] fp32, the kept states, in grid order.
    state_steps:    S grid indices of ``states``.
    timesteps:      [N + 1] fp32.
    trained_steps:  the SDE steps (sorted grid indices in [0, N)); every other step was a deterministic
                    Euler ODE step.
    logps_rollout:  [N, B] fp32, log-density of each stored transition under the velocity that made it
                    (guided in `hybrid` and `both`); NaN at ODE steps (a deterministic step has none).
    logps_cond:     [N, B] fp32 in `hybrid` and `none`: the same transitions under the CFG-free
                    conditional velocity alone (in `none` the very tensor ``logps_rollout``); None in
                    `both`. NaN at ODE steps.
    noise_level:    a in ``sigma_t = a sqrt(t / (1 - t))``.
    guidance:       the CFG scale the rollout used (1.0 for `none`).
    cfg_mode:       `hybrid`, `both` or `none` (see `sample_sde`).

    All log-probs are means over the latent elements (`qirl.ops.cfg_sde_step`'s default reduction).
    """

    latents: Tensor
    states: Tensor
    state_steps: tuple[int, ...]
    timesteps: Tensor
    trained_steps: tuple[int, ...]
    logps_rollout: Tensor
    logps_cond: Tensor | None
    noise_level: float
    guidance: float
    cfg_mode: CfgMode

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0] - 1

    @property
    def logps_old(self) -> Tensor:
        """[N, B] fp32: the old log-probs the GRPO ratio compares `trajectory_logprob` against.

        The conditional ones in `hybrid` and `none` (the objective is CFG-free), the guided ones in
        `both` (the objective keeps guidance, Flow-GRPO's setting; see `trajectory_logprob` for whether
        the unconditional branch is trained).
        """
        return self.logps_rollout if self.logps_cond is None else self.logps_cond

    def state(self, n: int) -> Tensor:
        """Grid state n [B, C, H, W] (index 0 is the initial noise), if it was kept."""
        try:
            i = self.state_steps.index(n)
        except ValueError:
            raise UserError(
                f"state {n} was not kept by this rollout (kept: {list(self.state_steps)}); "
                "pass keep_all_states=True to sample_sde to keep every state"
            ) from None
        return self.states[i]


def _check_window(sde_window: Sequence[int] | None, num_steps: int) -> tuple[int, ...]:
    if sde_window is None:
        return tuple(range(num_steps))
    steps = []
    for n in sde_window:
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < num_steps:
            raise UserError(
                f"sde_window index {n!r} is out of range: steps are 0..{num_steps - 1} for num_steps={num_steps}"
            )
        steps.append(n)
    if not steps:
        raise UserError(
            "sde_window is empty: a rollout needs at least one SDE step (use sample_ode for none)"
        )
    return tuple(sorted(set(steps)))


@torch.no_grad()
def sample_sde(
    policy: FlowPolicy,
    cond: Condition,
    num_steps: int,
    guidance: float = 1.0,
    shift: float = 1.0,
    noise_level: float = 0.7,
    cfg_mode: CfgMode = "hybrid",
    sde_window: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    uncond: Condition | None = None,
    keep_all_states: bool = False,
    step_noise: dict[int, Tensor] | None = None,
    cond_logprobs: bool = True,
) -> Rollout:
    """GRPO rollout: SDE steps with log-probs on the trained window, Euler ODE steps elsewhere.

    On the grid `timesteps(num_steps, shift)`, step n is an `sde_step` (Flow-GRPO, Liu et al. 2025,
    Sec. 4.2: ``x_{n+1} = mu + sigma_t sqrt(-dt) eps``, formulas in `qirl.kernels.cfg_sde_step`) when n
    is in ``sde_window`` (None: every step) and a deterministic `euler_step` otherwise: exploration
    only where GRPO trains (Flow-GRPO's SDE window, MixGRPO's sliding window), so ODE steps add no
    noise the objective cannot credit. ``noise_level = 0`` gives back `sample_ode` exactly.

    CFG modes (``v = v_u + s (v_c - v_u)``, ``uncond`` defaults to ``policy.null_condition(cond)``):
    - `hybrid` (Qwen-Image-2.0-RL's default): roll out WITH guidance s, train CFG-free. The guided
      log-prob is ``logps_rollout``; ``logps_cond`` = `qirl.ops.sde_logprob` of the same stored
      transition under v_c alone, and that is ``logps_old``, so the first ratio of an update is 1.
    - `both`: roll out and train with guidance (Flow-GRPO); ``logps_old`` is the guided log-prob.
    - `none`: no guidance anywhere (``guidance`` is ignored and recorded as 1.0).

    Randomness: the initial noise is ``noise`` [B, C, H, W] if given, else drawn from ``generator``;
    the SDE noises are drawn from ``generator`` afterwards, one [B, C, H, W] per SDE step in order, so a
    seeded generator makes the rollout deterministic. ``step_noise`` {n: [B, C, H, W]} gives them
    instead (data-parallel GRPO draws the global batch's noises once and hands each rank its rows, so
    the result does not depend on the number of processes). Runs without grad.

    ``cond_logprobs=False`` skips the `hybrid` mode's second log-prob (``logps_cond`` stays NaN): for
    callers that want the trajectory, not a GRPO ratio (distillation, curation).

    Memory kept per rollout (fp32): (S + 1) B C H W for the states and latents (S = K + 1 for a
    contiguous window of K steps) plus 2 N B log-probs.
    """
    if cfg_mode not in CFG_MODES:
        raise UserError(f"cfg_mode {cfg_mode!r} is not one of {', '.join(CFG_MODES)}")
    if noise_level < 0:
        raise UserError(f"noise_level must be >= 0, got {noise_level}")
    grid_t = timesteps(num_steps, shift)  # [N + 1]
    window = _check_window(sde_window, num_steps)
    b = cond.batch_size
    x = _start_noise(policy, b, generator, noise)  # [B, C, H, W]
    if cfg_mode == "none":
        guidance = 1.0
    cfg = guidance > 1.0
    if cfg and uncond is None:
        uncond = policy.null_condition(cond)
    keep = set(range(num_steps + 1)) if keep_all_states else {m for n in window for m in (n, n + 1)}
    kept: list[Tensor] = []
    logps_rollout = torch.full((num_steps, b), float("nan"), dtype=torch.float32, device=x.device)  # [N, B]
    logps_cond = logps_rollout.clone() if cfg_mode == "hybrid" else None  # [N, B]
    grid = grid_t.tolist()
    for n, (t, t_next) in enumerate(zip(grid[:-1], grid[1:], strict=True)):
        if n in keep:
            kept.append(x)
        v_c, v_u = _branch_velocities(policy, x, t, cond, uncond if cfg else None, guidance)
        if n not in window:
            v_c = v_c.float()  # fp32 as in the kernels
            v = v_c if v_u is None else v_u.float() + guidance * (v_c - v_u.float())  # guided_velocity's formula
            x = euler_step(x, v, t, t_next)  # [B, C, H, W]
            continue
        dt = _step_dt(t, t_next)
        if step_noise is not None:
            eps = step_noise[n].to(device=x.device, dtype=torch.float32)  # [B, C, H, W]
        else:
            eps = _step_noise(x, generator)  # [B, C, H, W]
        out = ops.cfg_sde_step(
            v_c, x, eps, t, dt, noise_level, v_uncond=v_u, guidance=guidance if cfg else 1.0
        )
        logps_rollout[n] = out.logp
        if logps_cond is not None and cond_logprobs:
            logps_cond[n] = (
                out.logp if v_u is None else ops.sde_logprob(v_c, x, out.x_next, t, dt, noise_level)
            )
        x = out.x_next  # [B, C, H, W]
    if num_steps in keep:
        kept.append(x)
    if cfg_mode == "none":
        logps_cond = logps_rollout
    return Rollout(
        latents=x,
        states=torch.stack(kept),  # [S, B, C, H, W]
        state_steps=tuple(sorted(keep)),
        timesteps=grid_t,
        trained_steps=window,
        logps_rollout=logps_rollout,
        logps_cond=logps_cond,
        noise_level=float(noise_level),
        guidance=float(guidance),
        cfg_mode=cfg_mode,
    )


def trajectory_logprob(
    policy: FlowPolicy,
    rollout: Rollout,
    step_index: int,
    cond: Condition,
    uncond: Condition | None = None,
    guidance: float | None = None,
    return_velocity: bool = False,
    detach_uncond: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-prob [B] fp32, WITH grad, of the recorded transition n -> n + 1 under the current policy.

    ``log p_theta(x_{n+1} | x_n, c)`` of Flow-GRPO's Gaussian step (`qirl.ops.sde_logprob`, mean over
    elements), the term the GRPO ratio ``exp(logp - rollout.logps_old[n])`` differentiates.
    `hybrid` and `none` use the conditional velocity v_c alone; `both` uses the guided
    ``v_u + s (v_c - v_u)`` with ``guidance`` (default: the rollout's) and ``uncond`` (default:
    ``policy.null_condition(cond)``), batched [cond ; uncond] as in the rollout. With the policy
    unchanged this gives back ``rollout.logps_old[n]`` (up to float reassociation).
    ``return_velocity``: also return the conditional velocity v_c [B, C, H, W] fp32 of that forward
    (with grad), so a KL term on it costs no second forward and backward.
    ``detach_uncond`` (`both` only): treat v_u as a constant, so the gradient reaches the weights through
    ``s v_c`` alone; without it the unconditional branch also gets weight ``(1 - s)``.
    """
    if step_index not in rollout.trained_steps:
        raise UserError(
            f"step {step_index!r} is not a trained step of this rollout (trained: {list(rollout.trained_steps)})"
        )
    if cond.batch_size != rollout.latents.shape[0]:
        raise ValueError(f"cond has batch {cond.batch_size}, the rollout has {rollout.latents.shape[0]}")
    if rollout.cfg_mode == "both":
        guidance = rollout.guidance if guidance is None else guidance
        if guidance > 1.0 and uncond is None:
            uncond = policy.null_condition(cond)
    elif guidance is not None and guidance != 1.0:
        raise UserError(
            f"cfg_mode {rollout.cfg_mode!r} trains CFG-free: guidance must be 1 or None, got {guidance}"
        )
    else:
        guidance, uncond = 1.0, None
    t, t_next = rollout.timesteps[step_index].item(), rollout.timesteps[step_index + 1].item()
    x, x_next = rollout.state(step_index), rollout.state(step_index + 1)  # [B, C, H, W] each
    v_c, v_u = _branch_velocities(policy, x, t, cond, uncond, guidance)
    if detach_uncond and v_u is not None:
        v_u = v_u.detach()
    logp = ops.sde_logprob(
        v_c,
        x,
        x_next,
        t,
        _step_dt(t, t_next),
        rollout.noise_level,
        v_uncond=v_u,
        guidance=guidance if v_u is not None else 1.0,
    )
    return (logp, v_c) if return_velocity else logp
