"""The embedded default policy: one tiny DiT that does text-to-image and image editing on 32x32 RGB.

Architecture (DiT, Peebles & Xie 2023, with SD3/FLUX-style text handling):
- Latents are pixels scaled to [-1, 1]: ``z = 2 x - 1`` (no VAE; 32x32 is already small).
- Edit conditioning, ``edit_conditioning`` in the config:
  - ``channel`` (InstructPix2Pix, Brooks et al. 2023): the network sees ``[x_t ; z_src]`` (2C channels);
    text-to-image rows see ``[x_t ; 0]``.
  - ``sequence`` (Qwen-Image-Edit, Wu et al. 2025): the source is patchified by its own projection and
    its tokens are appended to the sequence, ``[text ; x_t ; src]``, at the same 2-D positions as the
    target plus a "source" type embedding, so attention can copy a patch from where it is or move it.
    Text-to-image rows of a mixed batch mask their (zero) source tokens out; a batch with no edit row
    runs without them, so T2I RL pays nothing for it.
  In both, a learned task embedding (t2i vs edit) tells the two tasks apart, so one set of weights
  serves both tasks and mixed batches.
- Patchify (p x p patches -> tokens) + fixed 2-D sin-cos positions.
- Text conditioning by single-stream joint attention over ``[text tokens ; image tokens]`` (the
  MMDiT idea of SD3 / FLUX single blocks, with shared weights). Chosen over cross-attention because
  (a) it is one attention call per block, which is the cheapest thing on a CPU, (b) it exercises the
  same pattern as Qwen-Image's MMDiT, including a key padding mask on the text part, so the attention
  dispatch (flash varlen / sdpa) is tested on the shape the big models use, and (c) text tokens are
  refined by the image tokens layer by layer instead of being a fixed memory.
- adaLN-Zero conditioning on ``c = MLP(sinusoid(1000 t)) + W pooled_text + task_embedding``: per block
  ``(shift, scale, gate) x 2 = Linear(SiLU(c))``, zero-initialised, so every block starts as identity.
- The output projection is zero-initialised too, so ``v = 0`` at initialisation.

`TinyDiT` implements `qirl.models.policy.FlowPolicy`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import Tensor, nn

from qirl.data import publish_mode
from qirl.errors import UserError
from qirl.files import read_json
from qirl.models.layers import Mlp, SelfAttention, modulate, sincos_2d, timestep_embedding
from qirl.models.policy import Condition, check_velocity_inputs
from qirl.models.text import TextEncoder, load_tokenizer, tokenize

logger = logging.getLogger(__name__)

MODEL_TYPE = "qirl-tiny-dit"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TOKENIZER_NAME = "tokenizer.json"
_TIME_FREQ_DIM = 256
EDIT_CONDITIONING = ("channel", "sequence")


@dataclass
class TinyDiTConfig:
    """Shape of the tiny DiT, sized for GRPO on a laptop CPU.

    Defaults: 2.34 M parameters (1.92 M DiT + 0.42 M text encoder, with a ~190-word vocabulary).
    Measured at batch 32 (14 text tokens, half the rows edits), torch 2.13 CPU, 2 threads on a shared
    2-core machine: velocity forward 70-90 ms, forward + backward 160-180 ms. Alternatives measured the
    same way: patch_size 2 (256 image tokens instead of 64): 230 ms / 790 ms; dim 192: 4.7 M
    parameters, 120 ms / 330 ms. ``vocab_size`` None means "take it from the tokenizer".
    """

    image_size: int = 32
    channels: int = 3
    patch_size: int = 4
    dim: int = 128
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    text_dim: int = 128
    text_depth: int = 2
    text_heads: int = 4
    max_text_len: int = 32
    vocab_size: int | None = None
    edit_conditioning: str = "channel"  # channel | sequence (see the module docstring)

    def validate(self) -> None:
        """Raise ValueError on a shape that cannot be built (callers turn it into a UserError)."""
        if self.edit_conditioning not in EDIT_CONDITIONING:
            raise ValueError(f"edit_conditioning must be one of {', '.join(EDIT_CONDITIONING)}, got {self.edit_conditioning!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and value <= 0:
                raise ValueError(f"{f.name} must be positive, got {value}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ValueError(f"dim {self.dim} must split into heads {self.heads} of even size")
        if self.dim % 4:
            raise ValueError(f"dim {self.dim} must be divisible by 4 (2-D sin-cos positions)")
        if self.text_dim % self.text_heads:
            raise ValueError(f"text_dim {self.text_dim} is not divisible by text_heads {self.text_heads}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "config") -> TinyDiTConfig:
        """Build from a dict (e.g. config.json); unknown keys or bad values are a `UserError` naming ``origin``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"{origin}: unknown TinyDiT config key(s): {', '.join(unknown)}")
        try:
            config = cls(**data)
            config.validate()
        except (TypeError, ValueError) as exc:
            raise UserError(f"{origin}: {exc}") from exc
        return config


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero (DiT, Peebles & Xie 2023, fig. 3):

    ``x += gate1 * Attn(modulate(LN x, shift1, scale1))``, ``x += gate2 * MLP(modulate(LN x, shift2, scale2))``,
    with ``(shift1, scale1, gate1, shift2, scale2, gate2) = Linear(SiLU(c))`` initialised to zero.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio)
        self.ada = nn.Linear(dim, 6 * dim)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: Tensor, c: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(nn.functional.silu(c)).chunk(
            6, dim=-1
        )  # [B, D]
        x = x + gate1[:, None] * self.attn(
            modulate(self.norm1(x), shift1, scale1), key_padding_mask
        )  # [B, L, D]
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))  # [B, L, D]


class TinyDiT(nn.Module):
    """The unified text-to-image + edit flow model of the Shapes world (a `FlowPolicy`)."""

    # LoRA targets (`train.lora_targets: auto`): the DiT blocks' projections, not the frozen text encoder's.
    default_lora_targets = r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"

    def __init__(self, config: TinyDiTConfig, tokenizer: Tokenizer) -> None:
        super().__init__()
        vocab = tokenizer.get_vocab_size()
        if config.vocab_size is None:
            config = replace(config, vocab_size=vocab)
        elif config.vocab_size != vocab:
            raise UserError(
                f"config vocab_size {config.vocab_size} does not match the tokenizer's {vocab} words"
            )
        try:
            config.validate()
        except ValueError as exc:
            raise UserError(f"TinyDiT config: {exc}") from exc
        self.config = config
        self.tokenizer = tokenizer
        c, p = config, config.patch_size
        self.grid = c.image_size // p
        patch_out = c.channels * p * p
        self.sequence_source = c.edit_conditioning == "sequence"
        # channel: x_t and source latents concatenated per patch; sequence: x_t only, the source has its own
        patch_in = patch_out if self.sequence_source else 2 * patch_out

        self.text_encoder = TextEncoder(
            vocab, c.text_dim, c.text_depth, c.text_heads, c.max_text_len, c.mlp_ratio
        )
        self.patch_embed = nn.Linear(patch_in, c.dim)
        self.source_embed = nn.Linear(patch_out, c.dim) if self.sequence_source else None
        self.text_proj = nn.Linear(c.text_dim, c.dim)
        # row 0: text token, row 1: image token, row 2: source-image token (sequence conditioning only)
        self.type_embed = nn.Parameter(torch.zeros(3 if self.sequence_source else 2, c.dim))
        self.register_buffer("pos_embed", sincos_2d(self.grid, self.grid, c.dim), persistent=False)
        self.time_embed = nn.Sequential(nn.Linear(_TIME_FREQ_DIM, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        self.pooled_proj = nn.Linear(c.text_dim, c.dim)
        self.task_embed = nn.Embedding(2, c.dim)  # 0: text-to-image, 1: edit
        self.blocks = nn.ModuleList([DiTBlock(c.dim, c.heads, c.mlp_ratio) for _ in range(c.depth)])
        self.final_norm = nn.LayerNorm(c.dim, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Linear(c.dim, 2 * c.dim)
        self.out = nn.Linear(c.dim, patch_out)
        self._init_weights()

    def _init_weights(self) -> None:
        """Xavier for linear layers (DiT), then zero the adaLN and output layers (adaLN-Zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.type_embed, std=0.02)
        nn.init.normal_(self.task_embed.weight, std=0.02)
        for layer in self.text_encoder.modules():
            if isinstance(layer, nn.Embedding):
                nn.init.normal_(layer.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.ada.weight)
            nn.init.zeros_(block.ada.bias)
        for layer in (self.final_ada, self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # -- FlowPolicy ------------------------------------------------------------------------------------

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.config.channels, self.config.image_size, self.config.image_size)

    @property
    def image_size(self) -> int:
        return self.config.image_size  # no VAE: latents are pixels

    @property
    def device(self) -> torch.device:
        return self.patch_embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.weight.dtype

    @property
    def has_task_specific_parameters(self) -> bool:
        """True with sequence edit conditioning: ``source_embed`` (and the source type embedding) take part
        only in forwards with edit rows, so data parallelism must not wait for their gradients elsewhere."""
        return self.config.edit_conditioning == "sequence"

    def trainable_parameters(self, include_text_encoder: bool = False) -> list[nn.Parameter]:
        """The DiT's parameters; the text encoder's only on request.

        Pretraining trains both (``include_text_encoder=True`` or ``parameters()``); post-training keeps
        the encoder frozen, as Qwen-Image does with its VLM, so conditions encoded once stay valid.
        """
        return [
            p
            for name, p in self.named_parameters()
            if p.requires_grad and (include_text_encoder or not name.startswith("text_encoder."))
        ]

    def encode(self, prompts: Sequence[str], sources: Sequence[Tensor | None] | None = None) -> Condition:
        """Tokenise and encode prompts; per row a source image [3, H, W] in [0, 1] (edit) or None (t2i).

        Runs under the caller's grad mode: pretraining backpropagates into the text encoder, rollouts
        call it under ``torch.no_grad()``.
        """
        if isinstance(prompts, str):
            raise UserError("prompts must be a list of strings, got a single string")
        n = len(prompts)
        if n == 0:
            raise UserError("encode needs at least one prompt")
        if sources is not None and len(sources) != n:
            raise UserError(f"got {len(sources)} source images for {n} prompts")
        ids, mask = tokenize(self.tokenizer, prompts, self.config.max_text_len, self.device)  # [B, L], [B, L]
        text, pooled = self.text_encoder(ids, mask)  # [B, L, Dt], [B, Dt]
        is_edit = torch.tensor([s is not None for s in (sources or [None] * n)], device=self.device)  # [B]
        source = None
        if sources is not None and bool(is_edit.any()):
            shape = self.latent_shape
            source = torch.zeros(n, *shape, device=self.device, dtype=torch.float32)  # [B, C, H, W]
            for i, image in enumerate(sources):
                if image is None:
                    continue
                if tuple(image.shape) != shape:
                    raise UserError(
                        f"source image {i} has shape {tuple(image.shape)}; the tiny DiT takes {shape}"
                    )
                source[i] = self.encode_images(image[None].to(self.device))[0]
        return Condition(text=text, is_edit=is_edit, key_padding_mask=mask, pooled=pooled, source=source)

    def null_condition(self, cond: Condition) -> Condition:
        """Empty prompt for every row; edits keep their source (Qwen-Image-Edit's unconditional branch).

        The empty prompt is ``[CLS]`` alone (length 1), encoded once and broadcast to the batch.
        """
        empty = self.encode([""])
        b = cond.batch_size
        return Condition(
            text=empty.text.expand(b, -1, -1),  # [B, 1, Dt]
            is_edit=cond.is_edit,
            key_padding_mask=None,
            pooled=empty.pooled.expand(b, -1),  # [B, Dt]
            source=cond.source,
            extras=dict(cond.extras),
        )

    def velocity(self, x_t: Tensor, t: Tensor, cond: Condition) -> Tensor:
        """v_theta(x_t, t, c) with the target ``v = eps - x_0`` (diffusers flow matching).

        x_t [B, C, H, W], t [B] (or a scalar) in [0, 1] -> [B, C, H, W] in x_t's dtype. Goes through
        ``nn.Module.__call__`` so FSDP2's and DDP's forward hooks see every velocity evaluation.
        """
        return self(x_t, t, cond)

    def forward(self, x_t: Tensor, t: Tensor, cond: Condition) -> Tensor:
        """The velocity (call `velocity`)."""
        b = check_velocity_inputs(x_t, cond, self.latent_shape)
        if cond.pooled is None:
            raise ValueError("TinyDiT needs cond.pooled (use TinyDiT.encode)")
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(b)  # [B]
        n_edit = int(cond.is_edit.sum())
        if self.sequence_source and cond.source is not None and 0 < n_edit < b:
            # A mixed batch: T2I rows run without source tokens (a third shorter sequence), edit rows with.
            rows = [cond.is_edit.nonzero().squeeze(1), (~cond.is_edit).nonzero().squeeze(1)]  # [E], [B - E]
            parts = [
                self._forward(x_t[r], t[r], replace(cond.index(r), source=None if k else cond.source[r]))
                for k, r in enumerate(rows)
            ]  # [E, C, H, W], [B - E, C, H, W]
            return torch.cat(parts)[torch.argsort(torch.cat(rows))]  # [B, C, H, W] in the input's order
        if self.sequence_source and n_edit == 0 and cond.source is not None:
            cond = replace(cond, source=None)  # T2I rows only: no source tokens to attend to
        return self._forward(x_t, t, cond)

    def _forward(self, x_t: Tensor, t: Tensor, cond: Condition) -> Tensor:
        """The velocity; t [B]. With sequence conditioning, either every row is an edit or none is."""
        b = x_t.shape[0]
        dtype = self.dtype
        x = x_t.to(dtype)  # [B, C, H, W]
        pos = self.pos_embed.to(dtype)  # [N, D]
        txt = self.text_proj(cond.text.to(dtype)) + self.type_embed[0]  # [B, Lt, D]
        n_txt = txt.shape[1]
        if self.sequence_source:
            parts = [txt, self.patch_embed(self._patchify(x)) + pos + self.type_embed[1]]  # + [B, N, D]
            if cond.source is not None:  # `forward` passes a source only to batches of edit rows
                src = self.source_embed(self._patchify(cond.source.to(dtype)))  # [B, N, D]
                parts.append(src + pos + self.type_embed[2])
        else:
            src = torch.zeros_like(x) if cond.source is None else cond.source.to(dtype)  # [B, C, H, W]
            img = self.patch_embed(self._patchify(torch.cat([x, src], dim=1)))  # [B, N, D]
            parts = [txt, img + pos + self.type_embed[1]]
        tokens = torch.cat(parts, dim=1)  # [B, Lt + N (+ N), D]
        mask = None
        if cond.key_padding_mask is not None:
            img_mask = torch.zeros(b, tokens.shape[1] - n_txt, dtype=torch.bool, device=x.device)  # [B, N (+ N)]
            mask = torch.cat([cond.key_padding_mask, img_mask], dim=1)  # [B, Lt + N (+ N)]

        c = self.time_embed(timestep_embedding(1000.0 * t, _TIME_FREQ_DIM).to(dtype))  # [B, D]
        c = c + self.pooled_proj(cond.pooled.to(dtype)) + self.task_embed(cond.is_edit.long())  # [B, D]
        for block in self.blocks:
            tokens = block(tokens, c, mask)  # [B, Lt + N, D]

        img = tokens[:, n_txt : n_txt + self.grid * self.grid]  # [B, N, D]
        shift, scale = self.final_ada(nn.functional.silu(c)).chunk(2, dim=-1)  # [B, D]
        out = self.out(modulate(self.final_norm(img), shift, scale))  # [B, N, p*p*C]
        return self._unpatchify(out).to(x_t.dtype)  # [B, C, H, W]

    def encode_images(self, images: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] -> latents ``2 x - 1`` in [-1, 1]."""
        expected = self.latent_shape
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise UserError(
                f"images have shape {tuple(images.shape)}; the tiny DiT takes [B, {expected[0]}, "
                f"{expected[1]}, {expected[2]}]"
            )
        if not images.is_floating_point():
            raise UserError(f"images must be float in [0, 1], got {images.dtype}")
        return images * 2 - 1  # [B, C, H, W]

    def decode(self, latents: Tensor) -> Tensor:
        """Latents in [-1, 1] -> images ``(z + 1) / 2`` clamped to [0, 1], float32."""
        return ((latents.float() + 1) / 2).clamp(0, 1)  # [B, C, H, W]

    # -- patches ---------------------------------------------------------------------------------------

    def _patchify(self, x: Tensor) -> Tensor:
        """[B, C', H, W] -> [B, N, p*p*C'] in raster order of the (H/p, W/p) grid."""
        b, ch, _, _ = x.shape
        p, g = self.config.patch_size, self.grid
        x = x.reshape(b, ch, g, p, g, p).permute(0, 2, 4, 3, 5, 1)  # [B, g, g, p, p, C']
        return x.reshape(b, g * g, p * p * ch)  # [B, N, p*p*C']

    def _unpatchify(self, x: Tensor) -> Tensor:
        """[B, N, p*p*C] -> [B, C, H, W]; the inverse of `_patchify`."""
        b = x.shape[0]
        p, g, ch = self.config.patch_size, self.grid, self.config.channels
        x = x.reshape(b, g, g, p, p, ch).permute(0, 5, 1, 3, 2, 4)  # [B, C, g, p, g, p]
        return x.reshape(b, ch, g * p, g * p)  # [B, C, H, W]

    # -- checkpoints -----------------------------------------------------------------------------------

    def num_parameters(self, include_text_encoder: bool = True) -> int:
        return sum(
            p.numel() for n, p in self.named_parameters() if include_text_encoder or "text_encoder." not in n
        )

    def save_pretrained(self, directory: str | os.PathLike[str], dtype: torch.dtype | None = None) -> None:
        """Write ``model.safetensors``, ``config.json`` and ``tokenizer.json`` into ``directory``.

        ``dtype`` (e.g. torch.bfloat16) casts floating-point weights to keep shipped files small. Each
        file is written to a temporary name and renamed, so a crash never leaves a half-written file.
        """
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        state = {
            k: v.detach()
            .to(dtype=dtype if (dtype is not None and v.is_floating_point()) else v.dtype)
            .cpu()
            .contiguous()
            for k, v in self.state_dict().items()
        }
        _atomic(path / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"model_type": MODEL_TYPE}))
        config = {"model_type": MODEL_TYPE, **asdict(self.config)}
        _atomic(path / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
        _atomic(path / TOKENIZER_NAME, lambda tmp: self.tokenizer.save(tmp))

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike[str],
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> TinyDiT:
        """Load a `save_pretrained` directory; weights are cast to ``dtype`` (default float32), eval mode.

        A missing directory or file, a corrupt file, or weights that do not fit config.json is a
        `UserError` naming the file.
        """
        path = Path(directory)
        if not path.is_dir():
            raise UserError(f"{path}: checkpoint directory not found")
        config_path = path / CONFIG_NAME
        if not config_path.is_file():
            raise UserError(f"{config_path}: file not found")
        raw = read_json(config_path, "model config")
        if not isinstance(raw, dict) or raw.pop("model_type", None) != MODEL_TYPE:
            raise UserError(f"{config_path}: not a {MODEL_TYPE} config (model_type missing or different)")
        config = TinyDiTConfig.from_dict(raw, origin=str(config_path))

        tokenizer = load_tokenizer(path / TOKENIZER_NAME)
        if config.vocab_size is not None and config.vocab_size != tokenizer.get_vocab_size():
            raise UserError(
                f"{config_path}: vocab_size {config.vocab_size} does not match {TOKENIZER_NAME} "
                f"({tokenizer.get_vocab_size()} words)"
            )
        model = cls(config, tokenizer)

        weights_path = path / WEIGHTS_NAME
        if not weights_path.is_file():
            raise UserError(f"{weights_path}: file not found")
        try:
            state = load_file(str(weights_path))
        except Exception as exc:
            raise UserError(f"{weights_path}: cannot read safetensors ({exc})") from exc
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
        if missing or unexpected or wrong:
            detail = "; ".join(
                f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                if keys
            )
            raise UserError(f"{weights_path}: weights do not match {CONFIG_NAME} ({detail})")
        model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
        model.to(device=device, dtype=dtype or torch.float32)
        model.eval()
        logger.info("loaded %s (%d parameters) from %s", MODEL_TYPE, model.num_parameters(), path)
        return model


def _atomic(target: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename onto ``target`` (atomic on POSIX within one filesystem)."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        publish_mode(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
