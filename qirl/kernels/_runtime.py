"""What every qirl kernel file shares: the guarded Triton import, launch checks and buffer helpers.

Triton is optional (it ships wheels for Linux x86-64/aarch64 only), so each kernel file defines its
`@triton.jit` kernels under `if HAS_TRITON:` and keeps its pure-torch reference importable anywhere.

CPU tensors can only run a Triton kernel through Triton's interpreter, and the interpreter has to be
switched on (`TRITON_INTERPRET=1`) before `triton.language` is first imported: `@triton.jit` decides at
decoration time whether it builds a compiled or an interpreted function, and the standard library
(`tl.sum`, `tl.max`, ...) is decorated when Triton is imported. Switching it on later mixes both kinds
and fails inside the first reduction, so `check_launchable` refuses early with a message that says what
to do instead.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from qirl.kernels._scalars import per_sample_scalar

try:  # pragma: no branch - the import either works or it does not
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where Triton has no wheel
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = [
    "FP_FUSION",
    "HAS_TRITON",
    "LOG_SQRT_2PI",
    "block_for",
    "check_launchable",
    "empty",
    "interpreter_ready",
    "launch_device",
    "per_sample_scalar",
    "poison_outputs",
    "rows",
    "triton",
    "tl",
]

# 0.5 * log(2 pi): the Gaussian normaliser per latent dimension.
LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

# Largest tile an elementwise-plus-row-reduction program handles. 1024 fp32 lanes with 4 warps is the
# usual starting point for memory-bound Triton kernels; it has not been tuned on a GPU yet.
MAX_BLOCK = 1024

# FMA contraction, pinned: Triton 3.9 warns that its default flips to "off" in 3.10, and the rollout and
# training kernels must keep compiling the mean the same way for the GRPO ratio to start at exactly 1.
FP_FUSION = True

_POISON = False


def interpreter_ready() -> bool:
    """True when Triton's interpreter is active for this process, so kernels can run on CPU tensors.

    Checks the standard library rather than the environment variable: what matters is how `tl.sum` was
    decorated when Triton was imported, not what the variable says now.
    """
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.sum, InterpretedFunction)


def check_launchable(*tensors: torch.Tensor | None) -> None:
    """Refuse a launch that cannot work, with one line that says how to fix it.

    All tensors must share one device; CPU tensors need the interpreter (see the module docstring).
    """
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed: use the torch reference path (QIRL_KERNELS=torch)")
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    device = devices.pop()
    if device.type == "cuda":
        return
    if device.type == "cpu":
        if not interpreter_ready():
            raise RuntimeError(
                "Triton kernels on CPU tensors need the interpreter: set TRITON_INTERPRET=1 before "
                "triton is first imported (e.g. `TRITON_INTERPRET=1 pytest ...`), or use QIRL_KERNELS=torch"
            )
        return
    raise RuntimeError(f"no Triton path for device {device}; use QIRL_KERNELS=torch")


def launch_device(t: torch.Tensor) -> contextlib.AbstractContextManager[object]:
    """Make `t`'s GPU the current one for the launch (Triton launches on the current device)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


@contextlib.contextmanager
def poison_outputs(enabled: bool = True) -> Iterator[None]:
    """Fill every buffer the launchers allocate with NaN instead of leaving it uninitialised.

    Tests use it to prove that a kernel writes each output element: an element it skips stays NaN
    (`torch.empty` may hand back zeros that would hide the bug). Debugging aid on GPU too.
    """
    global _POISON
    before, _POISON = _POISON, enabled
    try:
        yield
    finally:
        _POISON = before


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a kernel output; NaN-filled under `poison_outputs()`."""
    if _POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def block_for(n: int) -> int:
    """Tile size for rows of `n` elements: a power of two, at most MAX_BLOCK, no wider than needed.

    Small rows (a 1-element latent in tests, a tiny model's 4x8x8) do not pay for 1024 masked lanes.
    """
    return max(16, min(MAX_BLOCK, 1 << max(n - 1, 0).bit_length()))


def rows(x: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [B, N] (a view where possible); unlike reshape(B, -1) it also works for B = 0."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))
