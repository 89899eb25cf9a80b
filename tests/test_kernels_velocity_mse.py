"""Velocity MSE: the Triton forward and fused backward against an fp64 oracle, and the gradient formula."""

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
    assert_close_to_oracle,
    case_seed,
    mse_case,
    rerun_in_fresh_process,
)

from qirl.kernels._runtime import poison_outputs
from qirl.kernels.velocity_mse import velocity_mse_ref, velocity_mse_triton

needs_triton = pytest.mark.skipif(not TRITON_RUNS_HERE, reason="Triton cannot run in this process")


@pytest.mark.skipif(TRITON_RUNS_HERE or not HAS_TRITON, reason="the kernels run in this process")
def test_module_in_fresh_process() -> None:
    rerun_in_fresh_process(__file__)


@needs_triton
@pytest.mark.parametrize("teacher_grad", [False, True], ids=["student_grad", "both_grads"])
@pytest.mark.parametrize("sample_shape", SAMPLE_SHAPES, ids=str)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_and_gradients_match_oracle(
    dtype: torch.dtype, batch: int, sample_shape: tuple[int, ...], teacher_grad: bool
) -> None:
    seed = case_seed()
    student, teacher = mse_case(batch, sample_shape, dtype, seed)
    n = student[0].numel()
    # d loss / d per_sample: random and scaled by N so the element gradients are O(1), not O(1/N)
    grad_out = torch.randn(batch, generator=torch.Generator().manual_seed(seed + 1)).to(student.device) * n

    results = {}
    for name, impl, leaf_dtype, kw in (
        ("kernel", velocity_mse_triton, dtype, {}),
        ("oracle", velocity_mse_ref, torch.float64, {}),
        ("same", velocity_mse_ref, dtype, {"upcast": False}),
    ):
        s = student.to(leaf_dtype).detach().requires_grad_()
        t = teacher.to(leaf_dtype).detach().requires_grad_(teacher_grad)
        with poison_outputs(name == "kernel"):
            out = impl(s, t, **kw)
            out.per_sample.backward(grad_out.to(out.per_sample.dtype))
        results[name] = (out, s.grad, t.grad)

    out, gs, gt = results["kernel"]
    assert out.per_sample.dtype == torch.float32 and out.per_sample.shape == (batch,) and out.loss.shape == ()
    assert gs.dtype == dtype and gs.shape == student.shape
    oracle, same = results["oracle"], results["same"]
    assert_close_to_oracle(
        out.per_sample, oracle[0].per_sample, same[0].per_sample, dtype, "per_sample", seed
    )
    assert_close_to_oracle(out.loss, oracle[0].loss, same[0].loss, dtype, "loss", seed)
    assert_close_to_oracle(gs, oracle[1], same[1], dtype, "d mse / d student", seed)
    if teacher_grad:
        assert_close_to_oracle(gt, oracle[2], same[2], dtype, "d mse / d teacher", seed)
    else:
        assert gt is None


@pytest.mark.parametrize(
    "impl", [velocity_mse_ref, pytest.param(velocity_mse_triton, marks=needs_triton)], ids=["torch", "triton"]
)
def test_loss_gradient_is_two_diff_over_count(impl) -> None:
    """d loss / d s = 2 (s - t) / (N B) for loss = mean over the batch of the per-sample MSE."""
    student, teacher = mse_case(13, (4, 3, 5), torch.float32, case_seed())
    s = student.detach().requires_grad_()
    impl(s, teacher).loss.backward()
    torch.testing.assert_close(s.grad, 2 * (student - teacher) / student.numel(), rtol=1e-5, atol=1e-7)


@needs_triton
def test_mixed_dtypes_and_non_contiguous_inputs() -> None:
    """A bf16-style teacher and an fp32 student, laid out channels-last: results as for contiguous fp32."""
    seed = case_seed()
    student, teacher = mse_case(3, (5, 6, 7), torch.float32, seed)
    student = student.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # non-contiguous view
    s = student.detach().requires_grad_()
    out = velocity_mse_triton(s, teacher.half())
    out.loss.backward()
    ref_s = student.detach().requires_grad_()
    ref = velocity_mse_ref(ref_s, teacher.half())
    ref.loss.backward()
    torch.testing.assert_close(out.per_sample, ref.per_sample, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad, ref_s.grad, rtol=1e-5, atol=1e-8)


@needs_triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_and_inf_stay_in_their_sample() -> None:
    student, teacher = mse_case(4, (1030,), torch.float32, case_seed())
    student[0, 3] = math.nan
    student[1, 1029] = math.inf  # in the last, partial tile
    teacher[2, 0] = math.inf
    student[2, 0] = math.inf  # inf - inf
    s = student.detach().requires_grad_()
    with poison_outputs():
        out = velocity_mse_triton(s, teacher)
        out.per_sample.sum().backward()
    assert torch.isnan(out.per_sample[0]) and out.per_sample[1] == math.inf and torch.isnan(out.per_sample[2])
    ref = velocity_mse_ref(student, teacher)
    torch.testing.assert_close(out.per_sample[3], ref.per_sample[3])
    assert torch.isfinite(s.grad[3]).all() and torch.isfinite(s.grad[0, 4:]).all()
    assert torch.isnan(s.grad[0, 3]) and torch.isinf(s.grad[1, 1029])


@pytest.mark.parametrize(
    "impl", [velocity_mse_ref, pytest.param(velocity_mse_triton, marks=needs_triton)], ids=["torch", "triton"]
)
def test_bad_arguments_raise(impl) -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        impl(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="no elements"):
        impl(torch.zeros(2, 0), torch.zeros(2, 0))
