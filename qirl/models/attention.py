"""One attention function for every qirl model, with the backend chosen once.

Why one function: the tiny DiT, its text encoder and any future model call `attention()`, so swapping
FlashAttention in or out (or forcing the slow reference to debug a numerical difference) is a single
switch, not an edit in every module.

Backends:
- ``flash``: ``flash_attn.flash_attn_func`` (no mask) or ``flash_attn_varlen_func`` (key padding mask),
  FlashAttention-2 (Dao, 2023). Runs only on CUDA tensors in fp16/bf16 with ``flash_attn`` installed.
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``; torch picks its own fused kernel.
- ``math``: an explicit ``softmax(q k^T / sqrt(Dh)) v`` in float32, the test oracle.
- ``auto`` (default): ``flash`` where it can run, else ``sdpa``.

The request comes from ``QIRL_ATTENTION=auto|flash|sdpa|math`` (read once, on first use) or from
``set_attention_backend(name)``; it is logged once at INFO. Asking for ``flash`` where it cannot run is a
`UserError`, never a silent fallback, so a benchmark never measures the wrong kernel.

Mask convention (the one ``torch.nn.MultiheadAttention`` uses): ``key_padding_mask`` is bool ``[B, Lk]``,
True where the key is padding and must be ignored. Queries are never masked: every query row gets an
output, so all backends agree on every row (a row whose keys are all padding is undefined: NaN under
sdpa/math, zeros under flash; qirl never builds one).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from qirl.errors import UserError

logger = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("auto", "flash", "sdpa", "math")
ENV_VAR = "QIRL_ATTENTION"
_FLASH_DTYPES = (torch.float16, torch.bfloat16)

# Module-level cache: the requested backend (None = not resolved yet) and the flash import result.
_requested: str | None = None
_flash: tuple[Callable[..., Any], Callable[..., Any]] | None = None
_flash_error: str | None = None
_flash_probed = False


def _probe_flash() -> None:
    """Import flash_attn once; remember the functions or why they are missing."""
    global _flash, _flash_error, _flash_probed
    if _flash_probed:
        return
    _flash_probed = True
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except Exception as exc:  # ImportError, or a CUDA/ABI mismatch raised at import time
        _flash_error = f"flash_attn cannot be imported ({type(exc).__name__}: {exc})"
        return
    _flash = (flash_attn_func, flash_attn_varlen_func)


def _validate(name: str, origin: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS:
        raise UserError(f"{origin}={name!r} is not an attention backend; choose one of {', '.join(BACKENDS)}")
    if name == "flash":
        _probe_flash()
        if _flash is None:
            raise UserError(f"{origin}=flash but {_flash_error}; install qirl[flash] or use auto/sdpa")
    return name


def _resolve() -> str:
    """The requested backend, read from the environment on first use and logged once."""
    global _requested
    if _requested is None:
        _requested = _validate(os.environ.get(ENV_VAR, "auto"), ENV_VAR)
        _log_choice(_requested, ENV_VAR)
    return _requested


def _log_choice(name: str, origin: str) -> None:
    if name == "auto":
        _probe_flash()
        if _flash is not None:
            detail = "flash_attn on CUDA fp16/bf16, torch sdpa elsewhere"
        else:
            detail = f"torch sdpa ({_flash_error})"
        logger.info("attention backend: auto -> %s [%s]", detail, origin)
    else:
        logger.info("attention backend: %s [%s]", name, origin)


def set_attention_backend(name: str | None) -> None:
    """Override the backend for this process (tests, benchmarks); None re-reads ``QIRL_ATTENTION``."""
    global _requested
    if name is None:
        _requested = None
        return
    _requested = _validate(name, "set_attention_backend")
    _log_choice(_requested, "set_attention_backend")


def attention_backend(q: Tensor) -> str:
    """The backend that `attention` runs for tensors like ``q``: ``flash``, ``sdpa`` or ``math``."""
    requested = _resolve()
    flash_ok = q.is_cuda and q.dtype in _FLASH_DTYPES
    if requested == "auto":
        _probe_flash()
        return "flash" if (flash_ok and _flash is not None) else "sdpa"
    if requested == "flash" and not flash_ok:
        raise UserError(
            f"attention backend 'flash' needs CUDA fp16/bf16 tensors, got {q.device.type} {q.dtype}; "
            f"use {ENV_VAR}=auto or sdpa"
        )
    return requested


def attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
    """Scaled dot-product attention ``softmax(q k^T / sqrt(Dh)) v`` (Vaswani et al., 2017).

    q: [B, H, Lq, Dh]; k, v: [B, H, Lk, Dh]; key_padding_mask: bool [B, Lk], True = ignore that key.
    Returns [B, H, Lq, Dh] in q's dtype.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects [B, H, L, Dh] tensors, got {tuple(q.shape)}, {tuple(k.shape)}")
    if key_padding_mask is not None and key_padding_mask.shape != (k.shape[0], k.shape[2]):
        raise ValueError(
            f"key_padding_mask {tuple(key_padding_mask.shape)} does not match keys {tuple(k.shape)}"
        )
    backend = attention_backend(q)
    if backend == "flash":
        return _flash_attention(q, k, v, key_padding_mask)
    if backend == "sdpa":
        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]  # [B, 1, 1, Lk]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return attention_math(q, k, v, key_padding_mask)


def attention_math(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
    """The reference: explicit softmax attention in float32, cast back to q's dtype."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale  # [B, H, Lq, Lk]
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1)  # [B, H, Lq, Lk]
    return torch.einsum("bhqk,bhkd->bhqd", probs, v.float()).to(q.dtype)  # [B, H, Lq, Dh]


def _flash_attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
    """FlashAttention-2; with a mask, only the keys are unpadded (varlen), so every query row is kept.

    flash_attn takes [B, L, H, Dh]; the transposes below are views (last dim stays contiguous).
    """
    assert _flash is not None
    flash_func, flash_varlen = _flash
    b, h, lq, dh = q.shape
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, L, H, Dh]
    if key_padding_mask is None:
        return flash_func(qt, kt, vt).transpose(1, 2)  # [B, H, Lq, Dh]
    keep = ~key_padding_mask  # [B, Lk]
    seqlens_k = keep.sum(dim=1, dtype=torch.int32)  # [B]
    cu_k = F.pad(torch.cumsum(seqlens_k, dim=0, dtype=torch.int32), (1, 0))  # [B + 1]
    cu_q = torch.arange(0, (b + 1) * lq, lq, device=q.device, dtype=torch.int32)  # [B + 1]
    out = flash_varlen(
        qt.reshape(b * lq, h, dh),  # [B * Lq, H, Dh]
        kt[keep],  # [total_k, H, Dh]
        vt[keep],  # [total_k, H, Dh]
        cu_q,
        cu_k,
        lq,
        int(seqlens_k.max().item()),
    )  # [B * Lq, H, Dh]
    return out.reshape(b, lq, h, dh).transpose(1, 2)  # [B, H, Lq, Dh]
