"""Stable Diffusion 3 (`StableDiffusion3Pipeline`): CLIP-L/G + T5 text states and both CLIP projections,
[B, C, h, w] latents straight into the transformer (it patchifies), ``timestep = 1000 t``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from qirl.models.families.base import Family, TextStates, quiet
from qirl.models.families.flux import check_mmdit_condition
from qirl.models.policy import Condition

if TYPE_CHECKING:
    from qirl.models.diffusers_policy import DiffusersPolicy


class SD3(Family):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    null_prompt = ""  # encode_prompt's default negative prompt
    max_sequence_length = 256
    # attention projections (`attn2` is SD3.5's second attention) and MLP linears of the blocks
    lora_targets = (
        r"transformer\.transformer_blocks\.\d+\.(attn2?\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj"
        r"|add_v_proj|to_add_out)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))"
    )

    def resolution_multiple(self, pipe: Any) -> int:
        return int(pipe.vae_scale_factor) * int(pipe.transformer.config.patch_size)

    def encode_text(self, policy: DiffusersPolicy, prompts: list[str]) -> TextStates:
        """(CLIP-L/G states zero-padded to T5's width and concatenated with T5's along the sequence
        [B, 77 + L, D], no mask, both CLIP projections [B, P])."""
        with quiet():
            text, _, pooled, _ = policy.pipe.encode_prompt(
                prompt=prompts,
                prompt_2=None,
                prompt_3=None,
                device=policy.device,
                do_classifier_free_guidance=False,
                max_sequence_length=policy.max_sequence_length,
            )
        return text, None, pooled

    def transformer_velocity(self, policy: DiffusersPolicy, x: Tensor, t: Tensor, cond: Condition) -> Tensor:
        """StableDiffusion3Pipeline.__call__'s transformer call (no text mask)."""
        check_mmdit_condition(self.name, cond)
        return policy.transformer(
            hidden_states=x,
            timestep=1000.0 * t,  # SD3 takes the scheduler's timestep, 1000 sigma
            encoder_hidden_states=cond.text,
            pooled_projections=cond.pooled,
            return_dict=False,
        )[0]  # [B, C, h, w]
