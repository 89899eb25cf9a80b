"""`DiffusersPolicy`: the `FlowPolicy` of a diffusers flow-matching pipeline (Qwen-Image, Qwen-Image-Edit,
FLUX.1, SD3), so GRPO, curation, distillation and eval train and sample real models with the same code as
the tiny DiT.

Only the transformer trains; the text encoder(s) and the VAE are frozen (as Qwen-Image freezes its VLM),
kept by reference in copies (`__deepcopy__`), and reached through the pipeline's own methods
(``encode_prompt``, ``_pack_latents``, ``_unpack_latents``, ``_prepare_latent_image_ids``), so the
conditions are exactly those the pipeline builds. The family comes from model_index.json's
``_class_name`` (`PIPELINE_FAMILIES`).

Time and velocity (qirl, `qirl.models.policy`): t = 1 is noise, ``x_t = (1 - t) x_0 + t eps``,
``v = eps - x_0``, Euler ``x_next = x + (t_next - t) v``. diffusers' ``FlowMatchEulerDiscreteScheduler``
uses the same interpolation with ``sigma = t`` and the same step, ``prev = sample + (sigma_next - sigma)
model_output`` (``step``), so the transformer's output IS qirl's velocity, no sign flip. Its timesteps are
``1000 sigma``; what each transformer is given (read in the installed pipelines' ``__call__``):
- Qwen-Image(-Edit): ``timestep / 1000`` = t (`QwenImagePipeline.__call__`; the model scales by 1000).
- FLUX.1: ``timestep / 1000`` = t (`FluxPipeline.__call__`; `FluxTransformer2DModel.forward` multiplies
  t and the embedded guidance by 1000).
- SD3: ``timestep`` = 1000 t (`StableDiffusion3Pipeline.__call__`).

The schedule shift stays qirl's (`qirl.sampling.shift_time`, the recipe's ``sampling.shift``). The
pipelines sample Qwen-Image and FLUX with a dynamic exponential shift ``s = exp(mu)``, ``mu`` linear in the
image token count (``calculate_shift`` with the scheduler config's bounds: Qwen-Image's 0.5..0.9 over
256..8192 tokens give s = 1.7 at 512 px; FLUX's 0.5..1.15 over 256..4096 give s = 3.2 at 1024 px), which is exactly ``shift_time`` with that s
(``exp(mu) / (exp(mu) + 1 / t - 1)``); SD3 uses a static shift of 3.0. `DiffusersPolicy.recommended_shift`
computes the value for the loaded scheduler and resolution (Qwen-Image's ``shift_terminal`` stretch is
not reproduced).

Latents (`latent_shape` = (C, H/f, W/f), f the VAE downsampling) live in the VAE's normalised space, in
[B, C, h, w] layout; packing is internal to `velocity`:
- Qwen-Image: ``z = (mu_vae - mean_c) / std_c`` per channel (``latents_mean/std`` of the VAE config,
  `QwenImageEditPipeline._encode_vae_image`), the VAE's frame axis (length 1) dropped; the transformer
  sees 2x2 patches packed to tokens (``_pack_latents``) and ``img_shapes`` for its RoPE.
- Qwen-Image-Edit: the source image's latents (same normalisation, the posterior mode as the pipeline's
  ``sample_mode="argmax"``) are packed and appended to the image tokens, ``img_shapes`` lists both, and the
  output keeps the first (target) tokens; the VLM text encoder reads the source image inside the edit
  prompt template (`QwenImageEditPipeline.__call__`, ``encode_prompt(image=...)``). Sources are resized to
  the policy resolution, as the pipeline resizes them to its output size.
- FLUX.1: ``z = (mu_vae - shift_factor) * scaling_factor``, 2x2 packed, positions from
  ``_prepare_latent_image_ids``, text positions zero (`FluxPipeline.encode_prompt`).
- SD3: same normalisation, [B, C, h, w] straight into the transformer (it patchifies itself).
`encode_images` uses the posterior mode (deterministic); `decode` inverts the normalisation and returns
``clamp(x / 2 + 0.5, 0, 1)`` as ``VaeImageProcessor.postprocess`` does.

Conditions: ``text`` = the pipeline's prompt embeddings; ``key_padding_mask`` = True at padding (diffusers
masks are True where VALID, so inverted; None when nothing is padding: FLUX and SD3 pad with real pad
tokens the model attends to, so they never have one); ``pooled`` = CLIP pooled (FLUX) or both CLIP
projections (SD3); ``source`` = edit-source latents; ``extras["source_image"]`` = the edit sources as
uint8 [B, 3, H, W] (the VLM must re-read them for the unconditional branch). The unconditional branch
(`null_condition`): Qwen-Image " " (the negative prompt the Qwen-Image examples pass to enable
``true_cfg_scale``); Qwen-Image-Edit " " read with the row's source image, and the source latents kept;
SD3 "" (``encode_prompt``'s default negative prompt); FLUX "" (what ``FluxPipeline`` encodes for
``negative_prompt=""`` with ``true_cfg_scale`` > 1). FLUX.1-dev is guidance-distilled: it is sampled
without CFG (``sampling.guidance: 1``) and takes the guidance as an input, `embedded_guidance` (3.5 by
default, ``FluxPipeline.__call__``'s ``guidance_scale``). qirl's CFG is plain ``v_u + s (v_c - v_u)``;
Qwen-Image's pipeline additionally rescales the guided velocity to the conditional one's norm, which
qirl does not.

dtype: weights (all components) in the loading dtype; `velocity` casts inputs to it and returns float32,
so the SDE step and log-probs stay fp32.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qirl.errors import UserError
from qirl.files import read_json
from qirl.models.policy import Condition, check_velocity_inputs

POLICY_CONFIG = "qirl_policy.json"
POLICY_FORMAT = "qirl-diffusers-policy"
MODEL_INDEX = "model_index.json"

# model_index.json `_class_name` -> family
PIPELINE_FAMILIES = {
    "QwenImagePipeline": "qwen-image",
    "QwenImageEditPipeline": "qwen-image-edit",
    "FluxPipeline": "flux",
    "StableDiffusion3Pipeline": "sd3",
}

# The unconditional prompt of each family (module docstring).
NULL_PROMPTS = {"qwen-image": " ", "qwen-image-edit": " ", "flux": "", "sd3": ""}

# Text tokens kept per prompt when the recipe says 0: each pipeline's ``__call__`` default.
DEFAULT_MAX_SEQUENCE_LENGTH = {"qwen-image": 512, "qwen-image-edit": 512, "flux": 512, "sd3": 256}

DEFAULT_EMBEDDED_GUIDANCE = 3.5  # FluxPipeline.__call__'s guidance_scale

_ATTN = r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
# LoRA targets (`train.lora_targets: auto`), regexes peft full-matches against the policy's module names:
# the attention projections (image and text streams) and MLP linears of the transformer blocks only (module
# names verified on the installed QwenImageTransformer2DModel, FluxTransformer2DModel, SD3Transformer2DModel;
# `attn2` is SD3.5's second attention).
LORA_TARGETS = {
    "qwen-image": rf"transformer\.transformer_blocks\.\d+\.({_ATTN}|img_mlp\.net\.(0\.proj|2)|txt_mlp\.net\.(0\.proj|2))",
    "flux": (
        rf"transformer\.(transformer_blocks\.\d+\.({_ATTN}|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))"
        r"|single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out))"
    ),
    "sd3": (
        r"transformer\.transformer_blocks\.\d+\.(attn2?\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj"
        r"|add_v_proj|to_add_out)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))"
    ),
}
LORA_TARGETS["qwen-image-edit"] = LORA_TARGETS["qwen-image"]

_FROZEN = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")


def _dtype_kwarg() -> str:
    """diffusers renamed ``torch_dtype`` to ``dtype`` (recent releases warn on the old name; older ones
    only know it)."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def is_diffusers_folder(path: str | os.PathLike[str]) -> bool:
    """A pipeline folder (model_index.json) or a saved `DiffusersPolicy` (qirl_policy.json)."""
    path = Path(path)
    return (path / MODEL_INDEX).is_file() or (path / POLICY_CONFIG).is_file()


class DiffusersPolicy(nn.Module):
    """A `FlowPolicy` over a diffusers flow-matching pipeline (module docstring for every convention).

    Build with `from_pretrained`. Registered submodules: ``transformer`` (trained), ``vae`` and the text
    encoders (frozen). ``pipe`` is the diffusers pipeline holding the same modules.
    """

    def __init__(
        self,
        pipe: Any,
        family: str,
        base_path: str | os.PathLike[str],
        resolution: int = 0,
        max_sequence_length: int = 0,
        embedded_guidance: float = 0.0,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if family not in NULL_PROMPTS:
            raise UserError(f"unknown diffusers policy family {family!r} (known: {', '.join(NULL_PROMPTS)})")
        self.family = family
        self.base_path = Path(base_path).resolve()
        self.pipe = pipe
        self.transformer = pipe.transformer
        for name in _FROZEN:
            module = getattr(pipe, name, None)
            if module is not None:
                module.requires_grad_(False)
                setattr(self, name, module)
        self.vae_scale_factor = int(pipe.vae_scale_factor)
        multiple = self.vae_scale_factor * (2 if family != "sd3" else pipe.transformer.config.patch_size)
        self.resolution = int(resolution) or int(pipe.default_sample_size * self.vae_scale_factor)
        if self.resolution % multiple:
            raise UserError(f"policy.resolution={self.resolution} must be a multiple of {multiple} for {family}")
        self.max_sequence_length = int(max_sequence_length) or DEFAULT_MAX_SEQUENCE_LENGTH[family]
        self.guidance_embeds = family == "flux" and bool(pipe.transformer.config.guidance_embeds)
        self.embedded_guidance = float(embedded_guidance) or DEFAULT_EMBEDDED_GUIDANCE
        self._dead = _dead_parameter_prefixes(family, pipe.transformer)
        self.default_lora_targets = _lora_targets(family, pipe.transformer)
        self._t2i_pipe: Any = None  # Qwen-Image-Edit: a QwenImagePipeline over the same modules (t2i rows)
        self._null: dict[tuple[str, str], tuple[Tensor, Tensor | None, Tensor | None]] = {}
        self.set_gradient_checkpointing(gradient_checkpointing)

    # -- loading and saving ----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        options: Any = None,
    ) -> DiffusersPolicy:
        """Load a pipeline folder (model_index.json) or a `save_pretrained` folder (its transformer over the
        base pipeline it names), local files only. ``options`` (`qirl.models.registry.PolicyOptions`)
        sets resolution, max_sequence_length, embedded_guidance and gradient_checkpointing (0 / False:
        the saved value, else the pipeline default). Eval mode; a missing or corrupt folder or an
        unsupported pipeline class is a `UserError`."""
        path = Path(path)
        meta: dict[str, Any] = {}
        transformer_dir = None
        if (path / POLICY_CONFIG).is_file():
            meta = _read_json(path / POLICY_CONFIG)
            if meta.get("format") != POLICY_FORMAT or not isinstance(meta.get("base"), str):
                raise UserError(f"{path / POLICY_CONFIG}: not a {POLICY_FORMAT} file (format or base missing)")
            base = Path(meta["base"])
            transformer_dir = path / "transformer"
            if not (transformer_dir / "config.json").is_file():
                raise UserError(f"{transformer_dir}: saved transformer missing (no config.json)")
        elif (path / MODEL_INDEX).is_file():
            base = path
        else:
            raise UserError(f"{path}: not a diffusers pipeline folder ({MODEL_INDEX}) nor a saved policy ({POLICY_CONFIG})")
        index = _read_json(base / MODEL_INDEX) if (base / MODEL_INDEX).is_file() else None
        if index is None:
            raise UserError(f"{base / MODEL_INDEX}: base pipeline not found (named by {path / POLICY_CONFIG})")
        class_name = index.get("_class_name")
        family = PIPELINE_FAMILIES.get(class_name)
        if family is None:
            raise UserError(
                f"{base / MODEL_INDEX}: pipeline class {class_name!r} is not supported "
                f"(supported: {', '.join(PIPELINE_FAMILIES)})"
            )
        if meta.get("family", family) != family:
            raise UserError(f"{path / POLICY_CONFIG}: family {meta['family']!r} but the base is a {class_name}")
        pipe = _load_pipeline(base, class_name, family, index, transformer_dir, dtype)

        def pick(key: str, default: Any) -> Any:
            value = getattr(options, key, None) if options is not None else None
            return value if value else meta.get(key, default)

        policy = cls(
            pipe,
            family,
            base,
            resolution=pick("resolution", 0),
            max_sequence_length=pick("max_sequence_length", 0),
            embedded_guidance=pick("embedded_guidance", 0.0),
            gradient_checkpointing=bool(getattr(options, "gradient_checkpointing", False)),
        )
        policy.to(device=device, dtype=dtype)
        policy.eval()
        return policy

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Write ``<directory>/transformer`` (diffusers ``save_pretrained``, safetensors) and
        ``qirl_policy.json`` (family, absolute base pipeline path, resolution, text length, embedded
        guidance). Written into a temporary folder beside ``directory`` and renamed into place, so readers
        see the old folder or the whole new one."""
        from qirl.data import publish_mode

        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
        meta = {
            "format": POLICY_FORMAT,
            "family": self.family,
            "pipeline_class": type(self.pipe).__name__,
            "base": str(self.base_path),
            "resolution": self.resolution,
            "max_sequence_length": self.max_sequence_length,
            "embedded_guidance": self.embedded_guidance,
        }
        try:
            with _quiet():
                self.transformer.save_pretrained(str(tmp / "transformer"), safe_serialization=True)
            (tmp / POLICY_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
            publish_mode(tmp)
            if target.exists():
                old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
                os.rename(target, old)
                os.rename(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def __deepcopy__(self, memo: dict[int, Any]) -> DiffusersPolicy:
        """Copy the transformer only; the frozen VAE, text encoders, tokenizers and processor are shared,
        so a KL reference or a LoRA merge of a 20B transformer does not also copy its 7B text encoder."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__ = {k: (copy.copy(v) if isinstance(v, dict) else v) for k, v in self.__dict__.items()}
        new._modules["transformer"] = copy.deepcopy(self.transformer, memo)
        new.pipe = type(self.pipe)(**{**self.pipe.components, "transformer": new._modules["transformer"]})
        new._t2i_pipe = None
        new._null = {}
        return new

    # -- FlowPolicy: shapes, devices, parameters ---------------------------------------------------

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // self.vae_scale_factor
        if self.family in ("qwen-image", "qwen-image-edit"):
            channels = int(self.pipe.vae.config.z_dim)
        elif self.family == "flux":
            channels = int(self.transformer.config.in_channels) // 4  # 2x2 packed
        else:
            channels = int(self.transformer.config.in_channels)
        return (channels, side, side)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def image_size(self) -> int:
        """Side in pixels of the images (`decode`) and of the edit sources `encode` reads."""
        return self.resolution

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The transformer's parameters (text encoders and VAE stay frozen), less those no velocity depends
        on (Qwen-Image's last block's text-stream output, which the model discards): they never get a
        gradient, and DDP would wait for one."""
        return [p for n, p in self.transformer.named_parameters() if not n.startswith(self._dead)]

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute the transformer blocks in backward (diffusers ``enable_gradient_checkpointing``)."""
        if enabled:
            self.transformer.enable_gradient_checkpointing()
        elif getattr(self.transformer, "gradient_checkpointing", False):
            self.transformer.disable_gradient_checkpointing()

    def recommended_shift(self) -> float:
        """The ``sampling.shift`` that reproduces the pipeline's schedule at this resolution: ``exp(mu)`` of
        the dynamic shift (``calculate_shift`` over the packed image token count) or the static shift."""
        cfg = self.pipe.scheduler.config
        if not cfg.get("use_dynamic_shifting", False):
            return float(cfg.get("shift", 1.0))
        c, h, w = self.latent_shape
        seq_len = (h // 2) * (w // 2)
        lo, hi = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
        b_shift, m_shift = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
        mu = b_shift + (m_shift - b_shift) * (seq_len - lo) / (hi - lo)
        return math.exp(mu)

    # -- FlowPolicy: conditions --------------------------------------------------------------------

    def encode(self, prompts: Sequence[str], sources: Sequence[Tensor | None] | None = None) -> Condition:
        """The pipeline's ``encode_prompt`` per row; per row a source image [3, H, W] in [0, 1] (edit; only
        Qwen-Image-Edit takes one) or None (t2i). Text is cut to `max_sequence_length` tokens, except the
        edit template, which the edit pipeline never cuts (its vision tokens come first)."""
        if isinstance(prompts, str):
            raise UserError("prompts must be a list of strings, got a single string")
        prompts = list(prompts)
        n = len(prompts)
        if n == 0:
            raise UserError("encode needs at least one prompt")
        if sources is not None and len(sources) != n:
            raise UserError(f"got {len(sources)} source images for {n} prompts")
        edit_rows = [i for i, s in enumerate(sources or []) if s is not None]
        if edit_rows and self.family != "qwen-image-edit":
            raise UserError(
                f"a {type(self.pipe).__name__} model cannot edit images (edit prompts need a QwenImageEditPipeline)"
            )
        device = self.device
        is_edit = torch.zeros(n, dtype=torch.bool, device=device)  # [B]
        if self.family in ("flux", "sd3"):
            text, pooled = self._encode_clip_t5(prompts)
            return Condition(text=text, is_edit=is_edit, pooled=pooled)
        t2i_rows = sorted(set(range(n)) - set(edit_rows))
        groups = []
        if t2i_rows:
            groups.append((t2i_rows, *self._encode_qwen([prompts[i] for i in t2i_rows], None)))
        source = extras = None
        if edit_rows:
            assert sources is not None
            pixels = torch.stack([self._source_pixels(sources[i], i) for i in edit_rows])  # [E, 3, H, W] uint8
            groups.append((edit_rows, *self._encode_qwen([prompts[i] for i in edit_rows], pixels)))
            is_edit[edit_rows] = True
            side = self.resolution
            image = torch.zeros(n, 3, side, side, dtype=torch.uint8, device=device)  # [B, 3, H, W]
            image[edit_rows] = pixels.to(device)
            source = torch.zeros(n, *self.latent_shape, device=device)  # [B, C, h, w] fp32
            source[edit_rows] = self.encode_images(pixels.to(device).float() / 255)
            extras = {"source_image": image}
        text, mask = _merge_rows(n, groups)
        return Condition(text=text, is_edit=is_edit, key_padding_mask=mask, source=source, extras=extras or {})

    def null_condition(self, cond: Condition) -> Condition:
        """The unconditional branch: `NULL_PROMPTS` per family; edit rows re-read their source image in
        the VLM and keep their source latents. The text-only null embedding is encoded once per device."""
        b = cond.batch_size
        text, mask, pooled = self._null_text()  # [1, L, D], [1, L] | None, [1, P] | None
        if self.family in ("flux", "sd3"):
            assert pooled is not None
            return Condition(
                text=text.expand(b, -1, -1),  # [B, L, D]
                is_edit=cond.is_edit,
                pooled=pooled.expand(b, -1),  # [B, P]
                extras=dict(cond.extras),
            )
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
            groups.append((edit_rows, *self._encode_qwen([NULL_PROMPTS[self.family]] * len(edit_rows), pixels)))
        null_text, null_mask = _merge_rows(b, groups)
        return Condition(
            text=null_text,
            is_edit=cond.is_edit,
            key_padding_mask=null_mask,
            source=cond.source,
            extras=dict(cond.extras),
        )

    def _null_text(self) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(text [1, L, D], padding mask [1, L] or None, pooled [1, P] or None) of the null prompt."""
        key = (str(self.device), str(self.dtype))
        if key not in self._null:
            prompt = NULL_PROMPTS[self.family]
            with torch.no_grad():
                if self.family in ("flux", "sd3"):
                    text, pooled = self._encode_clip_t5([prompt])
                    self._null[key] = (text, None, pooled)
                else:
                    text, mask = self._encode_qwen([prompt], None)
                    self._null[key] = (text, mask, None)
        return self._null[key]

    def _encode_clip_t5(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """FLUX: (T5 states [B, L, D], CLIP pooled [B, P]); SD3: (CLIP-L/G states zero-padded to T5's width
        and concatenated with T5's along the sequence [B, 77 + L, D], both CLIP projections [B, P])."""
        with _quiet():
            if self.family == "flux":
                text, pooled, _text_ids = self.pipe.encode_prompt(
                    prompt=prompts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
                )
            else:
                text, _, pooled, _ = self.pipe.encode_prompt(
                    prompt=prompts,
                    prompt_2=None,
                    prompt_3=None,
                    device=self.device,
                    do_classifier_free_guidance=False,
                    max_sequence_length=self.max_sequence_length,
                )
        return text, pooled

    def _encode_qwen(self, prompts: list[str], pixels: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Qwen2.5-VL states of the pipeline's template (`encode_prompt`): (text [B, L, D], padding mask
        [B, L] True at padding, or None). ``pixels`` [B, 3, H, W] uint8: edit sources, read by the VLM
        through the edit template; None: the text-to-image template (QwenImagePipeline's, also for the t2i
        rows of an edit model, which was fine-tuned from Qwen-Image)."""
        if pixels is None:
            pipe = self.pipe if self.family == "qwen-image" else self._qwen_t2i_pipe()
            text, valid = pipe.encode_prompt(
                prompt=prompts, device=self.device, max_sequence_length=self.max_sequence_length
            )
        else:
            from PIL import Image

            images = [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]
            text, valid = self.pipe.encode_prompt(prompt=prompts, image=images, device=self.device)
        mask = None if valid is None else ~valid.bool()  # diffusers: True = valid; qirl: True = padding
        return text, mask

    def _qwen_t2i_pipe(self) -> Any:
        if self._t2i_pipe is None:
            from diffusers import QwenImagePipeline

            parts = self.pipe.components
            self._t2i_pipe = QwenImagePipeline(
                scheduler=parts["scheduler"],
                vae=parts["vae"],
                text_encoder=parts["text_encoder"],
                tokenizer=parts["tokenizer"],
                transformer=parts["transformer"],
            )
        return self._t2i_pipe

    def _source_pixels(self, image: Tensor, row: int) -> Tensor:
        """An edit source [3, H, W] in [0, 1] -> uint8 [3, R, R] at the policy resolution (resized like the
        pipeline resizes its input to the output size; antialiased bilinear instead of PIL's Lanczos)."""
        if image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise UserError(f"source image {row} must be a float [3, H, W] tensor in [0, 1], got {tuple(image.shape)}")
        side = self.resolution
        x = image.detach().float().cpu()[None]  # [1, 3, H, W]
        if tuple(x.shape[-2:]) != (side, side):
            x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        return (x[0].clamp(0, 1) * 255).round().to(torch.uint8)  # [3, R, R]

    # -- FlowPolicy: velocity ----------------------------------------------------------------------

    def velocity(self, x_t: Tensor, t: Tensor, cond: Condition) -> Tensor:
        """v(x_t, t, c) = the transformer's output at sigma = t (module docstring for each family's timestep
        input and packing). x_t [B, C, h, w], t [B] (or a scalar) in [0, 1] -> float32 [B, C, h, w].
        Goes through ``nn.Module.__call__`` so DDP's and FSDP2's hooks see every evaluation."""
        return self(x_t, t, cond)

    def forward(self, x_t: Tensor, t: Tensor, cond: Condition) -> Tensor:
        """The velocity (call `velocity`)."""
        b = check_velocity_inputs(x_t, cond, self.latent_shape)
        device, dtype = self.device, self.dtype
        t = torch.as_tensor(t, device=device, dtype=torch.float32).reshape(-1).expand(b)  # [B]
        x = x_t.to(device=device, dtype=dtype)  # [B, C, h, w]
        cond = cond.to(device=device, dtype=dtype)
        if self.family in ("flux", "sd3"):
            return self._velocity_mmdit(x, t, cond).float()
        edit = cond.is_edit
        if cond.source is None or not bool(edit.any()):
            return self._velocity_qwen(x, t, cond, None).float()
        if bool(edit.all()):
            return self._velocity_qwen(x, t, cond, cond.source).float()
        # A mixed batch: the edit rows carry extra image tokens, so each task runs its own forward.
        out = torch.empty(x.shape, device=device, dtype=torch.float32)  # [B, C, h, w]
        for rows in (edit.nonzero().flatten(), (~edit).nonzero().flatten()):
            part = cond.index(rows)
            src = part.source if bool(part.is_edit[0]) else None
            out[rows] = self._velocity_qwen(x[rows], t[rows], part, src).float()
        return out

    def _velocity_qwen(self, x: Tensor, t: Tensor, cond: Condition, source: Tensor | None) -> Tensor:
        """QwenImage(Edit)Pipeline.__call__'s transformer call: packed tokens (+ packed source tokens for an
        edit), ``timestep = t``, the VALID-token mask, ``img_shapes`` per image; target tokens unpacked."""
        b, c, h, w = x.shape
        pipe = self.pipe
        tokens = pipe._pack_latents(x, b, c, h, w)  # [B, N, 4C]
        n = tokens.shape[1]
        shapes = [(1, h // 2, w // 2)]
        if source is not None:
            src = pipe._pack_latents(source, b, c, h, w)  # [B, N, 4C]
            tokens = torch.cat([tokens, src], dim=1)  # [B, 2N, 4C]
            shapes.append((1, h // 2, w // 2))
        valid = None if cond.key_padding_mask is None else ~cond.key_padding_mask  # [B, L]
        out = self.transformer(
            hidden_states=tokens,
            timestep=t,
            encoder_hidden_states=cond.text,
            encoder_hidden_states_mask=valid,
            img_shapes=[shapes] * b,
            return_dict=False,
        )[0][:, :n]  # [B, N, 4C], the target image's tokens
        side = self.resolution
        return pipe._unpack_latents(out, side, side, self.vae_scale_factor)[:, :, 0]  # [B, C, h, w]

    def _velocity_mmdit(self, x: Tensor, t: Tensor, cond: Condition) -> Tensor:
        """FluxPipeline / StableDiffusion3Pipeline.__call__'s transformer call (no text mask: both attend to
        their pad tokens)."""
        if cond.key_padding_mask is not None and bool(cond.key_padding_mask.any()):
            raise ValueError(f"{self.family} conditions have no padding; got a key_padding_mask with padding")
        if cond.pooled is None:
            raise ValueError(f"{self.family} needs cond.pooled (use DiffusersPolicy.encode)")
        b, c, h, w = x.shape
        if self.family == "sd3":
            return self.transformer(
                hidden_states=x,
                timestep=1000.0 * t,  # SD3 takes the scheduler's timestep, 1000 sigma
                encoder_hidden_states=cond.text,
                pooled_projections=cond.pooled,
                return_dict=False,
            )[0]  # [B, C, h, w]
        pipe = self.pipe
        tokens = pipe._pack_latents(x, b, c, h, w)  # [B, N, 4C]
        img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)  # [N, 3]
        txt_ids = torch.zeros(cond.text.shape[1], 3, device=x.device, dtype=x.dtype)  # [L, 3]
        guidance = None
        if self.guidance_embeds:
            guidance = torch.full((b,), self.embedded_guidance, device=x.device, dtype=torch.float32)  # [B]
        out = self.transformer(
            hidden_states=tokens,
            timestep=t,
            guidance=guidance,
            pooled_projections=cond.pooled,
            encoder_hidden_states=cond.text,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]  # [B, N, 4C]
        side = self.resolution
        return pipe._unpack_latents(out, side, side, self.vae_scale_factor)  # [B, C, h, w]

    # -- FlowPolicy: images <-> latents ----------------------------------------------------------------

    def encode_images(self, images: Tensor) -> Tensor:
        """Images [B, 3, R, R] in [0, 1] -> normalised latents [B, C, h, w] float32 (posterior mode)."""
        side = self.resolution
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, side, side):
            raise UserError(f"images have shape {tuple(images.shape)}; this policy takes [B, 3, {side}, {side}]")
        if not images.is_floating_point():
            raise UserError(f"images must be float in [0, 1], got {images.dtype}")
        vae = self.pipe.vae
        x = (images * 2 - 1).to(device=self.device, dtype=vae.dtype)  # [B, 3, R, R] in [-1, 1]
        if self.family in ("qwen-image", "qwen-image-edit"):
            z = vae.encode(x[:, :, None]).latent_dist.mode()[:, :, 0]  # [B, C, h, w], frame axis dropped
            mean, std = self._qwen_stats(z)
            return ((z - mean) / std).float()
        z = vae.encode(x).latent_dist.mode()  # [B, C, h, w]
        shift = vae.config.shift_factor or 0.0
        return ((z - shift) * vae.config.scaling_factor).float()

    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents [B, C, h, w] -> images [B, 3, R, R] float32 in [0, 1]."""
        vae = self.pipe.vae
        z = latents.to(device=self.device, dtype=vae.dtype)  # [B, C, h, w]
        if self.family in ("qwen-image", "qwen-image-edit"):
            mean, std = self._qwen_stats(z)
            image = vae.decode((z * std + mean)[:, :, None], return_dict=False)[0][:, :, 0]  # [B, 3, R, R]
        else:
            shift = vae.config.shift_factor or 0.0
            image = vae.decode(z / vae.config.scaling_factor + shift, return_dict=False)[0]  # [B, 3, R, R]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def _qwen_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """The Qwen-Image VAE's per-channel latents_mean / latents_std as [1, C, 1, 1]."""
        cfg = self.pipe.vae.config
        mean = torch.tensor(cfg.latents_mean, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
        std = torch.tensor(cfg.latents_std, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
        return mean, std


# ---------------------------------------------------------------------------------------------- helpers


def _dead_parameter_prefixes(family: str, transformer: nn.Module) -> tuple[str, ...]:
    """Transformer parameter-name prefixes whose output no velocity uses: Qwen-Image's last block updates
    the text stream (``attn.to_add_out``, ``txt_mlp``) and the model then drops it
    (`QwenImageTransformer2DModel.forward` keeps only the image stream). FLUX's and SD3's have none (SD3's
    last block is ``context_pre_only``; FLUX's single blocks share weights between the streams)."""
    if family not in ("qwen-image", "qwen-image-edit"):
        return ()
    last = len(transformer.transformer_blocks) - 1
    return (f"transformer_blocks.{last}.attn.to_add_out.", f"transformer_blocks.{last}.txt_mlp.")


def _lora_targets(family: str, transformer: nn.Module) -> str:
    """`LORA_TARGETS` of the family, less the dead modules (`_dead_parameter_prefixes`): an adapter there
    would never train, and DDP would wait for its gradient."""
    if family not in ("qwen-image", "qwen-image-edit"):
        return LORA_TARGETS[family]
    last = len(transformer.transformer_blocks) - 1
    head = r"transformer\.transformer_blocks\."
    return LORA_TARGETS[family].replace(head, rf"{head}(?!{last}\.(attn\.to_add_out|txt_mlp\.))", 1)


def _merge_rows(n: int, groups: list[tuple[list[int], Tensor, Tensor | None]]) -> tuple[Tensor, Tensor | None]:
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


def _read_json(path: Path) -> dict[str, Any]:
    data = read_json(path, "JSON file")
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _load_pipeline(
    base: Path, class_name: str, family: str, index: dict[str, Any], transformer_dir: Path | None, dtype: torch.dtype | None
) -> Any:
    """``<PipelineClass>.from_pretrained(base, local_files_only=True)``, with the saved transformer in place
    of the base one and (edit) the processor loaded by `_load_processor`."""
    import diffusers

    pipeline_cls = getattr(diffusers, class_name)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs[_dtype_kwarg()] = dtype
    try:
        if family == "qwen-image-edit":
            with _quiet():
                kwargs["processor"] = _load_processor(base / "processor")
        # diffusers warns that qirl's image-only processor is not the Qwen2VLProcessor it expects; it is a
        # Qwen2.5-VL processor with the video half removed, so that one warning is not shown.
        image_only = family == "qwen-image-edit" and type(kwargs["processor"]).__name__ == "ImageOnlyQwenVLProcessor"
        with _quiet(errors_only=image_only):
            if transformer_dir is not None:
                entry = index.get("transformer")
                transformer_cls = getattr(diffusers, entry[1], None) if isinstance(entry, list) else None
                if transformer_cls is None:
                    raise UserError(f"{base / MODEL_INDEX}: no diffusers transformer entry")
                common = {k: v for k, v in kwargs.items() if k != "processor"}
                kwargs["transformer"] = transformer_cls.from_pretrained(str(transformer_dir), **common)
            return pipeline_cls.from_pretrained(str(base), **kwargs)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - diffusers/transformers raise many types for a bad folder
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{base}: cannot load the {class_name} ({type(exc).__name__}: {first})") from None


def _load_processor(folder: Path) -> Any:
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


@contextmanager
def _quiet(errors_only: bool = False) -> Iterator[None]:
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
