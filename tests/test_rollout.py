"""Tests for the GRPO rollout in qirl.sampling: `sde_step`, `sample_sde` -> `Rollout`, `trajectory_logprob`.

All on the shipped base model with few steps and a small batch: the contract is that the old log-prob a
rollout records is exactly what the unchanged policy gives back (ratio 1), in every CFG mode.
"""

from __future__ import annotations

import pytest
import torch

from qirl import ops
from qirl.errors import UserError
from qirl.models.policy import Condition, FlowPolicy
from qirl.models.registry import load_policy
from qirl.sampling import (
    Rollout,
    euler_step,
    guided_velocity,
    sample_ode,
    sample_sde,
    sde_step,
    timesteps,
    trajectory_logprob,
)

STEPS = 5
SHIFT = 3.0
GUIDANCE = 4.0
NOISE = 0.7
WINDOW = (0, 1, 2)
PROMPTS = ["a red circle on the left", "a blue square", "a small green triangle at the top"]


@pytest.fixture(scope="module")
def policy() -> FlowPolicy:
    return load_policy("base")


@pytest.fixture(scope="module")
def cond(policy: FlowPolicy) -> Condition:
    with torch.no_grad():  # shared by the tests: no graph back into the text encoder
        return policy.encode(PROMPTS)


def rollout(policy: FlowPolicy, cond: Condition, seed: int = 0, **kwargs: object) -> Rollout:
    args: dict[str, object] = dict(
        num_steps=STEPS,
        guidance=GUIDANCE,
        shift=SHIFT,
        noise_level=NOISE,
        cfg_mode="hybrid",
        sde_window=WINDOW,
    )
    args.update(kwargs)
    return sample_sde(policy, cond, generator=torch.Generator().manual_seed(seed), **args)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["hybrid", "both", "none"])
def test_ratio_is_one_with_unchanged_policy(policy: FlowPolicy, cond: Condition, mode: str) -> None:
    r = rollout(policy, cond, cfg_mode=mode)
    for n in r.trained_steps:
        with torch.no_grad():
            new = trajectory_logprob(policy, r, n, cond)  # [B]
        torch.testing.assert_close(new, r.logps_old[n], rtol=0, atol=1e-6)
        assert torch.exp(new - r.logps_old[n]).sub(1).abs().max() < 1e-5
        if mode == "hybrid":
            # The old log-prob is the CFG-free one; the guided rollout log-prob would be a wrong ratio.
            assert r.logps_cond is not None
            # (mean over rows: where the model's CFG barely moves a row its two log-probs nearly agree)
            assert (r.logps_rollout[n] - r.logps_old[n]).abs().mean() > 1e-4
            assert (new - r.logps_rollout[n]).abs().mean() > 1e-4
    if mode == "both":
        assert r.logps_cond is None and r.logps_old is r.logps_rollout
    if mode == "none":
        assert r.guidance == 1.0 and r.logps_old is r.logps_rollout


def test_shapes_and_dtypes(policy: FlowPolicy, cond: Condition) -> None:
    r = rollout(policy, cond)
    b, shape = cond.batch_size, policy.latent_shape
    assert r.latents.shape == (b, *shape) and r.latents.dtype == torch.float32
    assert r.state_steps == (0, 1, 2, 3)  # only what the window needs: K + 1 states
    assert r.states.shape == (4, b, *shape) and r.states.dtype == torch.float32
    assert r.timesteps.shape == (STEPS + 1,)
    torch.testing.assert_close(r.timesteps, timesteps(STEPS, SHIFT), rtol=0, atol=0)
    assert r.trained_steps == WINDOW
    assert r.logps_cond is not None
    for logps in (r.logps_rollout, r.logps_cond, r.logps_old):
        assert logps.shape == (STEPS, b) and logps.dtype == torch.float32
        assert torch.isfinite(logps[list(WINDOW)]).all()
        assert torch.isnan(logps[[3, 4]]).all()  # ODE steps have no log-prob
    assert (r.cfg_mode, r.guidance, r.noise_level) == ("hybrid", GUIDANCE, NOISE)
    full = rollout(policy, cond, keep_all_states=True, sde_window=[2, 0, 2])
    assert full.trained_steps == (0, 2)
    assert full.states.shape == (STEPS + 1, b, *shape)
    torch.testing.assert_close(full.state(STEPS), full.latents, rtol=0, atol=0)
    with pytest.raises(UserError, match="not kept"):
        r.state(5)


def test_deterministic_given_generator_and_noise(policy: FlowPolicy, cond: Condition) -> None:
    a, b = rollout(policy, cond, seed=3), rollout(policy, cond, seed=3)
    torch.testing.assert_close(a.states, b.states, rtol=0, atol=0)
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=0)
    torch.testing.assert_close(a.logps_rollout, b.logps_rollout, rtol=0, atol=0, equal_nan=True)
    assert not torch.equal(a.latents, rollout(policy, cond, seed=4).latents)
    # Given initial noise, the generator still drives the SDE noise (and only that).
    x0 = torch.randn(cond.batch_size, *policy.latent_shape, generator=torch.Generator().manual_seed(9))
    c, d = rollout(policy, cond, seed=1, noise=x0), rollout(policy, cond, seed=1, noise=x0)
    torch.testing.assert_close(c.states[0], x0, rtol=0, atol=0)
    torch.testing.assert_close(c.latents, d.latents, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["hybrid", "none"])
def test_steps_outside_window_are_euler_steps(policy: FlowPolicy, cond: Condition, mode: str) -> None:
    window = (1, 3)
    r = rollout(policy, cond, cfg_mode=mode, sde_window=window, keep_all_states=True)
    grid = r.timesteps.tolist()
    uncond = policy.null_condition(cond)
    with torch.no_grad():
        for n in range(STEPS):
            x = r.state(n)
            t = torch.full((cond.batch_size,), grid[n])
            v = guided_velocity(policy, x, t, cond, uncond, r.guidance).float()
            ode = euler_step(x, v, grid[n], grid[n + 1])
            if n in window:
                assert (r.state(n + 1) - ode).abs().max() > 1e-2  # the SDE step explored
            else:
                torch.testing.assert_close(r.state(n + 1), ode, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["hybrid", "both", "none"])
def test_noise_level_zero_is_sample_ode(policy: FlowPolicy, cond: Condition, mode: str) -> None:
    x0 = torch.randn(cond.batch_size, *policy.latent_shape, generator=torch.Generator().manual_seed(5))
    r = rollout(policy, cond, cfg_mode=mode, noise=x0, noise_level=0.0, sde_window=None, keep_all_states=True)
    g = 1.0 if mode == "none" else GUIDANCE
    latents, traj = sample_ode(policy, cond, STEPS, guidance=g, shift=SHIFT, noise=x0, return_trajectory=True)
    torch.testing.assert_close(r.latents, latents, rtol=0, atol=0)
    torch.testing.assert_close(r.states, traj, rtol=0, atol=0)
    assert torch.isnan(r.logps_rollout).all()  # std = 0: the log-density is undefined


def test_sde_step_matches_kernel_and_euler(policy: FlowPolicy, cond: Condition) -> None:
    b = cond.batch_size
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(b, *policy.latent_shape, generator=gen)
    eps = torch.randn(b, *policy.latent_shape, generator=gen)
    uncond = policy.null_condition(cond)
    t, t_next = 0.8, 0.6
    x_next, logp = sde_step(policy, x, t, t_next, cond, uncond, GUIDANCE, NOISE, noise=eps)
    assert x_next.shape == x.shape and logp.shape == (b,) and logp.dtype == torch.float32
    with torch.no_grad():
        tb = torch.full((b,), t)
        v_c, v_u = policy.velocity(x, tb, cond), policy.velocity(x, tb, uncond)
        dt = float(torch.tensor(t_next) - torch.tensor(t))
        ref = ops.cfg_sde_step(v_c, x, eps, t, dt, NOISE, v_uncond=v_u, guidance=GUIDANCE)
    torch.testing.assert_close(x_next, ref.x_next, rtol=0, atol=1e-5)
    torch.testing.assert_close(logp, ref.logp, rtol=0, atol=1e-5)
    # Determinism through a generator, and noise level 0 = the Euler step.
    a = sde_step(
        policy, x, t, t_next, cond, uncond, GUIDANCE, NOISE, generator=torch.Generator().manual_seed(1)
    )
    c = sde_step(
        policy, x, t, t_next, cond, uncond, GUIDANCE, NOISE, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(a[0], c[0], rtol=0, atol=0)
    x_ode, _ = sde_step(policy, x, t, t_next, cond, uncond, GUIDANCE, 0.0, noise=eps)
    with torch.no_grad():
        v = guided_velocity(policy, x, torch.full((b,), t), cond, uncond, GUIDANCE).float()
    torch.testing.assert_close(x_ode, euler_step(x, v, t, t_next), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["hybrid", "both"])
def test_bf16_velocities_reach_the_kernels_unconverted(
    policy: FlowPolicy, cond: Condition, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A policy whose velocities come out in bf16 (a diffusers transformer in bf16) hands them to the fused
    ops in bf16 (they compute in fp32 inside): no fp32 copy of v in between; states and log-probs stay
    fp32 and the ratio still starts at exactly 1."""
    velocity = policy.velocity
    monkeypatch.setattr(policy, "velocity", lambda x, t, c: velocity(x, t, c).to(torch.bfloat16))
    c = cond.index(slice(0, 2))
    seen: list[torch.dtype] = []
    for name in ("cfg_sde_step", "sde_logprob"):
        real = getattr(ops, name)

        def spy(v: torch.Tensor, *args: object, _real=real, **kwargs: object):  # noqa: ANN202
            seen.append(v.dtype)
            return _real(v, *args, **kwargs)

        monkeypatch.setattr(ops, name, spy)
    r = rollout(policy, c, cfg_mode=mode)
    assert r.latents.dtype == torch.float32 and r.logps_old.dtype == torch.float32
    n = r.trained_steps[-1]
    logp = trajectory_logprob(policy, r, n, c)  # [2]
    assert logp.dtype == torch.float32 and logp.requires_grad
    # The rollout's forward ran [cond ; uncond] as one batch, this one cond alone: fp32 sums that differ in
    # the last bit can round to neighbouring bf16 values, so the ratio is 1 to bf16 precision, not exactly.
    torch.testing.assert_close(logp.detach(), r.logps_old[n], rtol=0, atol=1e-4)
    assert seen and set(seen) == {torch.bfloat16}


@pytest.mark.parametrize("mode", ["hybrid", "both"])
def test_gradients_reach_trainable_parameters(policy: FlowPolicy, cond: Condition, mode: str) -> None:
    r = rollout(policy, cond.index(slice(0, 2)), cfg_mode=mode)
    params = policy.trainable_parameters()
    try:
        logp = trajectory_logprob(policy, r, r.trained_steps[-1], cond.index(slice(0, 2)))
        assert logp.requires_grad and logp.shape == (2,)
        logp.mean().backward()
        norm = torch.sqrt(sum(p.grad.float().square().sum() for p in params if p.grad is not None))
        assert torch.isfinite(norm) and norm > 0
    finally:
        for p in params:
            p.grad = None


def test_detach_uncond_trains_through_the_conditional_branch_only(policy: FlowPolicy, cond: Condition) -> None:
    """`both` + detach_uncond: same log-prob; its gradient is that of the guided step with v_u held
    constant (here: computed under no_grad), and differs from the undetached gradient."""
    from qirl import ops

    c = cond.index(slice(0, 2))
    r = rollout(policy, c, cfg_mode="both")
    n = r.trained_steps[-1]
    params = policy.trainable_parameters()
    logp = trajectory_logprob(policy, r, n, c, detach_uncond=True)
    g_detached = torch.autograd.grad(logp.sum(), params, allow_unused=True)
    g_full = torch.autograd.grad(trajectory_logprob(policy, r, n, c).sum(), params, allow_unused=True)
    x, x_next = r.state(n), r.state(n + 1)
    t, t_next = float(r.timesteps[n]), float(r.timesteps[n + 1])
    tb = torch.full((2,), t)
    with torch.no_grad():
        v_u = policy.velocity(x, tb, policy.null_condition(c)).float()
    v_c = policy.velocity(x, tb, c).float()
    by_hand = ops.sde_logprob(v_c, x, x_next, t, t_next - t, r.noise_level, v_uncond=v_u, guidance=GUIDANCE)
    torch.testing.assert_close(logp.detach(), by_hand.detach(), atol=1e-5, rtol=1e-5)
    g_hand = torch.autograd.grad(by_hand.sum(), params, allow_unused=True)
    pairs = [(a, b, f) for a, b, f in zip(g_detached, g_hand, g_full, strict=True) if a is not None]
    for a, b, _ in pairs:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert any(not torch.allclose(a, f, atol=1e-6) for a, _, f in pairs)


def test_user_errors(policy: FlowPolicy, cond: Condition) -> None:
    def one_line(exc: pytest.ExceptionInfo[UserError]) -> None:
        assert "\n" not in str(exc.value)

    with pytest.raises(UserError, match="cfg_mode 'cfg' is not one of hybrid, both, none") as e:
        rollout(policy, cond, cfg_mode="cfg")
    one_line(e)
    for bad in ([STEPS], [-1], [0, 1.5]):
        with pytest.raises(UserError, match="out of range") as e:
            rollout(policy, cond, sde_window=bad)
        one_line(e)
    with pytest.raises(UserError, match="empty"):
        rollout(policy, cond, sde_window=[])
    with pytest.raises(UserError, match="noise_level"):
        rollout(policy, cond, noise_level=-0.1)
    r = rollout(policy, cond)
    with pytest.raises(UserError, match="not a trained step") as e:
        trajectory_logprob(policy, r, 4, cond)
    one_line(e)
    with pytest.raises(UserError, match="CFG-free"):
        trajectory_logprob(policy, r, 0, cond, guidance=GUIDANCE)


def test_policy_gradient_step_moves_log_probs_with_the_advantage():
    """One descent step on -mean(ratio * A) raises the log-prob of positive-advantage transitions and
    lowers it for negative ones (the sign GRPO relies on), at every trained step."""
    import torch

    from qirl.models.registry import load_policy
    from qirl.sampling import sample_sde, trajectory_logprob

    policy = load_policy("base")
    with torch.no_grad():
        cond = policy.encode(["a red circle"] * 4).detach()
    ro = sample_sde(policy, cond, 6, guidance=3.0, noise_level=0.7, cfg_mode="hybrid", sde_window=[0, 1],
                    generator=torch.Generator().manual_seed(0))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    for n in ro.trained_steps:
        ratio = torch.exp(trajectory_logprob(policy, ro, n, cond) - ro.logps_old[n])
        (-(ratio * adv).mean()).backward()
    with torch.no_grad():
        for p in policy.trainable_parameters():
            if p.grad is not None:  # the source projection is unused by text-to-image rows
                p -= 1e-2 * p.grad
        for n in ro.trained_steps:
            delta = trajectory_logprob(policy, ro, n, cond) - ro.logps_old[n]
            assert torch.all(torch.sign(delta) == adv), (n, delta)
