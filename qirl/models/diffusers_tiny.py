"""Tiny random-weight diffusers pipelines (Qwen-Image, Qwen-Image-Edit, FLUX.1, SD3), built offline.

The diffusers adapter (`qirl.models.diffusers_policy`) must be tested, documented and benchmarked without
the hub, so this module builds each supported pipeline from configs alone: the same classes as the real
checkpoints (transformer, VAE, text encoders, scheduler), shrunk to 1-2 layers and a few dozen channels,
randomly initialised from a seed, and `save_pretrained` into a folder that `load_policy` reads like a
downloaded pipeline. A 32x32 image is an 8x8 latent (VAE downsampling 4) and 16 image tokens.

Tokenizers are built locally with the `tokenizers` library over the Shapes grammar's words and the
pipelines' prompt templates, wrapped as transformers fast tokenizers (so they round-trip through
``save_pretrained``):
- Qwen-Image(-Edit): a word-level vocabulary behind Qwen2's pre-tokenisation regex (the split rule of
  Qwen2's tokenizer.json). Template words are whole tokens in Qwen's BPE too, so the system prompts have
  exactly the lengths the pipelines drop (``prompt_template_encode_start_idx``: 34 tokens for
  Qwen-Image, 64 for Qwen-Image-Edit); `build_tiny_pipeline` checks it. The edit pipeline's processor is
  qirl's image-only Qwen2.5-VL processor (`qirl.rewards.vlm.tokenizer`), whose image processor pins
  every source to 32x32 pixels = 16 vision tokens.
- FLUX / SD3: lower-cased word-level CLIP (``<|startoftext|> ... <|endoftext|>``, padded with
  ``<|endoftext|>`` to CLIP's 77 positions) and T5 (``... </s>``, padded with ``<pad>``) tokenizers.

Sizes: each transformer has 78-90 k parameters; a pipeline folder is 0.75 MB (FLUX, SD3) or 2.1 MB
(Qwen, whose VLM embeds the vocabulary). Measured with one CPU thread (torch 2.13, shared 2-core machine),
8 rows at 32x32 with the pipelines' default text lengths: velocity 1.5 ms (Qwen-Image, 14 text tokens),
1.9 ms (Qwen-Image-Edit, 32), 7.7 ms (SD3, 77 + 256), 20 ms (FLUX, 512 T5 tokens); VAE decode 4-18 ms.

API: `make_tiny_pipeline(family, seed)` returns the pipeline object; `build_tiny_pipeline(family,
directory, seed)` saves it and returns the folder. ``family``: one of `TINY_FAMILIES`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from qirl.errors import UserError

TINY_FAMILIES = ("qwen-image", "qwen-image-edit", "flux", "sd3")

# Qwen2's pre-tokenisation regex (the Split pre-tokenizer of Qwen2/Qwen2.5-VL's tokenizer.json).
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
CLIP_MAX_LENGTH = 77
TINY_IMAGE = 32  # side of the image the tiny VLM's processor pins every edit source to
_CORPUS = 300  # grammar records read for the vocabulary (every Shapes word appears well before that)


def _corpus() -> list[str]:
    """Shapes captions and edit instructions (both splits) plus the empty/blank negative prompts."""
    from qirl.shapes.corpus import grammar_corpus

    return [*grammar_corpus(_CORPUS, 0), "", " "]


# ------------------------------------------------------------------------------------------ tokenizers


def qwen_tokenizer() -> Any:
    """A Qwen2-style tokenizer: the Qwen2.5-VL special tokens, Qwen2's split regex, a word-level vocabulary
    over the Shapes grammar and both Qwen-Image prompt templates; right padding (as Qwen2Tokenizer)."""
    from diffusers import QwenImageEditPipeline, QwenImagePipeline
    from tokenizers import Regex, Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    from qirl.models.qwen_vl import SPECIAL_TOKENS, UNK, wrap

    split = pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated")
    templates = [_template(QwenImagePipeline), _template(QwenImageEditPipeline)]
    words: set[str] = set()
    for text in [*_corpus(), *templates]:
        for special in SPECIAL_TOKENS:
            text = text.replace(special, "\n")
        words.update(piece for piece, _ in split.pre_tokenize_str(text))
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *sorted(words - set(SPECIAL_TOKENS))])}
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = split
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return wrap(backend, padding_side="right", model_max_length=2048)


def _template(pipeline_cls: Any) -> str:
    """The pipeline's ``prompt_template_encode``: an instance attribute set in ``__init__``, so read from an
    instance without components (diffusers pipelines accept None for each)."""
    import inspect

    names = [p for p in inspect.signature(pipeline_cls.__init__).parameters if p != "self"]
    return pipeline_cls(**{name: None for name in names}).prompt_template_encode


def _word_tokenizer(bos: str | None, eos: str, pad: str, unk: str, lowercase: bool, max_length: int) -> Any:
    """A word-level fast tokenizer over the Shapes grammar: ``[bos] words eos`` (CLIP / T5 layout)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    specials = [t for t in (pad, unk, bos, eos) if t is not None]
    specials = list(dict.fromkeys(specials))
    norm = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()] if lowercase else [normalizers.NFKC()])
    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    words = {w for text in _corpus() for w, _ in pre.pre_tokenize_str(norm.normalize_str(text))}
    vocab = {tok: i for i, tok in enumerate([*specials, *sorted(words - set(specials))])}
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token=unk))
    backend.normalizer = norm
    backend.pre_tokenizer = pre
    single = f"{bos} $A {eos}" if bos is not None else f"$A {eos}"
    backend.post_processor = TemplateProcessing(
        single=single, special_tokens=[(t, vocab[t]) for t in (bos, eos) if t is not None]
    )
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        model_max_length=max_length,
    )


def clip_tokenizer() -> Any:
    """CLIP's layout: lower-cased, ``<|startoftext|> ... <|endoftext|>``, padded with ``<|endoftext|>``."""
    return _word_tokenizer(CLIP_BOS, CLIP_EOS, CLIP_EOS, CLIP_EOS, lowercase=True, max_length=CLIP_MAX_LENGTH)


def t5_tokenizer() -> Any:
    """T5's layout: ``... </s>`` padded with ``<pad>`` (id 0)."""
    return _word_tokenizer(None, T5_EOS, T5_PAD, T5_UNK, lowercase=False, max_length=512)


# ---------------------------------------------------------------------------------------- text encoders


def _clip(tokenizer: Any, hidden: int, projection: int | None) -> Any:
    """CLIPTextModel (FLUX's pooled encoder) or CLIPTextModelWithProjection (SD3's two CLIPs)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection or hidden,
        # The pooled state is read at the first eos; with eos_token_id != 2 CLIP looks it up by id.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5(tokenizer: Any, d_model: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def _qwen_vl(tokenizer: Any) -> Any:
    """The embedded reward VLM's tiny Qwen2.5-VL shape (`qirl.models.qwen_vl.tiny_config`)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from qirl.models.qwen_vl import TinyVLMSpec, tiny_config

    config = tiny_config(TinyVLMSpec(image_size=TINY_IMAGE), tokenizer)
    config._attn_implementation = "sdpa"
    return Qwen2_5_VLForConditionalGeneration(config)


# ------------------------------------------------------------------------------------------------ VAEs


def _kl_vae(latent_channels: int, scaling: float, shift: float, quant_conv: bool) -> Any:
    """AutoencoderKL with 3 blocks (downsampling 4), as FLUX/SD3's (8 x 3 blocks) shrunk."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=TINY_IMAGE,
        scaling_factor=scaling,
        shift_factor=shift,
        use_quant_conv=quant_conv,
        use_post_quant_conv=quant_conv,
    )


def _qwen_vae(z_dim: int) -> Any:
    """AutoencoderKLQwenImage with 2 down blocks (downsampling 4) and per-channel latent statistics."""
    from diffusers import AutoencoderKLQwenImage

    gen = torch.Generator().manual_seed(1)
    mean = (torch.randn(z_dim, generator=gen) * 0.2).tolist()
    std = (1.0 + torch.rand(z_dim, generator=gen)).tolist()
    return AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=z_dim,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, False],
        latents_mean=mean,
        latents_std=std,
    )


# ----------------------------------------------------------------------------------------------- build


def make_tiny_pipeline(family: str, seed: int = 0, guidance_embeds: bool = True) -> Any:
    """A tiny random-weight pipeline of ``family`` (`TINY_FAMILIES`), initialised from ``seed``.

    ``guidance_embeds`` (FLUX only): build a guidance-distilled transformer like FLUX.1-dev (True) or
    one without the guidance embedding like FLUX.1-schnell (False).
    """
    if family not in TINY_FAMILIES:
        raise UserError(f"tiny pipeline family must be one of {', '.join(TINY_FAMILIES)}, got {family!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family in ("qwen-image", "qwen-image-edit"):
            return _make_qwen(family)
        if family == "flux":
            return _make_flux(guidance_embeds)
        return _make_sd3()


def _make_qwen(family: str) -> Any:
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPipeline,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    tokenizer = qwen_tokenizer()
    text_encoder = _qwen_vl(tokenizer)
    z_dim = 4
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * z_dim,
        out_channels=z_dim,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=text_encoder.config.text_config.hidden_size,
        axes_dims_rope=(4, 6, 6),
    )
    # Qwen-Image's scheduler config: dynamic exponential shift from the image sequence length.
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    parts = dict(
        scheduler=scheduler,
        vae=_qwen_vae(z_dim),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    if family == "qwen-image":
        return QwenImagePipeline(**parts)
    from qirl.models.qwen_vl import ImageOnlyQwenVLProcessor, qwen_image_processor

    processor = ImageOnlyQwenVLProcessor(
        image_processor=qwen_image_processor(patch_size=4, merge_size=2, image_size=TINY_IMAGE), tokenizer=tokenizer
    )
    return QwenImageEditPipeline(processor=processor, **parts)


def _make_flux(guidance_embeds: bool) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer()
    clip, t5 = _clip(clip_tok, hidden=32, projection=None), _t5(t5_tok, d_model=32)
    latent_channels = 4
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,  # 2x2 packed latents
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=t5.config.d_model,
        pooled_projection_dim=clip.config.hidden_size,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    # FLUX.1's scheduler config and VAE latent statistics (scaling 0.3611, shift 0.1159).
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=_kl_vae(latent_channels, scaling=0.3611, shift=0.1159, quant_conv=False),
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


def _make_sd3() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    clip_tok, clip_tok_2, t5_tok = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    # SD3 concatenates the two CLIPs' hidden states (16 + 16) and zero-pads them to T5's width (32), and
    # concatenates their projections (16 + 16) into the pooled vector.
    clip = _clip(clip_tok, hidden=16, projection=16)
    clip_2 = _clip(clip_tok_2, hidden=16, projection=16)
    t5 = _t5(t5_tok, d_model=32)
    latent_channels = 4
    transformer = SD3Transformer2DModel(
        sample_size=TINY_IMAGE // 4,
        patch_size=2,
        in_channels=latent_channels,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=t5.config.d_model,
        caption_projection_dim=32,
        pooled_projection_dim=clip.config.projection_dim + clip_2.config.projection_dim,
        out_channels=latent_channels,
        pos_embed_max_size=16,
    )
    # SD3's scheduler config (static shift 3.0) and VAE latent statistics (scaling 1.5305, shift 0.0609).
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_kl_vae(latent_channels, scaling=1.5305, shift=0.0609, quant_conv=False),
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=clip_2,
        tokenizer_2=clip_tok_2,
        text_encoder_3=t5,
        tokenizer_3=t5_tok,
    )


def build_tiny_pipeline(family: str, directory: str | Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """`make_tiny_pipeline` saved to ``directory`` (model_index.json + one folder per component).

    The edit pipeline's processor is recorded in model_index.json as the hub checkpoints record it
    (``transformers.Qwen2VLProcessor``); `qirl.models.diffusers_policy` passes it to ``from_pretrained``
    itself, loaded as the stock processor or, without torchvision, as qirl's image-only one.
    """
    pipe = make_tiny_pipeline(family, seed, guidance_embeds=guidance_embeds)
    _check_templates(pipe)
    path = Path(directory)
    pipe.save_pretrained(str(path), safe_serialization=True)
    if family == "qwen-image-edit":
        index_path = path / "model_index.json"
        index = json.loads(index_path.read_text())
        index["processor"] = ["transformers", "Qwen2VLProcessor"]
        index_path.write_text(json.dumps(index, indent=2) + "\n")
    return path


def _check_templates(pipe: Any) -> None:
    """The system prompt the pipeline drops must be exactly ``prompt_template_encode_start_idx`` tokens,
    else the embeddings would keep template tokens or lose prompt tokens."""
    template = getattr(pipe, "prompt_template_encode", None)
    if template is None:
        return
    prefix = template.split("<|vision_start|>")[0].split("{}")[0]
    n = len(pipe.tokenizer(prefix).input_ids)
    if n != pipe.prompt_template_encode_start_idx:
        raise RuntimeError(
            f"{type(pipe).__name__}: the tiny tokenizer reads the system prompt as {n} tokens, "
            f"the pipeline drops {pipe.prompt_template_encode_start_idx}"
        )
