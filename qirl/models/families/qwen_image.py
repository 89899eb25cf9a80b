"""Qwen-Image (`QwenImagePipeline`) and Qwen-Image-Edit (`QwenImageEditPipeline`).

Text: Qwen2.5-VL states of the pipeline's prompt template, with a padding mask. Latents: the VAE's
per-channel ``latents_mean`` / ``latents_std`` normalisation, its frame axis (length 1) dropped; the
transformer sees 2x2-packed tokens and ``img_shapes`` for its RoPE, ``timestep = t``. Edits append the
source's packed tokens to the image tokens and keep the first (target) ones; the VLM reads the source
inside the edit template, also for the unconditional branch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from qirl.models.families.base import ATTN, Family, TextStates, quiet
from qirl.models.policy import Condition

if TYPE_CHECKING:
    from qirl.models.diffusers_policy import DiffusersPolicy


class QwenImage(Family):
    name = "qwen-image"
    pipeline_class = "QwenImagePipeline"
    null_prompt = " "  # the negative prompt the Qwen-Image examples pass to enable true_cfg_scale
    max_sequence_length = 512
    # attention projections (image and text streams) and MLP linears of the transformer blocks
    lora_targets = rf"transformer\.transformer_blocks\.\d+\.({ATTN}|img_mlp\.net\.(0\.proj|2)|txt_mlp\.net\.(0\.proj|2))"

    def latent_channels(self, pipe: Any) -> int:
        return int(pipe.vae.config.z_dim)

    def dead_parameter_prefixes(self, transformer: nn.Module) -> tuple[str, ...]:
        """The last block updates the text stream (``attn.to_add_out``, ``txt_mlp``) and the model then drops
        it (`QwenImageTransformer2DModel.forward` keeps only the image stream)."""
        last = len(transformer.transformer_blocks) - 1
        return (f"transformer_blocks.{last}.attn.to_add_out.", f"transformer_blocks.{last}.txt_mlp.")

    def default_lora_targets(self, transformer: nn.Module) -> str:
        """`lora_targets` less the dead modules: an adapter there would never train, and DDP would wait for
        its gradient."""
        last = len(transformer.transformer_blocks) - 1
        head = r"transformer\.transformer_blocks\."
        return self.lora_targets.replace(head, rf"{head}(?!{last}\.(attn\.to_add_out|txt_mlp\.))", 1)

    # -- conditions ------------------------------------------------------------------------------------

    def text_pipeline(self, policy: DiffusersPolicy) -> Any:
        """The pipeline whose text-to-image template encodes prompts."""
        return policy.pipe

    def encode_text(self, policy: DiffusersPolicy, prompts: list[str]) -> TextStates:
        """Qwen2.5-VL states of the text-to-image template: (text [B, L, D], mask [B, L] True at padding or
        None, no pooled)."""
        text, valid = self.text_pipeline(policy).encode_prompt(
            prompt=prompts, device=policy.device, max_sequence_length=policy.max_sequence_length
        )
        return text, _padding(valid), None

    # -- velocity --------------------------------------------------------------------------------------

    def transformer_velocity(self, policy: DiffusersPolicy, x: Tensor, t: Tensor, cond: Condition) -> Tensor:
        return self._velocity(policy, x, t, cond, None)

    def _velocity(
        self, policy: DiffusersPolicy, x: Tensor, t: Tensor, cond: Condition, source: Tensor | None
    ) -> Tensor:
        """QwenImage(Edit)Pipeline.__call__'s transformer call: packed tokens (+ packed source tokens for an
        edit), ``timestep = t``, the VALID-token mask, ``img_shapes`` per image; target tokens unpacked."""
        b, c, h, w = x.shape
        pipe = policy.pipe
        tokens = pipe._pack_latents(x, b, c, h, w)  # [B, N, 4C]
        n = tokens.shape[1]
        shapes = [(1, h // 2, w // 2)]
        if source is not None:
            src = pipe._pack_latents(source, b, c, h, w)  # [B, N, 4C]
            tokens = torch.cat([tokens, src], dim=1)  # [B, 2N, 4C]
            shapes.append((1, h // 2, w // 2))
        valid = None if cond.key_padding_mask is None else ~cond.key_padding_mask  # [B, L]
        out = policy.transformer(
            hidden_states=tokens,
            timestep=t,
            encoder_hidden_states=cond.text,
            encoder_hidden_states_mask=valid,
            img_shapes=[shapes] * b,
            return_dict=False,
        )[0][:, :n]  # [B, N, 4C], the target image's tokens
        side = policy.resolution
        return pipe._unpack_latents(out, side, side, policy.vae_scale_factor)[:, :, 0]  # [B, C, h, w]

    # -- VAE latents -----------------------------------------------------------------------------------

    def encode_latents(self, vae: Any, x: Tensor) -> Tensor:
        z = vae.encode(x[:, :, None]).latent_dist.mode()[:, :, 0]  # [B, C, h, w], frame axis dropped
        mean, std = _stats(vae, z)
        return (z - mean) / std

    def decode_latents(self, vae: Any, z: Tensor) -> Tensor:
        mean, std = _stats(vae, z)
        return vae.decode((z * std + mean)[:, :, None], return_dict=False)[0][:, :, 0]  # [B, 3, R, R]


class QwenImageEdit(QwenImage):
    name = "qwen-image-edit"
    pipeline_class = "QwenImageEditPipeline"
    edits = True

    def extra_components(self, base: Path) -> tuple[dict[str, Any], bool]:
        """The Qwen2.5-VL processor (`load_processor`). diffusers warns that qirl's image-only processor is
        not the Qwen2VLProcessor it expects; it is one with the video half removed, so that one warning is
        not shown."""
        with quiet():
            processor = load_processor(base / "processor")
        return {"processor": processor}, type(processor).__name__ == "ImageOnlyQwenVLProcessor"

    def text_pipeline(self, policy: DiffusersPolicy) -> Any:
        """A QwenImagePipeline over the same modules, built once: text-to-image rows of an edit model use
        Qwen-Image's template (the edit model was fine-tuned from Qwen-Image)."""
        if policy._t2i_pipe is None:
            from diffusers import QwenImagePipeline

            parts = policy.pipe.components
            policy._t2i_pipe = QwenImagePipeline(
                scheduler=parts["scheduler"],
                vae=parts["vae"],
                text_encoder=parts["text_encoder"],
                tokenizer=parts["tokenizer"],
                transformer=parts["transformer"],
            )
        return policy._t2i_pipe

    def encode_edit(self, policy: DiffusersPolicy, prompts: list[str], pixels: Tensor) -> tuple[Tensor, Tensor | None]:
        """Qwen2.5-VL states of the edit template, which reads the sources ``pixels`` [B, 3, H, W] uint8 and
        is never cut to `max_sequence_length` (its vision tokens come first): (text, padding mask)."""
        from PIL import Image

        images = [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]
        text, valid = policy.pipe.encode_prompt(prompt=prompts, image=images, device=policy.device)
        return text, _padding(valid)

    def encode(
        self, policy: DiffusersPolicy, prompts: list[str], sources: Sequence[Tensor | None] | None
    ) -> Condition:
        n = len(prompts)
        edit_rows = [i for i, s in enumerate(sources or []) if s is not None]
        t2i_rows = sorted(set(range(n)) - set(edit_rows))
        device = policy.device
        is_edit = torch.zeros(n, dtype=torch.bool, device=device)  # [B]
        groups = []
        if t2i_rows:
            text, mask, _ = self.encode_text(policy, [prompts[i] for i in t2i_rows])
            groups.append((t2i_rows, text, mask))
        source = None
        extras: dict[str, Any] = {}
        if edit_rows:
            assert sources is not None
            pixels = torch.stack([policy.source_pixels(sources[i], i) for i in edit_rows])  # [E, 3, H, W] uint8
            groups.append((edit_rows, *self.encode_edit(policy, [prompts[i] for i in edit_rows], pixels)))
            is_edit[edit_rows] = True
            side = policy.resolution
            image = torch.zeros(n, 3, side, side, dtype=torch.uint8, device=device)  # [B, 3, H, W]
            image[edit_rows] = pixels.to(device)
            source = torch.zeros(n, *policy.latent_shape, device=device)  # [B, C, h, w] fp32
            source[edit_rows] = policy.encode_images(pixels.to(device).float() / 255)
            extras = {"source_image": image}
        text, mask = merge_rows(n, groups)
        return Condition(text=text, is_edit=is_edit, key_padding_mask=mask, source=source, extras=extras)

    def null_condition(self, policy: DiffusersPolicy, cond: Condition, null: TextStates) -> Condition:
        """" " for text-to-image rows; edit rows read " " with their own source image in the VLM and keep
        their source latents."""
        b = cond.batch_size
        text, mask, _ = null
        edit_rows = cond.is_edit.nonzero().flatten().tolist()
        t2i_rows = sorted(set(range(b)) - set(edit_rows))
        groups = []
        if t2i_rows:
            m = None if mask is None else mask.expand(len(t2i_rows), -1)
            groups.append((t2i_rows, text.expand(len(t2i_rows), -1, -1), m))
        if edit_rows:
            if "source_image" not in cond.extras:
                raise ValueError("edit rows need cond.extras['source_image'] (use DiffusersPolicy.encode)")
            pixels = cond.extras["source_image"][edit_rows]  # [E, 3, H, W] uint8
            groups.append((edit_rows, *self.encode_edit(policy, [self.null_prompt] * len(edit_rows), pixels)))
        null_text, null_mask = merge_rows(b, groups)
        return Condition(
            text=null_text, is_edit=cond.is_edit, key_padding_mask=null_mask, source=cond.source,
            extras=dict(cond.extras),
        )

    def transformer_velocity(self, policy: DiffusersPolicy, x: Tensor, t: Tensor, cond: Condition) -> Tensor:
        """Edit rows carry the source's tokens; a mixed batch runs one forward per task."""
        edit = cond.is_edit
        if cond.source is None or not bool(edit.any()):
            return self._velocity(policy, x, t, cond, None)
        if bool(edit.all()):
            return self._velocity(policy, x, t, cond, cond.source)
        out = torch.empty(x.shape, device=x.device, dtype=x.dtype)  # [B, C, h, w]
        for rows in (edit.nonzero().flatten(), (~edit).nonzero().flatten()):
            part = cond.index(rows)
            src = part.source if bool(part.is_edit[0]) else None
            out[rows] = self._velocity(policy, x[rows], t[rows], part, src)
        return out


def _padding(valid: Tensor | None) -> Tensor | None:
    """diffusers' masks are True where VALID; qirl's are True at padding."""
    return None if valid is None else ~valid.bool()


def _stats(vae: Any, like: Tensor) -> tuple[Tensor, Tensor]:
    """The Qwen-Image VAE's per-channel latents_mean / latents_std as [1, C, 1, 1]."""
    cfg = vae.config
    mean = torch.tensor(cfg.latents_mean, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
    std = torch.tensor(cfg.latents_std, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
    return mean, std


def merge_rows(n: int, groups: list[tuple[list[int], Tensor, Tensor | None]]) -> tuple[Tensor, Tensor | None]:
    """Text rows encoded in groups -> one batch [n, L_max, D] right-padded with zeros, and the padding mask
    [n, L_max] (True at padding; None when no row has any)."""
    if len(groups) == 1 and groups[0][0] == list(range(n)):
        return groups[0][1], groups[0][2]
    length = max(text.shape[1] for _, text, _ in groups)
    like = groups[0][1]
    text_out = like.new_zeros(n, length, like.shape[-1])  # [n, L, D]
    pad = torch.ones(n, length, dtype=torch.bool, device=like.device)  # [n, L]
    for rows, text, mask in groups:
        idx = torch.as_tensor(rows, device=like.device)
        text_out[idx, : text.shape[1]] = text
        pad[idx, : text.shape[1]] = False if mask is None else mask
    return text_out, (pad if bool(pad.any()) else None)


def load_processor(folder: Path) -> Any:
    """The edit pipeline's Qwen2.5-VL processor: transformers' own when it loads (it needs torchvision for
    its video half), else qirl's image-only subclass over the same files (`ImageOnlyQwenVLProcessor`)."""
    from transformers import AutoProcessor
    from transformers.processing_utils import ProcessorMixin

    try:
        processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure falls through to the image-only processor
        processor = None
    if isinstance(processor, ProcessorMixin) and getattr(processor, "image_processor", None) is not None:
        return processor
    from qirl.models.qwen_vl import ImageOnlyQwenVLProcessor

    return ImageOnlyQwenVLProcessor.from_pretrained(str(folder), local_files_only=True)

