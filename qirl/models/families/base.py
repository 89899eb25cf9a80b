"""What one diffusers pipeline family supplies to `DiffusersPolicy`: a small adapter per family.

`DiffusersPolicy` (`qirl.models.diffusers_policy`) owns what every family shares: loading and atomic
saving, copies, devices and dtypes, the trained parameters, input checks, the null-condition cache and
the dtype contract. A `Family` says how its pipeline encodes text (and edit sources), what its
unconditional branch is, how its transformer is called, how its VAE latents are normalised, and which
modules LoRA targets. Adding a family (Wan, FLUX Kontext, Qwen-Image-Edit-Plus) is one new module with a
`Family` subclass, registered in `qirl.models.families.FAMILIES`. Conventions (time, velocity, latents,
conditions) are in `qirl.models.diffusers_policy`'s docstring.

Adapters are stateless; their methods take the policy, whose ``pipe``, ``transformer``, ``resolution``,
``max_sequence_length``, ``device`` and ``dtype`` they read.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from qirl.models.policy import Condition

if TYPE_CHECKING:
    from qirl.models.diffusers_policy import DiffusersPolicy

# (text [B, L, D], padding mask [B, L] True at padding or None, pooled [B, P] or None)
TextStates = tuple[Tensor, Tensor | None, Tensor | None]

ATTN = r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"


class Family:
    """One pipeline family. Subclasses set the class attributes and implement `encode_text` and
    `transformer_velocity`; the defaults below fit text-to-image families with a scaled VAE."""

    name: str = ""
    pipeline_class: str = ""  # model_index.json `_class_name`
    null_prompt: str = ""  # the unconditional prompt (`qirl.models.diffusers_policy` docstring)
    max_sequence_length: int = 512  # text tokens kept when the recipe says 0: the pipeline's default
    # LoRA targets (`train.lora_targets: auto`): a regex peft full-matches against the policy's module names
    lora_targets: str = ""
    edits: bool = False  # takes edit sources (instruction + source image)

    # -- shapes and parameters -------------------------------------------------------------------------

    def resolution_multiple(self, pipe: Any) -> int:
        """Image sides must be multiples of this: the VAE factor times the 2x2 token packing."""
        return int(pipe.vae_scale_factor) * 2

    def latent_channels(self, pipe: Any) -> int:
        return int(pipe.transformer.config.in_channels)

    def dead_parameter_prefixes(self, transformer: nn.Module) -> tuple[str, ...]:
        """Transformer parameter-name prefixes no velocity depends on (never get a gradient)."""
        return ()

    def default_lora_targets(self, transformer: nn.Module) -> str:
        return self.lora_targets

    def uses_embedded_guidance(self, pipe: Any) -> bool:
        """Guidance-distilled transformers take the guidance as an input (FLUX.1-dev)."""
        return False

    # -- loading ---------------------------------------------------------------------------------------

    def extra_components(self, base: Path) -> tuple[dict[str, Any], bool]:
        """(components `from_pretrained` needs besides the folder's, hide diffusers' warnings while loading)."""
        return {}, False

    # -- conditions ------------------------------------------------------------------------------------

    def encode_text(self, policy: DiffusersPolicy, prompts: list[str]) -> TextStates:
        """The pipeline's ``encode_prompt`` of text-to-image prompts."""
        raise NotImplementedError

    def encode(
        self, policy: DiffusersPolicy, prompts: list[str], sources: Sequence[Tensor | None] | None
    ) -> Condition:
        """The condition of ``prompts``; ``sources`` has an image per edit row (only edit families)."""
        text, mask, pooled = self.encode_text(policy, prompts)
        is_edit = torch.zeros(len(prompts), dtype=torch.bool, device=policy.device)  # [B]
        return Condition(text=text, is_edit=is_edit, key_padding_mask=mask, pooled=pooled)

    def null_condition(self, policy: DiffusersPolicy, cond: Condition, null: TextStates) -> Condition:
        """The unconditional branch of ``cond`` from the (cached) null prompt's states ``null`` (batch 1)."""
        b = cond.batch_size
        text, mask, pooled = null
        return Condition(
            text=text.expand(b, -1, -1),  # [B, L, D]
            is_edit=cond.is_edit,
            key_padding_mask=None if mask is None else mask.expand(b, -1),  # [B, L]
            pooled=None if pooled is None else pooled.expand(b, -1),  # [B, P]
            extras=dict(cond.extras),
        )

    # -- velocity --------------------------------------------------------------------------------------

    def transformer_velocity(self, policy: DiffusersPolicy, x: Tensor, t: Tensor, cond: Condition) -> Tensor:
        """The pipeline's transformer call: x [B, C, h, w] and cond in the model's dtype, t [B] fp32 in
        [0, 1] -> velocity [B, C, h, w] in the model's dtype."""
        raise NotImplementedError

    # -- VAE latents -----------------------------------------------------------------------------------

    def encode_latents(self, vae: Any, x: Tensor) -> Tensor:
        """Images [B, 3, R, R] in [-1, 1] (VAE dtype) -> normalised latents [B, C, h, w], posterior mode:
        ``(mu - shift_factor) * scaling_factor``."""
        z = vae.encode(x).latent_dist.mode()  # [B, C, h, w]
        shift = vae.config.shift_factor or 0.0
        return (z - shift) * vae.config.scaling_factor

    def decode_latents(self, vae: Any, z: Tensor) -> Tensor:
        """Normalised latents [B, C, h, w] -> the VAE's images [B, 3, R, R] in about [-1, 1]."""
        shift = vae.config.shift_factor or 0.0
        return vae.decode(z / vae.config.scaling_factor + shift, return_dict=False)[0]


@contextmanager
def quiet(errors_only: bool = False) -> Iterator[None]:
    """No diffusers/transformers progress bars inside library calls (the library never prints); with
    ``errors_only`` no diffusers warnings either. The caller's settings are restored after."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    d_on, t_on, level = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled(), dlog.get_verbosity()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    if errors_only:
        dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)
        if d_on:
            dlog.enable_progress_bar()
        if t_on:
            tlog.enable_progress_bar()
