"""Group-normalised advantages: the Triton kernel against an fp64 oracle, a hand-computed example, NaN/inf."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_cases import (
    DEVICE,
    DTYPES,
    HAS_TRITON,
    TRITON_RUNS_HERE,
    assert_close_to_oracle,
    case_seed,
    rerun_in_fresh_process,
    reward_case,
)

from qirl.kernels._runtime import poison_outputs
from qirl.kernels.group_advantage import group_advantage_ref, group_advantage_triton

needs_triton = pytest.mark.skipif(not TRITON_RUNS_HERE, reason="Triton cannot run in this process")
both_impls = pytest.mark.parametrize(
    "impl",
    [group_advantage_ref, pytest.param(group_advantage_triton, marks=needs_triton)],
    ids=["torch", "triton"],
)


@pytest.mark.skipif(TRITON_RUNS_HERE or not HAS_TRITON, reason="the kernels run in this process")
def test_module_in_fresh_process() -> None:
    rerun_in_fresh_process(__file__)


@needs_triton
@pytest.mark.parametrize(
    "options", [{}, {"clip": 1.5}, {"unbiased": True, "eps": 1e-6}], ids=["plain", "clip", "unbiased"]
)
@pytest.mark.parametrize("weights_kind", ["shared", "per_prompt", "none"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (13, 7, 3), (5, 16, 1), (3, 24, 5)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_oracle(
    dtype: torch.dtype, shape: tuple[int, int, int], weights_kind: str, options: dict
) -> None:
    seed = case_seed()
    rewards, weights = reward_case(*shape, dtype, seed, per_prompt_weights=weights_kind == "per_prompt")
    w = None if weights_kind == "none" else weights
    with poison_outputs():
        adv = group_advantage_triton(rewards, w, **options)
    assert adv.dtype == torch.float32 and adv.shape == shape[:2]
    oracle = group_advantage_ref(rewards.double(), w.double() if w is not None else None, **options)
    same = group_advantage_ref(rewards, w.to(dtype) if w is not None else None, upcast=False, **options)
    assert_close_to_oracle(adv, oracle, same, dtype, "advantage", seed)


@both_impls
def test_hand_computed_example_with_missing_rewards(impl) -> None:
    """One prompt, three rollouts, two reward models; the middle rollout's second score failed."""
    nan = math.nan
    rewards = torch.tensor([[[1.0, 10.0], [2.0, nan], [3.0, 20.0]]], device=DEVICE)  # [1, 3, 2]
    weights = torch.tensor([1.0, 0.5], device=DEVICE)
    eps = 1e-4
    # reward 0: mean 2, population std sqrt(2/3); reward 1 over {10, 20}: mean 15, std 5
    s0 = math.sqrt(2 / 3)
    expected = torch.tensor(
        [[-1 / (s0 + eps) + 0.5 * -5 / (5 + eps), 0.0, 1 / (s0 + eps) + 0.5 * 5 / (5 + eps)]], device=DEVICE
    )
    torch.testing.assert_close(impl(rewards, weights, eps=eps), expected, rtol=1e-6, atol=1e-6)
    # sample std (ddof 1): sqrt(1) = 1 for reward 0, sqrt(50) for reward 1
    expected_unbiased = torch.tensor(
        [[-1 / (1 + eps) - 0.5 * 5 / (50**0.5 + eps), 0.0, 1 / (1 + eps) + 0.5 * 5 / (50**0.5 + eps)]],
        device=DEVICE,
    )
    torch.testing.assert_close(
        impl(rewards, weights, eps=eps, unbiased=True), expected_unbiased, rtol=1e-6, atol=1e-6
    )
    # clipping applies to the weighted sum
    torch.testing.assert_close(
        impl(rewards, weights, eps=eps, clip=1.0), expected.clamp(-1, 1), rtol=1e-6, atol=1e-6
    )


@both_impls
def test_missing_rows_infinities_and_degenerate_groups(impl) -> None:
    nan, inf = math.nan, math.inf
    rewards = torch.tensor(
        [
            [[1.0, nan], [nan, nan], [3.0, 5.0]],  # middle rollout has no valid reward -> 0
            [[inf, 1.0], [2.0, 1.0], [-inf, 1.0]],  # inf is missing; reward 1 is constant -> contributes 0
            [[nan, nan], [nan, nan], [nan, nan]],  # a failed group -> all 0
            [[4.0, 2.0], [nan, nan], [nan, nan]],  # one valid value per reward -> deviation 0 -> 0
        ],
        device=DEVICE,
    )  # [4, 3, 2]
    with poison_outputs():
        adv = impl(rewards, torch.tensor([1.0, 2.0], device=DEVICE))
    assert torch.isfinite(adv).all()
    assert adv[0, 1] == 0 and (adv[1] == 0).all() and (adv[2] == 0).all() and (adv[3] == 0).all()
    # row 0: reward 0 over {1, 3} -> -1, +1 (std 1); reward 1 has one valid value -> 0
    torch.testing.assert_close(adv[0], torch.tensor([-1 / (1 + 1e-4), 0.0, 1 / (1 + 1e-4)], device=DEVICE))


@both_impls
def test_bad_arguments_raise(impl) -> None:
    rewards = torch.zeros(2, 3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="P, G, K"):
        impl(rewards[0])
    with pytest.raises(ValueError, match="weights"):
        impl(rewards, torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="eps"):
        impl(rewards, eps=0.0)
    with pytest.raises(ValueError, match="floating"):
        impl(rewards.long())
