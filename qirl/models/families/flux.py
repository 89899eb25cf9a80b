"""FLUX.1 (`FluxPipeline`): T5 text states + CLIP pooled, 2x2-packed latent tokens with positions,
``timestep = t``, and for guidance-distilled checkpoints (FLUX.1-dev) the embedded guidance input."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from qirl.models.families.base import ATTN, Family, TextStates, quiet
from qirl.models.policy import Condition

if TYPE_CHECKING:
    from qirl.models.diffusers_policy import DiffusersPolicy


def check_mmdit_condition(family: str, cond: Condition) -> None:
    """FLUX and SD3 attend to their pad tokens (no text mask) and need the CLIP pooled embedding."""
    if cond.key_padding_mask is not None and bool(cond.key_padding_mask.any()):
        raise ValueError(f"{family} conditions have no padding; got a key_padding_mask with padding")
    if cond.pooled is None:
        raise ValueError(f"{family} needs cond.pooled (use DiffusersPolicy.encode)")


class Flux(Family):
    name = "flux"
    pipeline_class = "FluxPipeline"
    null_prompt = ""  # what FluxPipeline encodes for negative_prompt="" with true_cfg_scale > 1
    max_sequence_length = 512
    # attention projections and MLP linears of the double-stream and single-stream blocks
    lora_targets = (
        rf"transformer\.(transformer_blocks\.\d+\.({ATTN}|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))"
        r"|single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out))"
    )

    def latent_channels(self, pipe: Any) -> int:
        return int(pipe.transformer.config.in_channels) // 4  # 2x2 packed

    def uses_embedded_guidance(self, pipe: Any) -> bool:
        return bool(pipe.transformer.config.guidance_embeds)

    def encode_text(self, policy: DiffusersPolicy, prompts: list[str]) -> TextStates:
        """(T5 states [B, L, D], no mask, CLIP pooled [B, P])."""
        with quiet():
            text, pooled, _text_ids = policy.pipe.encode_prompt(
                prompt=prompts, prompt_2=None, device=policy.device, max_sequence_length=policy.max_sequence_length
            )
        return text, None, pooled

    def transformer_velocity(self, policy: DiffusersPolicy, x: Tensor, t: Tensor, cond: Condition) -> Tensor:
        """FluxPipeline.__call__'s transformer call: packed tokens, image positions from
        ``_prepare_latent_image_ids``, text positions zero, ``timestep = t`` (the model scales by 1000)."""
        check_mmdit_condition(self.name, cond)
        b, c, h, w = x.shape
        pipe = policy.pipe
        tokens = pipe._pack_latents(x, b, c, h, w)  # [B, N, 4C]
        img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)  # [N, 3]
        txt_ids = torch.zeros(cond.text.shape[1], 3, device=x.device, dtype=x.dtype)  # [L, 3]
        guidance = None
        if policy.guidance_embeds:
            guidance = torch.full((b,), policy.embedded_guidance, device=x.device, dtype=torch.float32)  # [B]
        out = policy.transformer(
            hidden_states=tokens,
            timestep=t,
            guidance=guidance,
            pooled_projections=cond.pooled,
            encoder_hidden_states=cond.text,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]  # [B, N, 4C]
        side = policy.resolution
        return pipe._unpack_latents(out, side, side, policy.vae_scale_factor)  # [B, C, h, w]
