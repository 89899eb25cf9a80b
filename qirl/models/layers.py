"""Transformer pieces shared by the tiny DiT and its text encoder.

Kept apart so both networks use the same attention path (`qirl.models.attention.attention`), and the
DiT file reads as the model, not as plumbing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qirl.models.attention import attention


class SelfAttention(nn.Module):
    """Multi-head self-attention with QK RMS-norm.

    QK-normalisation keeps attention logits bounded when the learning rate is high (SD3, Esser et al.
    2024, sec. 5.3.2); the tiny model trains at a high rate, so it is worth the two small norms.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        b, length, dim = x.shape
        qkv = self.qkv(x).view(b, length, 3, self.heads, self.head_dim)  # [B, L, 3, H, Dh]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, Dh]
        q, k = self.q_norm(q), self.k_norm(k)
        out = attention(q, k, v, key_padding_mask)  # [B, H, L, Dh]
        return self.proj(out.transpose(1, 2).reshape(b, length, dim))  # [B, L, D]


class Mlp(nn.Module):
    """Two-layer GELU(tanh) MLP, as in ViT/DiT."""

    def __init__(self, dim: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class EncoderBlock(nn.Module):
    """Pre-LayerNorm transformer encoder block (Xiong et al. 2020): x + Attn(LN x), then x + MLP(LN x)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), key_padding_mask)  # [B, L, D]
        return x + self.mlp(self.norm2(x))  # [B, L, D]


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation ``x * (1 + scale) + shift`` (DiT, Peebles & Xie 2023): x [B, L, D], shift/scale [B, D]."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of a scalar per row: ``[cos(t w_i), sin(t w_i)]``, ``w_i = max_period^(-i/half)``.

    The Transformer position code (Vaswani et al. 2017) applied to time, as in DDPM/DiT. Callers pass
    ``1000 t`` so that t in [0, 1] spans the frequencies the way diffusers' flow models do (SD3/FLUX
    feed ``sigma * 1000``). t: [B] -> [B, dim].
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]  # [B, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, 2 * half]
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb  # [B, dim]


def sincos_2d(grid_h: int, grid_w: int, dim: int) -> Tensor:
    """Fixed 2-D sin-cos position code (MAE, He et al. 2022; DiT): half the channels encode the row,
    half the column, each with the 1-D code ``[sin(p w_i), cos(p w_i)]``, ``w_i = 10000^(-i/(dim/4))``.

    Returns [grid_h * grid_w, dim], rows in raster order (the order patchify uses).
    """
    if dim % 4:
        raise ValueError(f"sincos_2d needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # [D/4]
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )
    parts = []
    for pos in (rows.reshape(-1), cols.reshape(-1)):
        args = pos[:, None] * omega[None, :]  # [N, D/4]
        parts += [torch.sin(args), torch.cos(args)]
    return torch.cat(parts, dim=1).float()  # [N, D]
