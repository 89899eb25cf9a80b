"""`DiffusersPolicy`: the `FlowPolicy` of a diffusers flow-matching pipeline (Qwen-Image, Qwen-Image-Edit,
FLUX.1, SD3), so GRPO, curation, distillation and eval train and sample real models with the same code as
the tiny DiT.

Only the transformer trains; the text encoder(s) and the VAE are frozen (as Qwen-Image freezes its VLM),
kept by reference in copies (`__deepcopy__`), and reached through the pipeline's own methods
(``encode_prompt``, ``_pack_latents``, ``_unpack_latents``, ``_prepare_latent_image_ids``), so the
conditions are exactly those the pipeline builds. The family comes from model_index.json's
``_class_name`` (`PIPELINE_FAMILIES`); what differs between families lives in one adapter module each
(`qirl.models.families`), so this class has no per-family branches.

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

dtype: weights (all components) in the loading dtype; `velocity` casts inputs to it and returns the
velocity in it (bf16 / fp16 read once by the fused SDE kernels, which compute in fp32, so the SDE step and
log-probs stay fp32); `encode_images` and `decode` return float32.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qirl.errors import UserError
from qirl.files import read_json
from qirl.models.families import FAMILIES, PIPELINE_FAMILIES, Family
from qirl.models.families.base import quiet
from qirl.models.policy import Condition, check_velocity_inputs

POLICY_CONFIG = "qirl_policy.json"
POLICY_FORMAT = "qirl-diffusers-policy"
MODEL_INDEX = "model_index.json"

DEFAULT_EMBEDDED_GUIDANCE = 3.5  # FluxPipeline.__call__'s guidance_scale

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
        if family not in FAMILIES:
            raise UserError(f"unknown diffusers policy family {family!r} (known: {', '.join(FAMILIES)})")
        self.family = family
        fam = self.family_adapter
        self.base_path = Path(base_path).resolve()
        self.pipe = pipe
        self.transformer = pipe.transformer
        for name in _FROZEN:
            module = getattr(pipe, name, None)
            if module is not None:
                module.requires_grad_(False)
                setattr(self, name, module)
        self.vae_scale_factor = int(pipe.vae_scale_factor)
        multiple = fam.resolution_multiple(pipe)
        self.resolution = int(resolution) or int(pipe.default_sample_size * self.vae_scale_factor)
        if self.resolution % multiple:
            raise UserError(f"policy.resolution={self.resolution} must be a multiple of {multiple} for {family}")
        self.max_sequence_length = int(max_sequence_length) or fam.max_sequence_length
        self.guidance_embeds = fam.uses_embedded_guidance(pipe)
        self.embedded_guidance = float(embedded_guidance) or DEFAULT_EMBEDDED_GUIDANCE
        self._dead = fam.dead_parameter_prefixes(pipe.transformer)
        self.default_lora_targets = fam.default_lora_targets(pipe.transformer)
        self._t2i_pipe: Any = None  # Qwen-Image-Edit: a QwenImagePipeline over the same modules (t2i rows)
        self._null: dict[tuple[str, str], tuple[Tensor, Tensor | None, Tensor | None]] = {}
        self.set_gradient_checkpointing(gradient_checkpointing)

    @property
    def family_adapter(self) -> Family:
        """What this pipeline family does differently (`qirl.models.families`)."""
        return FAMILIES[self.family]

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
        pipe = _load_pipeline(base, class_name, FAMILIES[family], index, transformer_dir, dtype)

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
            with quiet():
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
        return (self.family_adapter.latent_channels(self.pipe), side, side)

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
        fam = self.family_adapter
        if not fam.edits and any(s is not None for s in sources or []):
            raise UserError(
                f"a {type(self.pipe).__name__} model cannot edit images (edit prompts need a QwenImageEditPipeline)"
            )
        return fam.encode(self, prompts, sources)

    def null_condition(self, cond: Condition) -> Condition:
        """The unconditional branch (the family's null prompt; an edit row re-reads its source image in the
        VLM and keeps its source latents). The null prompt's states are encoded once per device and dtype."""
        key = (str(self.device), str(self.dtype))
        if key not in self._null:
            with torch.no_grad():
                self._null[key] = self.family_adapter.encode_text(self, [self.family_adapter.null_prompt])
        return self.family_adapter.null_condition(self, cond, self._null[key])

    def source_pixels(self, image: Tensor, row: int) -> Tensor:
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
        input and packing). x_t [B, C, h, w], t [B] (or a scalar) in [0, 1] -> [B, C, h, w] in the model's
        dtype (the fused SDE kernels read it once and compute in fp32).
        Goes through ``nn.Module.__call__`` so DDP's and FSDP2's hooks see every evaluation."""
        return self(x_t, t, cond)

    def forward(self, x_t: Tensor, t: Tensor, cond: Condition) -> Tensor:
        """The velocity (call `velocity`)."""
        b = check_velocity_inputs(x_t, cond, self.latent_shape)
        device, dtype = self.device, self.dtype
        t = torch.as_tensor(t, device=device, dtype=torch.float32).reshape(-1).expand(b)  # [B]
        x = x_t.to(device=device, dtype=dtype)  # [B, C, h, w]
        cond = cond.to(device=device, dtype=dtype)
        return self.family_adapter.transformer_velocity(self, x, t, cond)  # [B, C, h, w] in the model's dtype

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
        return self.family_adapter.encode_latents(vae, x).float()  # [B, C, h, w]

    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents [B, C, h, w] -> images [B, 3, R, R] float32 in [0, 1]."""
        vae = self.pipe.vae
        z = latents.to(device=self.device, dtype=vae.dtype)  # [B, C, h, w]
        image = self.family_adapter.decode_latents(vae, z)  # [B, 3, R, R]
        return (image.float() / 2 + 0.5).clamp(0, 1)


# ---------------------------------------------------------------------------------------------- helpers


def _read_json(path: Path) -> dict[str, Any]:
    data = read_json(path, "JSON file")
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _load_pipeline(
    base: Path, class_name: str, family: Family, index: dict[str, Any], transformer_dir: Path | None, dtype: torch.dtype | None
) -> Any:
    """``<PipelineClass>.from_pretrained(base, local_files_only=True)``, with the saved transformer in place
    of the base one and the family's extra components (Qwen-Image-Edit: its processor)."""
    import diffusers

    pipeline_cls = getattr(diffusers, class_name)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs[_dtype_kwarg()] = dtype
    try:
        extra, hush = family.extra_components(base)
        kwargs.update(extra)
        with quiet(errors_only=hush):
            if transformer_dir is not None:
                entry = index.get("transformer")
                transformer_cls = getattr(diffusers, entry[1], None) if isinstance(entry, list) else None
                if transformer_cls is None:
                    raise UserError(f"{base / MODEL_INDEX}: no diffusers transformer entry")
                common = {k: v for k, v in kwargs.items() if k not in extra}
                kwargs["transformer"] = transformer_cls.from_pretrained(str(transformer_dir), **common)
            return pipeline_cls.from_pretrained(str(base), **kwargs)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - diffusers/transformers raise many types for a bad folder
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{base}: cannot load the {class_name} ({type(exc).__name__}: {first})") from None
