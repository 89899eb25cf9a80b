"""qirl.ops: one backend decision per call, the environment override, the log line; AOT compilation."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch
from kernel_cases import (
    DEVICE,
    HAS_TRITON,
    REPO,
    TRITON_RUNS_HERE,
    case_seed,
    mse_case,
    rerun_in_fresh_process,
    reward_case,
    sde_case,
)

from qirl import ops
from qirl.errors import UserError
from qirl.kernels import _runtime
from qirl.kernels import cfg_sde_step as sde_mod
from qirl.kernels import group_advantage as adv_mod
from qirl.kernels import velocity_mse as mse_mod

needs_triton = pytest.mark.skipif(not TRITON_RUNS_HERE, reason="Triton cannot run in this process")
cpu_only = pytest.mark.skipif(DEVICE.type != "cpu", reason="checks the CPU default")

# (module, the Triton entry each functional must reach (through its torch.library op), the reference entry)
ENTRIES = {
    "cfg_sde_step": (sde_mod, "cfg_sde_step_triton", "cfg_sde_step_ref"),
    "sde_logprob": (sde_mod, "sde_logprob_triton", "sde_logprob_ref"),
    "group_advantage": (adv_mod, "group_advantage_triton", "group_advantage_ref"),
    "velocity_mse": (mse_mod, "velocity_mse_triton", "velocity_mse_ref"),
}


@pytest.mark.skipif(TRITON_RUNS_HERE or not HAS_TRITON, reason="the kernels run in this process")
def test_module_in_fresh_process() -> None:
    rerun_in_fresh_process(__file__)


def _call_all(seed: int) -> dict[str, object]:
    """Call every functional once on small CPU/CUDA inputs."""
    c = sde_case(3, (2, 5), torch.float32, seed, guided=True)
    rewards, weights = reward_case(4, 5, 2, torch.float32, seed, per_prompt_weights=True)
    student, teacher = mse_case(3, (7,), torch.float32, seed)
    with torch.no_grad():
        step = ops.cfg_sde_step(
            c.v, c.x_t, c.eps, c.t, c.dt, c.noise_level, v_uncond=c.v_uncond, guidance=c.guidance
        )
    return {
        "cfg_sde_step": step,
        "sde_logprob": ops.sde_logprob(
            c.v, c.x_t, step.x_next, c.t, c.dt, c.noise_level, v_uncond=c.v_uncond, guidance=c.guidance
        ),
        "group_advantage": ops.group_advantage(rewards, weights, clip=5.0),
        "velocity_mse": ops.velocity_mse(student, teacher),
    }


def _spy(monkeypatch: pytest.MonkeyPatch, which: str) -> list[str]:
    """Record which entry (`triton` or `ref`) each functional calls, still running the real one."""
    calls: list[str] = []
    for op, (mod, triton_name, ref_name) in ENTRIES.items():
        for kind, name in (("triton", triton_name), ("torch", ref_name)):
            real = getattr(mod, name)

            def wrapper(*args, _real=real, _tag=f"{op}:{kind}", **kwargs):
                calls.append(_tag)
                return _real(*args, **kwargs)

            monkeypatch.setattr(mod, name, wrapper)
    return calls


@cpu_only
def test_cpu_default_runs_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    calls = _spy(monkeypatch, "torch")
    _call_all(case_seed())
    assert sorted(calls) == sorted(f"{op}:torch" for op in ENTRIES)


@needs_triton
def test_override_forces_triton_and_agrees_with_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    seed = case_seed()
    monkeypatch.setenv(ops.ENV_VAR, "torch")
    ref = _call_all(seed)
    monkeypatch.setenv(ops.ENV_VAR, "triton")
    calls = _spy(monkeypatch, "triton")
    out = _call_all(seed)
    assert sorted(calls) == sorted(f"{op}:triton" for op in ENTRIES)
    torch.testing.assert_close(out["cfg_sde_step"].x_next, ref["cfg_sde_step"].x_next)
    torch.testing.assert_close(out["cfg_sde_step"].logp, ref["cfg_sde_step"].logp)
    torch.testing.assert_close(out["sde_logprob"], ref["sde_logprob"])
    torch.testing.assert_close(out["group_advantage"], ref["group_advantage"])
    torch.testing.assert_close(out["velocity_mse"].per_sample, ref["velocity_mse"].per_sample)


def test_choice_is_logged_once(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(ops.ENV_VAR, "torch")
    monkeypatch.setattr(ops, "_logged", set())
    with caplog.at_level(logging.INFO, logger="qirl.ops"):
        for _ in range(3):
            assert ops.resolve_backend("velocity_mse", torch.device("cpu")) == "torch"
    lines = [r.getMessage() for r in caplog.records if r.name == "qirl.ops"]
    assert lines == ["qirl.ops.velocity_mse: torch backend (QIRL_KERNELS=torch)"]


def test_auto_picks_triton_for_cuda_only_when_triton_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert ops.resolve_backend("x", cpu) == "torch"
    monkeypatch.setattr(_runtime, "HAS_TRITON", True)
    assert ops.resolve_backend("x", cuda) == "triton"
    monkeypatch.setattr(_runtime, "HAS_TRITON", False)
    assert ops.resolve_backend("x", cuda) == "torch"
    monkeypatch.setenv(ops.ENV_VAR, "triton")
    with pytest.raises(UserError, match="not installed"):
        ops.resolve_backend("x", cuda)


def test_bad_override_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ops.ENV_VAR, "cuda")
    with pytest.raises(UserError, match="QIRL_KERNELS='cuda'"):
        ops.resolve_backend("x", torch.device("cpu"))


def test_cfg_sde_step_refuses_inputs_that_require_grad(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ops.ENV_VAR, "torch")
    c = sde_case(2, (3,), torch.float32, case_seed(), guided=False)
    with pytest.raises(ValueError, match="no_grad"):
        ops.cfg_sde_step(c.v.requires_grad_(), c.x_t, c.eps, 0.5, -0.1, 0.7)


@needs_triton
@cpu_only
def test_cpu_launch_without_interpreter_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_runtime, "interpreter_ready", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _runtime.check_launchable(torch.zeros(2))


def test_importing_ops_does_not_import_triton() -> None:
    """Importing Triton early would fix the interpreter setting before a test could choose it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import sys, qirl.ops, qirl.kernels; assert 'triton' not in sys.modules, 'triton imported'"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_every_kernel_compiles_for_hopper(tmp_path) -> None:
    """Compile each kernel variant for sm_90 ahead of time (no GPU needed): catches what the interpreter accepts."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, "benchmarks/compile_kernels.py", "--arch", "90"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("Triton's CUDA toolchain (ptxas) is not available here")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == "compiled 26 kernel variants for sm_90"


@needs_triton
def test_empty_batch_launches_nothing_and_returns_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ops.ENV_VAR, "triton")
    z = torch.zeros(0, 4, 3, device=DEVICE)
    with torch.no_grad():
        step = ops.cfg_sde_step(z, z, z, 0.5, -0.1, 0.7)
    assert step.x_next.shape == (0, 4, 3) and step.logp.shape == (0,)
    assert ops.sde_logprob(z, z, z, 0.5, -0.1, 0.7).shape == (0,)
    assert ops.velocity_mse(z, z).per_sample.shape == (0,)
    assert ops.group_advantage(torch.zeros(0, 4, 2, device=DEVICE)).shape == (0, 4)


@needs_triton
def test_triton_ops_are_registered_custom_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.library's own consistency checks (schema, fake tensors, autograd registration) of every op."""
    from torch.library import opcheck

    monkeypatch.setenv(ops.ENV_VAR, "triton")
    c = sde_case(2, (3, 4), torch.float32, case_seed(), guided=True)
    t, dt = c.t.expand(2).contiguous(), c.dt.expand(2).contiguous()
    x_next = ops.cfg_sde_step(c.v, c.x_t, c.eps, t, dt, c.noise_level, v_uncond=c.v_uncond, guidance=c.guidance).x_next
    v = c.v.clone().requires_grad_()
    student, teacher = mse_case(2, (5,), torch.float32, case_seed())
    rewards, weights = reward_case(2, 4, 2, torch.float32, case_seed(), per_prompt_weights=True)
    cases = [
        (torch.ops.qirl.cfg_sde_step, (c.v, c.x_t, c.eps, t, dt, c.noise_level, c.v_uncond, c.guidance, "mean", True)),
        (torch.ops.qirl.sde_logprob, (v, c.x_t, x_next, t, dt, c.noise_level, c.v_uncond, c.guidance, "mean")),
        (torch.ops.qirl.velocity_mse, (student.clone().requires_grad_(), teacher)),
        (torch.ops.qirl.group_advantage, (rewards, weights, 1e-4, 5.0, False)),
    ]
    for op, args in cases:
        opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_compiled_graph_keeps_the_ops_whole(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile(fullgraph=True) of a GRPO-style loss over sde_logprob and velocity_mse: no graph
    break at the kernels (registered ops on the Triton path, plain torch on the reference path), and the
    same loss and gradients as eager."""
    monkeypatch.setenv(ops.ENV_VAR, backend)
    c = sde_case(2, (3, 4), torch.float32, case_seed(), guided=False)
    with torch.no_grad():
        x_next = ops.cfg_sde_step(c.v, c.x_t, c.eps, c.t, c.dt, c.noise_level).x_next
    target = torch.randn_like(c.v)

    def loss_fn(v: torch.Tensor) -> torch.Tensor:
        logp = ops.sde_logprob(v, c.x_t, x_next, c.t, c.dt, c.noise_level)  # [B]
        return -logp.mean() + ops.velocity_mse(v, target).loss

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    v1, v2 = c.v.clone().requires_grad_(), c.v.clone().requires_grad_()
    eager, graph = loss_fn(v1), compiled(v2)
    eager.backward()
    graph.backward()
    torch.testing.assert_close(graph, eager)
    torch.testing.assert_close(v2.grad, v1.grad)
