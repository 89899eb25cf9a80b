"""Fused CFG + SDE step + log-prob: the Triton kernels against an fp64 oracle, and the math itself.

On a machine without CUDA the kernels run in Triton's interpreter (see kernel_cases); shapes stay small.
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_cases import (
    BATCHES,
    DTYPES,
    HAS_TRITON,
    SAMPLE_SHAPES,
    TRITON_RUNS_HERE,
    SdeCase,
    assert_close_to_oracle,
    case_seed,
    rerun_in_fresh_process,
    sde_case,
)

from qirl.kernels._runtime import poison_outputs
from qirl.kernels.cfg_sde_step import (
    cfg_sde_step_ref,
    cfg_sde_step_triton,
    sde_logprob_ref,
    sde_logprob_triton,
)

needs_triton = pytest.mark.skipif(not TRITON_RUNS_HERE, reason="Triton cannot run in this process")


@pytest.mark.skipif(TRITON_RUNS_HERE or not HAS_TRITON, reason="the kernels run in this process")
def test_module_in_fresh_process() -> None:
    rerun_in_fresh_process(__file__)


def _step(c: SdeCase, impl=cfg_sde_step_triton, **kw):
    return impl(c.v, c.x_t, c.eps, c.t, c.dt, c.noise_level, v_uncond=c.v_uncond, guidance=c.guidance, **kw)


# --------------------------------------------------------------------------------------------------
# Kernels against the oracle
# --------------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("guided", [False, True], ids=["single", "guided"])
@pytest.mark.parametrize("sample_shape", SAMPLE_SHAPES, ids=str)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cfg_sde_step_matches_oracle(
    dtype: torch.dtype, batch: int, sample_shape: tuple[int, ...], guided: bool
) -> None:
    seed = case_seed()
    case = sde_case(batch, sample_shape, dtype, seed, guided=guided)
    with poison_outputs():
        out = _step(case, return_velocity=guided)

    oracle = _step(case.cast(torch.float64), cfg_sde_step_ref, return_velocity=guided)
    same = _step(case, cfg_sde_step_ref, upcast=False, return_velocity=guided)
    assert out.x_next.dtype == dtype and out.x_next.shape == case.x_t.shape
    assert out.logp.dtype == torch.float32 and out.logp.shape == (batch,)
    assert_close_to_oracle(out.x_next, oracle.x_next, same.x_next, dtype, "x_next", seed)
    if guided:
        assert_close_to_oracle(out.velocity, oracle.velocity, same.velocity, dtype, "velocity", seed)
    else:
        assert out.velocity is None

    # The log-prob is that of the state as stored (rounded to its dtype): the oracle evaluates the same.
    x_next = out.x_next
    oracle_lp = sde_logprob_ref(
        case.v.double(),
        case.x_t.double(),
        x_next.double(),
        case.t,
        case.dt,
        case.noise_level,
        v_uncond=case.v_uncond.double() if guided else None,
        guidance=case.guidance,
    )
    same_lp = sde_logprob_ref(
        case.v,
        case.x_t,
        x_next,
        case.t,
        case.dt,
        case.noise_level,
        v_uncond=case.v_uncond,
        guidance=case.guidance,
        upcast=False,
    )
    assert_close_to_oracle(out.logp, oracle_lp, same_lp, dtype, "logp", seed)


def _leaves(c: SdeCase, x_next: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor | None]:
    return {
        "v": c.v.to(dtype).detach().requires_grad_(),
        "v_uncond": c.v_uncond.to(dtype).detach().requires_grad_() if c.v_uncond is not None else None,
        "x_t": c.x_t.to(dtype).detach().requires_grad_(),
        "x_next": x_next.to(dtype).detach().requires_grad_(),
    }


def _logprob(impl, leaves: dict[str, torch.Tensor | None], c: SdeCase, reduction: str, **kw) -> torch.Tensor:
    return impl(
        leaves["v"],
        leaves["x_t"],
        leaves["x_next"],
        c.t,
        c.dt,
        c.noise_level,
        v_uncond=leaves["v_uncond"],
        guidance=c.guidance,
        reduction=reduction,
        **kw,
    )


@needs_triton
@pytest.mark.parametrize("guided", [False, True], ids=["single", "guided"])
@pytest.mark.parametrize("sample_shape", SAMPLE_SHAPES, ids=str)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sde_logprob_forward_and_gradients(
    dtype: torch.dtype, batch: int, sample_shape: tuple[int, ...], guided: bool
) -> None:
    """Training-step log-prob under a policy that moved since the rollout, and every gradient."""
    seed = case_seed()
    case = sde_case(batch, sample_shape, dtype, seed, guided=guided)
    rollout = _step(case, cfg_sde_step_ref)  # the recorded next state
    moved = torch.randn(case.v.shape, generator=torch.Generator().manual_seed(seed + 1)).to(case.v.device)
    case.v = (case.v.float() + 0.05 * moved).to(dtype)  # the current policy's velocity
    reduction = "mean"
    n = case.v[0].numel()
    grad_out = (
        torch.randn(batch, generator=torch.Generator().manual_seed(seed + 2)).to(case.v.device) * n
    )  # O(1) grads

    results = {}
    for name, impl, leaf_dtype, kw in (
        ("kernel", sde_logprob_triton, dtype, {}),
        ("oracle", sde_logprob_ref, torch.float64, {}),
        ("same", sde_logprob_ref, dtype, {"upcast": False}),
    ):
        leaves = _leaves(case, rollout.x_next, leaf_dtype)
        with poison_outputs(name == "kernel"):
            logp = _logprob(impl, leaves, case, reduction, **kw)
            logp.backward(grad_out.to(logp.dtype))
        results[name] = (logp, {k: v.grad for k, v in leaves.items() if v is not None})

    logp, grads = results["kernel"]
    assert logp.dtype == torch.float32 and logp.shape == (batch,)
    assert_close_to_oracle(logp, results["oracle"][0], results["same"][0], dtype, "logp", seed)
    for name, grad in grads.items():
        assert grad is not None and grad.dtype == dtype and grad.shape == case.v.shape, name
        assert_close_to_oracle(
            grad, results["oracle"][1][name], results["same"][1][name], dtype, f"d logp / d {name}", seed
        )


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sum_reduction_and_partial_gradients(dtype: torch.dtype) -> None:
    """reduction='sum' forward and backward, with gradients asked for v alone (the hybrid-CFG case)."""
    seed = case_seed()
    case = sde_case(5, (2, 3, 7), dtype, seed, guided=False)
    with poison_outputs():
        out = _step(case, reduction="sum")
    oracle = _step(case.cast(torch.float64), cfg_sde_step_ref, reduction="sum")
    same = _step(case, cfg_sde_step_ref, reduction="sum", upcast=False)
    assert_close_to_oracle(out.x_next, oracle.x_next, same.x_next, dtype, "x_next", seed)
    mean_lp = _step(case).logp
    torch.testing.assert_close(out.logp, mean_lp * case.v[0].numel(), rtol=1e-5, atol=1e-4)

    grads = {}
    for name, impl, leaf_dtype in (
        ("kernel", sde_logprob_triton, dtype),
        ("oracle", sde_logprob_ref, torch.float64),
    ):
        v = case.v.to(leaf_dtype).detach().requires_grad_()
        lp = impl(
            v,
            case.x_t.to(leaf_dtype),
            out.x_next.to(leaf_dtype),
            case.t,
            case.dt,
            case.noise_level,
            reduction="sum",
        )
        lp.sum().backward()
        grads[name] = v.grad
    v = case.v.detach().requires_grad_()
    sde_logprob_ref(
        v, case.x_t, out.x_next, case.t, case.dt, case.noise_level, reduction="sum", upcast=False
    ).sum().backward()
    assert_close_to_oracle(grads["kernel"], grads["oracle"], v.grad, dtype, "d logp / d v (sum)", seed)


# --------------------------------------------------------------------------------------------------
# The math
# --------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on 0 / 0
@pytest.mark.parametrize(
    "impl", [cfg_sde_step_ref, pytest.param(cfg_sde_step_triton, marks=needs_triton)], ids=["torch", "triton"]
)
def test_zero_noise_is_the_euler_ode_step(impl) -> None:
    """noise_level -> 0: x_next = x_t + v dt exactly at 0 and to first order near it; logp undefined (NaN)."""
    case = sde_case(13, (3, 7), torch.float32, case_seed(), guided=True)
    v = case.v_uncond + case.guidance * (case.v - case.v_uncond)
    euler = case.x_t + v * case.dt.view(-1, 1, 1)
    case.noise_level = 0.0
    out = _step(case, impl)
    torch.testing.assert_close(out.x_next, euler, rtol=1e-6, atol=1e-6)
    assert torch.isnan(out.logp).all()
    # Near 0 the step is Euler plus the noise std * eps (the drift correction is O(a^2)); std can reach
    # ~4e-4 at a = 1e-4 on a last step from t = 0.95, so the bound is per element, not a fixed atol.
    case.noise_level = 1e-4
    one_minus_t = torch.where(case.t >= 1, -case.dt, 1 - case.t)  # the kernel's t = 1 guard
    std = case.noise_level * torch.sqrt(case.t / one_minus_t * -case.dt)  # [B]
    gap = (_step(case, impl).x_next - euler).abs()  # [B, 3, 7]
    assert (gap <= std.view(-1, 1, 1) * case.eps.abs() * 1.01 + 1e-5).all()


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rollout_logprob_equals_training_logprob(impl: str, dtype: torch.dtype) -> None:
    """GRPO's ratio exp(logp_new - logp_old) starts at exactly 1: same velocity, same number, bitwise."""
    case = sde_case(13, (4097,), dtype, case_seed(), guided=False)
    step, logprob = (
        (cfg_sde_step_ref, sde_logprob_ref) if impl == "torch" else (cfg_sde_step_triton, sde_logprob_triton)
    )
    out = _step(case, step)
    again = logprob(case.v, case.x_t, out.x_next, case.t, case.dt, case.noise_level)
    assert torch.equal(out.logp, again)


def test_matches_flow_grpo_formula_in_fp64() -> None:
    """The reference against a literal transcription of Flow-GRPO's step, sigma_t = a sqrt(t / (1 - t))."""
    seed = case_seed()
    case = sde_case(13, (9,), torch.float64, seed, guided=False)
    case.t[0] = 0.9  # away from the t = 1 guard, checked below
    out = _step(case, cfg_sde_step_ref)
    t, dt, a = case.t.double().view(-1, 1), case.dt.double().view(-1, 1), case.noise_level
    sigma = a * torch.sqrt(t / (1 - t))
    mean = case.x_t * (1 + sigma**2 / (2 * t) * dt) + case.v * (1 + sigma**2 * (1 - t) / (2 * t)) * dt
    std = sigma * torch.sqrt(-dt)
    torch.testing.assert_close(out.x_next, mean + std * case.eps, rtol=1e-12, atol=1e-12)
    lp = (-((out.x_next - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)).mean(1)
    torch.testing.assert_close(out.logp, lp, rtol=1e-12, atol=1e-12)

    # t = 1: 1 - t is replaced by 1 - t_next = -dt, so std = a sqrt(t (-dt) / (-dt)) = a.
    first = sde_case(3, (5,), torch.float64, seed, guided=False)
    first.t[:] = 1.0
    first.x_t = first.x_t * 0  # isolates the noise term: x_next = v dt (1 + a^2 / (2 (-dt)) * 0) + std eps
    mean = first.v * first.dt.view(-1, 1)
    torch.testing.assert_close(_step(first, cfg_sde_step_ref).x_next, mean + first.noise_level * first.eps)


def test_sde_preserves_gaussian_marginals() -> None:
    """Sampling the exact velocity of Gaussian data with the SDE lands on the data distribution.

    Data x_0 ~ N(0, s^2): x_t ~ N(0, (1 - t)^2 s^2 + t^2), and E[eps - x_0 | x_t] = (t - (1 - t) s^2) / var_t x_t.
    A wrong sign in the score correction inflates or collapses the final spread.
    """
    gen = torch.Generator().manual_seed(case_seed())
    s, steps, n = 0.5, 50, 50_000
    times = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    x = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    for t, t_next in zip(times[:-1].tolist(), times[1:].tolist(), strict=True):
        var = (1 - t) ** 2 * s**2 + t**2
        v = (t - (1 - t) * s**2) / var * x
        eps = torch.randn(n, 1, generator=gen, dtype=torch.float64)
        x = cfg_sde_step_ref(v, x, eps, t, t_next - t, 0.7).x_next
    assert abs(x.std().item() - s) < 0.02 * s, x.std().item()
    assert abs(x.mean().item()) < 0.01


# --------------------------------------------------------------------------------------------------
# NaN, inf and bad arguments
# --------------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on inf - inf
def test_nan_and_inf_stay_in_their_sample() -> None:
    seed = case_seed()
    case = sde_case(4, (37,), torch.float32, seed, guided=True)
    case.v[0, 3] = float("nan")
    case.eps[1, 5] = float("inf")
    case.v_uncond[2, 7] = float("-inf")
    with poison_outputs():
        out = _step(case)
    ref = _step(case, cfg_sde_step_ref)
    assert torch.isnan(out.x_next[0, 3]) and torch.isinf(out.x_next[1, 5])
    assert torch.isnan(out.logp[0]) and out.logp[1] == -math.inf and torch.isnan(out.logp[2])
    assert torch.isfinite(out.logp[3])
    assert_close_to_oracle(out.logp, ref.logp, ref.logp, torch.float32, "logp", seed)
    assert torch.isfinite(out.x_next[3]).all() and torch.isfinite(out.x_next[0, 4:]).all()


@pytest.mark.parametrize(
    "impl", [cfg_sde_step_ref, pytest.param(cfg_sde_step_triton, marks=needs_triton)], ids=["torch", "triton"]
)
def test_bad_arguments_raise(impl) -> None:
    case = sde_case(2, (3,), torch.float32, case_seed(), guided=False)
    with pytest.raises(ValueError, match="v_uncond"):
        impl(case.v, case.x_t, case.eps, 0.5, -0.1, 0.7, guidance=4.0)
    with pytest.raises(ValueError, match="dt"):
        impl(case.v, case.x_t, case.eps, 0.5, 0.1, 0.7)
    with pytest.raises(ValueError, match="shape"):
        impl(case.v, case.x_t[:, :2], case.eps, 0.5, -0.1, 0.7)
    with pytest.raises(ValueError, match="reduction"):
        impl(case.v, case.x_t, case.eps, 0.5, -0.1, 0.7, reduction="max")
    with pytest.raises(ValueError, match=r"\[B=2\]"):
        impl(case.v, case.x_t, case.eps, torch.ones(3) * 0.5, -0.1, 0.7)
