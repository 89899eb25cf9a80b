"""Shared setup of the kernel tests and benchmarks: the interpreter switch, input factories, tolerances.

Importing this module switches Triton's interpreter on for machines without CUDA, which must happen
before Triton is first imported (see `qirl/kernels/_runtime.py`). pytest imports the test modules, and
so this one, while collecting, before any test runs; `qirl.ops` imports Triton only on first use. If
something imported Triton earlier anyway, `TRITON_RUNS_HERE` is False and each kernel test module
reruns itself in a fresh process (`rerun_in_fresh_process`).

The benchmarks import the factories from here too, so speed and correctness run the same inputs.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from qirl.kernels._runtime import HAS_TRITON, interpreter_ready  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON_RUNS_HERE = HAS_TRITON and (DEVICE.type == "cuda" or interpreter_ready())
REPO = Path(__file__).resolve().parents[1]

# Extra absolute error allowed on top of twice torch's own same-dtype error (STYLE.md, flash-attention).
ATOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float32: 1e-4, torch.float64: 1e-10}

# Elements per sample and batch sizes the tests sweep: a scalar latent, a prime, one past a tile
# boundary (4097 = 4 x 1024 + 1), and an image-like [C, H, W] shape.
SAMPLE_SHAPES: list[tuple[int, ...]] = [(1,), (7,), (4097,), (3, 5, 11)]
BATCHES = [1, 13]
# bf16 only on a GPU: the interpreter truncates bf16 stores instead of rounding them.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


def case_seed() -> int:
    """The seed of a test's random inputs: fixed (0) by default, so a run is repeatable and CI cannot
    fail by chance; QIRL_TEST_SEED=<n> picks another, QIRL_TEST_SEED=random a fresh one each call (to
    hunt for tolerance bugs; a failure prints its seed through the test's assertion message)."""
    chosen = os.environ.get("QIRL_TEST_SEED", "0")
    return random.SystemRandom().randrange(2**31) if chosen == "random" else int(chosen)


def generator(seed: int, device: torch.device = DEVICE) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def randn(
    shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator, device: torch.device = DEVICE
) -> torch.Tensor:
    """Standard normal in `dtype`, drawn in fp32 so fp16 and fp32 cases see the same distribution."""
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)


# --------------------------------------------------------------------------------------------------
# Input factories
# --------------------------------------------------------------------------------------------------


@dataclass
class SdeCase:
    """Inputs of one SDE step: velocities, state, noise, per-sample times and the noise level."""

    v: torch.Tensor  # [B, ...] conditional velocity
    v_uncond: torch.Tensor | None  # [B, ...] or None
    x_t: torch.Tensor  # [B, ...]
    eps: torch.Tensor  # [B, ...]
    t: torch.Tensor  # [B] fp32
    dt: torch.Tensor  # [B] fp32, < 0
    noise_level: float
    guidance: float

    def cast(self, dtype: torch.dtype) -> SdeCase:
        """Same values in another dtype (fp64 for the oracle); times and scalars unchanged."""
        return SdeCase(
            self.v.to(dtype),
            self.v_uncond.to(dtype) if self.v_uncond is not None else None,
            self.x_t.to(dtype),
            self.eps.to(dtype),
            self.t,
            self.dt,
            self.noise_level,
            self.guidance,
        )


def sde_case(
    batch: int,
    sample_shape: tuple[int, ...],
    dtype: torch.dtype,
    seed: int,
    *,
    guided: bool,
    device: torch.device = DEVICE,
) -> SdeCase:
    """Random SDE-step inputs; times cover the first step (t = 1), the last (t_next = 0) and the middle."""
    gen = generator(seed, device)
    shape = (batch, *sample_shape)
    t = torch.rand(batch, generator=gen, device=device) * 0.9 + 0.05  # [B] in (0.05, 0.95)
    dt = -torch.rand(batch, generator=gen, device=device) * 0.1 - 0.01  # [B] in (-0.11, -0.01)
    t[0] = 1.0  # the guarded first step
    if batch > 1:
        dt[1] = -t[1]  # the last step lands on t = 0
    dt = torch.maximum(dt, -t)  # t_next >= 0
    return SdeCase(
        v=randn(shape, dtype, gen, device),
        v_uncond=randn(shape, dtype, gen, device) if guided else None,
        x_t=randn(shape, dtype, gen, device),
        eps=randn(shape, dtype, gen, device),
        t=t,
        dt=dt,
        noise_level=0.7,
        guidance=4.5 if guided else 1.0,
    )


def mse_case(
    batch: int, sample_shape: tuple[int, ...], dtype: torch.dtype, seed: int, device: torch.device = DEVICE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher velocities [B, ...] that differ by O(0.3), as a half-trained student does."""
    gen = generator(seed, device)
    teacher = randn((batch, *sample_shape), torch.float32, gen, device)
    student = teacher + 0.3 * randn((batch, *sample_shape), torch.float32, gen, device)
    return student.to(dtype), teacher.to(dtype)


def reward_case(
    prompts: int,
    group: int,
    models: int,
    dtype: torch.dtype,
    seed: int,
    *,
    per_prompt_weights: bool,
    missing: float = 0.1,
    device: torch.device = DEVICE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards [P, G, K] with a fraction `missing` of NaN and weights [K] or [P, K] in (0.2, 1.2)."""
    gen = generator(seed, device)
    scale = torch.rand(1, 1, models, generator=gen, device=device) * 5 + 0.1  # reward models' scales
    rewards = randn((prompts, group, models), torch.float32, gen, device) * scale
    rewards[torch.rand(rewards.shape, generator=gen, device=device) < missing] = float("nan")
    wshape = (prompts, models) if per_prompt_weights else (models,)
    weights = torch.rand(wshape, generator=gen, device=device) + 0.2
    return rewards.to(dtype), weights


# --------------------------------------------------------------------------------------------------
# Tolerance rule
# --------------------------------------------------------------------------------------------------


def assert_close_to_oracle(
    kernel: torch.Tensor,
    oracle: torch.Tensor,
    torch_same_dtype: torch.Tensor,
    dtype: torch.dtype,
    what: str,
    seed: int,
) -> None:
    """The kernel's max error against the fp64 oracle is at most 2x torch's own same-dtype error + atol.

    `torch_same_dtype` is the reference computed in the input dtype without upcasting: what plain torch
    code would get. NaN must sit where the oracle has NaN, inf must match exactly.
    """
    k, o, s = (
        kernel.detach().double().cpu(),
        oracle.detach().double().cpu(),
        torch_same_dtype.detach().double().cpu(),
    )
    assert k.shape == o.shape, f"{what}: shape {tuple(k.shape)} != {tuple(o.shape)} (seed {seed})"
    nan_k, nan_o = torch.isnan(k), torch.isnan(o)
    assert torch.equal(nan_k, nan_o), f"{what}: NaN pattern differs from the oracle (seed {seed})"
    inf_o = torch.isinf(o)
    assert torch.equal(k[inf_o], o[inf_o]) and not torch.isinf(k[~inf_o]).any(), (
        f"{what}: inf mismatch (seed {seed})"
    )
    finite = ~nan_o & ~inf_o
    if not finite.any():
        return
    err_kernel = (k - o)[finite].abs().max().item()
    err_torch = (s - o)[finite].abs().nan_to_num(0.0, posinf=0.0).max().item()
    bound = 2 * err_torch + ATOL[dtype]
    assert err_kernel <= bound, (
        f"{what} [{dtype}]: kernel error {err_kernel:.3g} > 2 x torch error {err_torch:.3g} + atol "
        f"{ATOL[dtype]:g} (seed {seed}; rerun with QIRL_TEST_SEED={seed})"
    )


# --------------------------------------------------------------------------------------------------
# Process helpers
# --------------------------------------------------------------------------------------------------


def rerun_in_fresh_process(test_file: str) -> None:
    """Run one kernel test module under pytest in a new process with the interpreter switched on."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (
        f"{test_file} failed in a fresh process:\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"
    )
