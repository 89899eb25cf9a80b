"""The contract between a flow-matching model and everything that trains or evaluates it.

GRPO, curation, distillation and eval see a `FlowPolicy` and a `Condition`, nothing else, so the embedded
tiny DiT and a diffusers adapter (Qwen-Image, Qwen-Image-Edit, FLUX, SD3) are interchangeable.

Time convention (diffusers flow matching): t = 1 is noise, t = 0 is data,
``x_t = (1 - t) x_0 + t eps`` and the model predicts the velocity ``v = dx_t/dt = eps - x_0``
(rectified flow, Liu et al. 2022; SD3, Esser et al. 2024).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

Index = int | slice | Sequence[int] | Tensor


@dataclass
class Condition:
    """The encoded condition of a batch; every tensor is batch-first so it can be indexed and repeated.

    The named fields cover the common structure of text-to-image and edit models (a token sequence with
    padding, a pooled vector, source-image latents); ``extras`` carries any other batch-first tensor a
    policy needs (e.g. a diffusers adapter's image ids), and the helpers treat it the same way.
    Tensors that have no batch dimension belong on the policy, not here.

    text: [B, L, D] token states.
    key_padding_mask: bool [B, L], True where the token is padding (torch.nn.MultiheadAttention's rule),
        or None when no token is padding.
    pooled: [B, D] pooled text, or None.
    source: [B, C, H, W] source-image latents for edits (zeros for text-to-image rows of a mixed batch),
        or None when no row is an edit.
    is_edit: bool [B].
    """

    text: Tensor
    is_edit: Tensor
    key_padding_mask: Tensor | None = None
    pooled: Tensor | None = None
    source: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        b = self.text.shape[0]
        for name, value in self._named():
            if value.shape[0] != b:
                raise ValueError(f"Condition.{name} has batch {value.shape[0]}, text has {b}")

    def _named(self) -> Iterable[tuple[str, Tensor]]:
        for name in ("text", "is_edit", "key_padding_mask", "pooled", "source"):
            value = getattr(self, name)
            if value is not None:
                yield name, value
        for name, value in self.extras.items():
            yield f"extras[{name!r}]", value

    def _map(self, fn: Callable[[Tensor], Tensor]) -> Condition:
        def opt(x: Tensor | None) -> Tensor | None:
            return None if x is None else fn(x)

        return Condition(
            text=fn(self.text),
            is_edit=fn(self.is_edit),
            key_padding_mask=opt(self.key_padding_mask),
            pooled=opt(self.pooled),
            source=opt(self.source),
            extras={k: fn(v) for k, v in self.extras.items()},
        )

    @property
    def batch_size(self) -> int:
        return self.text.shape[0]

    def __len__(self) -> int:
        return self.batch_size

    @property
    def device(self) -> torch.device:
        return self.text.device

    def index(self, idx: Index) -> Condition:
        """Rows ``idx`` (an int keeps the batch dimension: ``cond.index(3)`` has batch 1)."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        elif not isinstance(idx, slice | Tensor):
            idx = torch.as_tensor(list(idx), dtype=torch.long, device=self.device)
        elif isinstance(idx, Tensor) and idx.device != self.device:
            idx = idx.to(self.device)
        return self._map(lambda x: x[idx])

    def repeat_interleave(self, n: int) -> Condition:
        """Each row n times in a row (GRPO's G rollouts per prompt): rows 0,0,..,1,1,.."""
        return self._map(lambda x: x.repeat_interleave(n, dim=0))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Condition:
        """Move every tensor; ``dtype`` applies to floating-point tensors only (masks stay bool)."""

        def move(x: Tensor) -> Tensor:
            return x.to(device=device, dtype=dtype if (dtype is not None and x.is_floating_point()) else None)

        return self._map(move)

    def detach(self) -> Condition:
        return self._map(lambda x: x.detach())

    @staticmethod
    def cat(conds: Sequence[Condition]) -> Condition:
        """Concatenate along the batch (e.g. [cond; uncond] for one CFG forward).

        Token sequences of different lengths are right-padded with zeros marked as padding, so a
        length-1 empty prompt joins a length-12 prompt without changing either's attention.
        """
        if not conds:
            raise ValueError("Condition.cat needs at least one condition")
        max_len = max(c.text.shape[1] for c in conds)
        batches = [c.batch_size for c in conds]
        texts, masks = [], []
        for c in conds:
            b, length = c.text.shape[:2]
            mask = c.key_padding_mask
            if mask is None:
                mask = torch.zeros(b, length, dtype=torch.bool, device=c.device)  # [B, L]
            pad = max_len - length
            texts.append(F.pad(c.text, (0, 0, 0, pad)))  # [B, L_max, D]
            masks.append(F.pad(mask, (0, pad), value=True))  # [B, L_max]
        key_padding_mask: Tensor | None = torch.cat(masks)
        if all(c.key_padding_mask is None for c in conds) and all(c.text.shape[1] == max_len for c in conds):
            key_padding_mask = None
        return Condition(
            text=torch.cat(texts),
            is_edit=torch.cat([c.is_edit for c in conds]),
            key_padding_mask=key_padding_mask,
            pooled=_cat_optional([c.pooled for c in conds], batches, "pooled"),
            source=_cat_optional([c.source for c in conds], batches, "source", zeros_ok=True),
            extras=_cat_extras(conds),
        )


def _cat_optional(
    values: list[Tensor | None], batches: list[int], name: str, zeros_ok: bool = False
) -> Tensor | None:
    """Concatenate; None everywhere stays None; a mix becomes zeros where missing if ``zeros_ok``.

    A missing source means "no row is an edit", and zeros are what a mixed batch already stores for
    its text-to-image rows, so filling them keeps the meaning.
    """
    present = [v for v in values if v is not None]
    if not present:
        return None
    if len(present) != len(values) and not zeros_ok:
        raise ValueError(f"Condition.cat: {name} is set in some conditions and not in others")
    like = present[0]
    filled = [
        v if v is not None else like.new_zeros(b, *like.shape[1:])
        for v, b in zip(values, batches, strict=True)
    ]
    return torch.cat(filled)


def _cat_extras(conds: Sequence[Condition]) -> dict[str, Tensor]:
    keys = set(conds[0].extras)
    if any(set(c.extras) != keys for c in conds):
        raise ValueError("Condition.cat: conditions carry different extras keys")
    return {k: torch.cat([c.extras[k] for c in conds]) for k in sorted(keys)}


@runtime_checkable
class FlowPolicy(Protocol):
    """A velocity predictor ``v_theta(x_t, t, c)`` for flow matching, with its encoders and decoder.

    Implemented by `qirl.models.tiny_dit.TinyDiT` and by the diffusers adapter. Latents are what the
    velocity lives on (pixels in [-1, 1] for the tiny model, VAE latents for Qwen-Image/FLUX/SD3).
    """

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one latent."""
        ...

    @property
    def image_size(self) -> int:
        """Side in pixels of the decoded images (and of the edit sources `encode` reads)."""
        ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def encode(self, prompts: Sequence[str], sources: Sequence[Tensor | None] | None = None) -> Condition:
        """Encode prompts, and per row a source image [3, H, W] in [0, 1] (edit) or None (t2i)."""
        ...

    def null_condition(self, cond: Condition) -> Condition:
        """The unconditional branch for CFG: empty prompt; an edit keeps its source image."""
        ...

    def velocity(self, x_t: Tensor, t: Tensor, cond: Condition) -> Tensor:
        """v(x_t, t, c): x_t [B, C, H, W], t [B] in [0, 1] -> [B, C, H, W]."""
        ...

    def encode_images(self, images: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] -> latents [B, C, h, w]."""
        ...

    def decode(self, latents: Tensor) -> Tensor:
        """Latents [B, C, h, w] -> images [B, 3, H, W] in [0, 1]."""
        ...

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters post-training updates."""
        ...


def check_velocity_inputs(x_t: Tensor, cond: Condition, latent_shape: tuple[int, int, int]) -> int:
    """The batch size of a velocity call; ValueError when x_t is not [B, *latent_shape] or cond's batch
    is not B (caller bugs, not user errors)."""
    b = x_t.shape[0]
    if tuple(x_t.shape[1:]) != tuple(latent_shape):
        raise ValueError(f"x_t has shape {tuple(x_t.shape)}, expected [B, {', '.join(map(str, latent_shape))}]")
    if cond.batch_size != b:
        raise ValueError(f"condition has batch {cond.batch_size}, x_t has {b}")
    return b
