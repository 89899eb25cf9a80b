"""Group-normalised, category-weighted GRPO advantages in one launch.

Formula (Qwen-Image-2.0-RL report, multi-reward GRPO; per-group normalisation as in GRPO, Shao et al.
2024, "DeepSeekMath", Sec. 4.1, and Flow-GRPO, Liu et al. 2025, Sec. 4.1), for prompt p, rollout g and
reward model k, with the prompt's category weights w_k:

    mu_pk    = mean_g R_pgk                   over the valid rewards of the group
    sigma_pk = std_g  R_pgk                   population std (ddof 0, Flow-GRPO), or ddof 1 if asked
    A_pg     = sum_k w_pk (R_pgk - mu_pk) / (sigma_pk + eps)
    A_pg     = clamp(A_pg, -clip, clip)       optional (Flow-GRPO clips at 5)

Missing rewards: NaN marks a failed scorer (DESIGN, step 4); +-inf is treated the same way, since one
infinite reward would otherwise turn its whole group into NaN. A missing R_pgk leaves the statistics of
(p, k) and contributes 0 to A_pg: it is scored as the group's mean, without renormalising the other
weights, so one failure does not inflate the influence of the other rewards on that sample alone. A
rollout with no valid reward gets advantage 0, and so does a reward whose group holds one valid value
(its deviation is 0).

Why a kernel: the tensors are tiny ([P, G, K] ~ 64 x 16 x 4), so the time is launch overhead; the eager
version spends about fifteen kernels on masks, counts and sums, the kernel one (one program per prompt,
the whole [G, K] group in registers). Advantages are constants of the policy gradient: no backward.
"""

from __future__ import annotations

import torch

from ._runtime import FP_FUSION, HAS_TRITON, check_launchable, empty, launch_device, tl, triton

__all__ = ["group_advantage_ref", "group_advantage_triton"]

# Largest [G, K] group one program holds in registers.
_MAX_TILE = 1 << 14


def _check_args(rewards: torch.Tensor, weights: torch.Tensor | None, eps: float, clip: float | None) -> None:
    """Raise on shapes and settings that would give a silently wrong answer."""
    if rewards.dim() != 3:
        raise ValueError(f"rewards must be [P, G, K], got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be floating point (NaN marks a missing reward), got {rewards.dtype}")
    p, _, k = rewards.shape
    if weights is not None and weights.shape not in ((k,), (p, k)):
        raise ValueError(f"weights must be [K={k}] or [P={p}, K={k}], got {tuple(weights.shape)}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (a group with equal rewards has std 0), got {eps}")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be > 0 or None, got {clip}")


def group_advantage_ref(
    rewards: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    eps: float = 1e-4,
    clip: float | None = None,
    unbiased: bool = False,
    upcast: bool = True,
) -> torch.Tensor:
    """Advantages [P, G] (fp32; fp64 for fp64 rewards) from rewards [P, G, K] in plain torch.

    weights: [K] shared by all prompts, [P, K] per prompt (category weights), or None for all ones.
    `upcast=False` computes in the rewards' dtype (the tests' measure of torch's own error).
    """
    _check_args(rewards, weights, eps, clip)
    cdt = torch.promote_types(rewards.dtype, torch.float32) if upcast else rewards.dtype
    r = rewards.detach().to(cdt)  # [P, G, K]
    valid = torch.isfinite(r)  # [P, G, K]
    n = valid.sum(dim=1, keepdim=True).to(cdt)  # [P, 1, K]
    mean = torch.where(valid, r, 0).sum(dim=1, keepdim=True) / n.clamp(min=1)  # [P, 1, K]
    dev = torch.where(valid, r - mean, 0)  # [P, G, K]
    var = (dev * dev).sum(dim=1, keepdim=True) / (n - 1 if unbiased else n).clamp(min=1)  # [P, 1, K]
    z = dev / (var.sqrt() + eps)  # [P, G, K]
    if weights is not None:
        z = z * weights.detach().to(cdt).view(-1, 1, rewards.shape[2])  # [P, G, K]
    adv = z.sum(dim=2)  # [P, G]
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv.to(torch.float64 if cdt == torch.float64 else torch.float32)


if HAS_TRITON:
    # Largest finite fp32: |r| <= it is false for NaN and +-inf alike (compiled globals must be constexpr).
    _FLT_MAX = tl.constexpr(3.4028234663852886e38)

    @triton.jit
    def _group_advantage_kernel(
        r_ptr,  # [P, G, K] contiguous rewards, any float dtype
        w_ptr,  # [K] (stride_wp = 0) or [P, K] weights; unused unless HAS_W
        out_ptr,  # [P, G] fp32 advantages
        # group size, number of reward models, weight row stride (0: one [K] row for all prompts)
        G,
        K,
        stride_wp,
        # fp32 scalars
        eps,
        clip,
        HAS_W: tl.constexpr,
        UNBIASED: tl.constexpr,
        CLIP: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        p = tl.program_id(0).to(tl.int64)
        g = tl.arange(0, BLOCK_G)
        k = tl.arange(0, BLOCK_K)
        in_tile = (g[:, None] < G) & (k[None, :] < K)  # [BG, BK]
        r = tl.load(r_ptr + p * G * K + g[:, None] * K + k[None, :], mask=in_tile, other=0.0).to(tl.float32)
        valid = in_tile & (tl.abs(r) <= _FLT_MAX)  # [BG, BK]

        n = tl.sum(valid.to(tl.float32), axis=0)  # [BK]
        mean = tl.sum(tl.where(valid, r, 0.0), axis=0) / tl.maximum(n, 1.0)  # [BK]
        dev = tl.where(valid, r - mean[None, :], 0.0)  # [BG, BK]
        if UNBIASED:
            dof = tl.maximum(n - 1.0, 1.0)
        else:
            dof = tl.maximum(n, 1.0)
        std = tl.sqrt_rn(tl.sum(dev * dev, axis=0) / dof)  # [BK]
        z = dev / (std + eps)[None, :]  # [BG, BK]
        if HAS_W:
            w = tl.load(w_ptr + p * stride_wp + k, mask=k < K, other=0.0).to(tl.float32)  # [BK]
            z = z * w[None, :]
        adv = tl.sum(z, axis=1)  # [BG]
        if CLIP:
            adv = tl.minimum(tl.maximum(adv, -clip), clip)
        tl.store(out_ptr + p * G + g, adv, mask=g < G)


def group_advantage_triton(
    rewards: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    eps: float = 1e-4,
    clip: float | None = None,
    unbiased: bool = False,
) -> torch.Tensor:
    """One launch: advantages [P, G] fp32 (same arguments as `group_advantage_ref`)."""
    _check_args(rewards, weights, eps, clip)
    check_launchable(rewards, weights)
    p, g, k = rewards.shape
    block_g, block_k = triton.next_power_of_2(max(g, 2)), triton.next_power_of_2(max(k, 2))
    if block_g * block_k > _MAX_TILE:
        raise ValueError(f"group of G={g} x K={k} rewards is larger than one program handles ({_MAX_TILE})")
    r = rewards.detach().contiguous()  # [P, G, K]
    w = weights.detach().contiguous() if weights is not None else r  # [K] or [P, K]; dummy if None
    stride_wp = k if weights is not None and weights.dim() == 2 else 0
    out = empty((p, g), torch.float32, rewards.device)  # [P, G]
    if p and g:
        with launch_device(rewards):
            _group_advantage_kernel[(p,)](
                r,
                w,
                out,
                g,
                k,
                stride_wp,
                float(eps),
                float(clip) if clip is not None else 0.0,
                HAS_W=weights is not None,
                UNBIASED=unbiased,
                CLIP=clip is not None,
                BLOCK_G=block_g,
                BLOCK_K=block_k,
                num_warps=1 if block_g * block_k <= 256 else 4,
                enable_fp_fusion=FP_FUSION,
            )
    return out
