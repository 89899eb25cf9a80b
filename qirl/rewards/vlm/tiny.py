"""Tiny real-format VLM checkpoints (Qwen2.5-VL, Qwen3-VL), built on the CPU, for tests, docs and benchmarks.

`build_tiny_checkpoint(family, directory, seed)` writes a folder laid out like a hub checkpoint of that
family (config.json, model.safetensors, tokenizer files, chat_template.jinja, preprocessor_config.json),
with random weights at toy sizes, so the real-checkpoint path (`VLMReward(VLMRewardConfig(path=...))`,
registry `vlm_pointwise` with `path=...`) runs end to end without the hub:

- the text decoder and the vision tower are the family's own transformers classes
  (`Qwen2_5_VLForConditionalGeneration`, `Qwen3VLForConditionalGeneration`), 2 layers each;
- the vision geometry is the family's real one: patch 14 (Qwen2.5-VL) or 16 (Qwen3-VL), spatial merge 2,
  temporal patch 2; Qwen3-VL adds its learned, interpolated vision position embeddings, DeepStack
  (a vision layer's features added to the first decoder layer) and interleaved M-RoPE;
- the image processor is the Qwen2-VL one both families ship (PIL backend when saving; the folder names
  the class as the hub configs do, so transformers picks the torchvision backend where installed), with
  the family's normalisation (CLIP mean/std for Qwen2.5-VL, 0.5 for Qwen3-VL) and a minimum pixel count
  that upsamples a 32x32 render to 2x2 merged tokens (56^2 px / 64^2 px) instead of the hub's 56^2 / 256^2;
- the tokenizer is the embedded word-level one (tokenizer.py: same special tokens as Qwen, digits one
  token each) plus a ChatML chat template written for this module, shaped like each family's (Qwen2.5-VL
  inserts a default system turn, Qwen3-VL does not).

Sizes follow the configs in transformers' `configuration_qwen2_5_vl.py` / `configuration_qwen3_vl.py`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qirl.errors import UserError
from qirl.models.qwen_vl import (
    IM_END,
    IMAGE_PAD,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    image_only_processor_class,
)
from qirl.rewards.vlm.data import quiet_progress
from qirl.rewards.vlm.tokenizer import load_embedded_tokenizer

FAMILIES: tuple[str, ...] = ("qwen2.5-vl", "qwen3-vl")

# Both templates render the transformers multimodal message format (`{"type": "image"}` /
# `{"type": "text", "text": ...}` parts) to ChatML with one vision block per image.
_TURNS = (
    "{%- for m in messages -%}"
    "{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{%- if m['content'] is string -%}{{ m['content'] }}"
    "{%- else -%}{%- for c in m['content'] -%}"
    "{%- if c['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif c['type'] == 'text' -%}{{ c['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
_DEFAULT_SYSTEM = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
)
CHAT_TEMPLATES = {"qwen2.5-vl": _DEFAULT_SYSTEM + _TURNS, "qwen3-vl": _TURNS}


@dataclass(frozen=True)
class TinyFamily:
    """What differs between the families at toy size (the rest is shared in `_text_config`)."""

    model_type: str
    patch_size: int
    min_image_size: int  # smallest side the processor resizes up to: 2x2 merged tokens
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    image_processor_type: str  # as the hub's preprocessor_config.json names it
    processor_class: str


_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SPECS = {
    "qwen2.5-vl": TinyFamily(
        "qwen2_5_vl", 14, 56, _CLIP_MEAN, _CLIP_STD, "Qwen2VLImageProcessor", "Qwen2_5_VLProcessor"
    ),
    "qwen3-vl": TinyFamily(
        "qwen3_vl", 16, 64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "Qwen2VLImageProcessorFast", "Qwen3VLProcessor"
    ),
}
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 64, 4, 2, 16, 2
VISION_HIDDEN, VISION_HEADS, VISION_DEPTH, MERGE = 32, 2, 2, 2


def _family(family: str) -> TinyFamily:
    if family not in SPECS:
        raise UserError(f"tiny VLM family must be one of {', '.join(FAMILIES)}, got {family!r}")
    return SPECS[family]


def _token_ids(tokenizer: Any) -> dict[str, int]:
    return {
        t: tokenizer.convert_tokens_to_ids(t)
        for t in (IM_END, IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END)
    }


def _text_config(family: str, tokenizer: Any) -> dict[str, Any]:
    """Decoder sizes; M-RoPE sections split head_dim / 2 = 8 rotary pairs over (t, h, w)."""
    ids = _token_ids(tokenizer)
    # Qwen2.5-VL 7B: [16, 24, 24] contiguous; Qwen3-VL: [24, 20, 20] interleaved (t h w t h w ...).
    rope = (
        {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}
        if family == "qwen2.5-vl"
        else {
            "rope_type": "default",
            "rope_theta": 5e6,
            "mrope_section": [4, 2, 2],
            "mrope_interleaved": True,
        }
    )
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "max_position_embeddings": 2048,
        "rope_parameters": rope,
        "bos_token_id": None,  # Qwen's chat format starts no sequence with a BOS token
        "eos_token_id": ids[IM_END],
        "pad_token_id": tokenizer.pad_token_id,
    }


def _vision_config(family: str) -> dict[str, Any]:
    spec = _family(family)
    common = {
        "depth": VISION_DEPTH,
        "hidden_size": VISION_HIDDEN,
        "intermediate_size": 2 * VISION_HIDDEN,
        "num_heads": VISION_HEADS,
        "patch_size": spec.patch_size,
        "spatial_merge_size": MERGE,
        "temporal_patch_size": 2,
        "out_hidden_size": HIDDEN,
    }
    if family == "qwen2.5-vl":
        # Window attention in all blocks but the last (as in the 7B); the window is 112 px there.
        return common | {"window_size": 112, "fullatt_block_indexes": [VISION_DEPTH - 1]}
    # A learned 4x4 grid of position embeddings, bilinearly interpolated to each image's patch grid
    # (48x48 in the 8B); DeepStack adds the first vision block's merged features to decoder layer 0.
    return common | {"num_position_embeddings": 16, "deepstack_visual_indexes": [0]}


def tiny_vlm_config(family: str, tokenizer: Any) -> Any:
    """The family's `*VLConfig` at toy size, special-token ids taken from `tokenizer`."""
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

    _family(family)
    ids = _token_ids(tokenizer)
    cls = Qwen2_5_VLConfig if family == "qwen2.5-vl" else Qwen3VLConfig
    return cls(
        text_config=_text_config(family, tokenizer),
        vision_config=_vision_config(family),
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=False,
    )


def tiny_image_processor(family: str) -> Any:
    """The Qwen2-VL image processor (PIL backend) with the family's patch size and normalisation."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    spec = _family(family)
    return Qwen2VLImageProcessorPil(
        patch_size=spec.patch_size,
        merge_size=MERGE,
        temporal_patch_size=2,
        min_pixels=spec.min_image_size**2,
        max_pixels=16 * spec.min_image_size**2,  # up to 4x the side: 8x8 merged tokens
        image_mean=list(spec.image_mean),
        image_std=list(spec.image_std),
    )


def build_tiny_vlm(family: str, seed: int = 0) -> tuple[Any, Any]:
    """(model, processor) of a tiny `family` VLM, randomly initialised from `seed` (float32, eval mode)."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

    spec = _family(family)
    tokenizer = load_embedded_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATES[family]
    config = tiny_vlm_config(family, tokenizer)
    config._attn_implementation = "sdpa"
    cls = Qwen2_5_VLForConditionalGeneration if family == "qwen2.5-vl" else Qwen3VLForConditionalGeneration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config).eval()
    processor = image_only_processor_class(spec.model_type)(
        image_processor=tiny_image_processor(family),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATES[family],
    )
    return model, processor


def build_tiny_checkpoint(family: str, directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny `family` ("qwen2.5-vl" | "qwen3-vl") checkpoint folder to `directory`; returns it.

    The folder is what `VLMRewardConfig.path` expects of a real checkpoint: `AutoModelForImageTextToText`
    and `AutoProcessor` (or, without torchvision, `load_processor`'s image-only fallback) load it
    offline. Same `family` and `seed` give the same weights.
    """
    spec = _family(family)
    model, processor = build_tiny_vlm(family, seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with quiet_progress():
        model.save_pretrained(str(directory), safe_serialization=True)
        processor.tokenizer.save_pretrained(str(directory))  # tokenizer files + chat_template.jinja
        processor.image_processor.save_pretrained(str(directory))
    # Name the classes as hub checkpoints do, so transformers resolves the stock processor and picks the
    # image processor backend for the environment (the PIL class saves under the torchvision name).
    pre = directory / "preprocessor_config.json"
    data = json.loads(pre.read_text())
    data |= {"image_processor_type": spec.image_processor_type, "processor_class": spec.processor_class}
    pre.write_text(json.dumps(data, indent=2))
    return directory
