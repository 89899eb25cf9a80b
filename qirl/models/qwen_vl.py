"""Qwen-VL pieces shared by the policy adapters and the VLM reward models.

A Qwen2.5-VL / Qwen3-VL is both Qwen-Image's text encoder (`qirl.models.diffusers_policy`) and the
reward VLM (`qirl.rewards.vlm`), so what both need lives here, below both:

- Qwen's special tokens and `wrap`, which turns a `tokenizers` backend into a transformers tokenizer
  with Qwen's pad / eos / image-token conventions (the tiny checkpoints use word-level vocabularies);
- the image-only processors: transformers' `Qwen2_5_VLProcessor` and `Qwen3VLProcessor` with the video
  branch removed (`ImageOnlyQwenVLProcessor`, `ImageOnlyQwen3VLProcessor`): the stock classes insist
  on a video processor, which needs torchvision, and neither a reward model nor Qwen-Image's encoder
  sees video. Image handling (patchify, `<|image_pad|>` expansion, `mm_token_type_ids` for the 3-D
  RoPE) is the stock code. Where torchvision is installed, `load_processor` returns the stock processor;
- `TinyVLMSpec` and `tiny_config`: the tiny `Qwen2_5_VLConfig` of the embedded reward VLM and of the
  tiny Qwen-Image pipelines' text encoder (tests and the laptop default; a real checkpoint loads from
  its folder).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLProcessor, Qwen3VLProcessor
from transformers.processing_utils import ProcessorMixin

from qirl.errors import UserError
from qirl.files import read_json

PAD, UNK = "<|endoftext|>", "<|unk|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

def wrap(backend: Tokenizer, padding_side: str = "left", model_max_length: int = 1024) -> PreTrainedTokenizerFast:
    """A transformers tokenizer over a `tokenizers` backend, with Qwen's pad/eos/image-token conventions."""
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK,
        pad_token=PAD,
        eos_token=IM_END,
        extra_special_tokens={"image_token": IMAGE_PAD, "video_token": VIDEO_PAD},
        padding_side=padding_side,
        model_max_length=model_max_length,
    )


@dataclass
class TinyVLMSpec:
    """Sizes of the embedded tiny Qwen2.5-VL (used only when `path` is None)."""

    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 128
    vision_hidden_size: int = 64
    vision_depth: int = 2
    vision_heads: int = 4
    patch_size: int = 4
    merge_size: int = 2
    image_size: int = 32


def mrope_sections(head_dim: int) -> list[int]:
    """Temporal/height/width split of the rotary half-dim, in Qwen2.5-VL's 1/4 : 3/8 : 3/8 ratio
    ([16, 24, 24] at head_dim 128)."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def tiny_config(spec: TinyVLMSpec, tokenizer: Any) -> Any:
    """A `Qwen2_5_VLConfig` of the embedded size, its special-token ids taken from `tokenizer`."""
    from transformers import Qwen2_5_VLConfig

    if spec.hidden_size % spec.heads or spec.vision_hidden_size % spec.vision_heads:
        raise UserError("model.tiny: hidden sizes must be multiples of their head counts")
    ids = {
        t: tokenizer.convert_tokens_to_ids(t)
        for t in (IM_END, IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END)
    }
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "max_position_embeddings": 1024,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": mrope_sections(spec.hidden_size // spec.heads),
        },
        "bos_token_id": None,
        "eos_token_id": ids[IM_END],
        "pad_token_id": tokenizer.pad_token_id,
    }
    # One window covers the whole image (window_size is in pixels), and the last block is a full-attention
    # block as in the 7B; at 32x32 both attend over all 64 patches.
    vision = {
        "depth": spec.vision_depth,
        "hidden_size": spec.vision_hidden_size,
        "intermediate_size": 2 * spec.vision_hidden_size,
        "num_heads": spec.vision_heads,
        "patch_size": spec.patch_size,
        "spatial_merge_size": spec.merge_size,
        "temporal_patch_size": 2,
        "window_size": spec.image_size,
        "out_hidden_size": spec.hidden_size,
        "fullatt_block_indexes": [spec.vision_depth - 1],
    }
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
    )


def _image_only_init(processor: Any, image_processor: Any, tokenizer: Any, chat_template: str | None) -> None:
    """What the stock Qwen-VL `__init__`s do, minus the video processor.

    `ProcessorMixin` derives the processor's parts from the `__init__` signature, so dropping the
    `video_processor` argument is all it takes; `__call__` then skips the video branch.
    """
    processor.image_token = getattr(tokenizer, "image_token", None) or IMAGE_PAD
    processor.video_token = getattr(tokenizer, "video_token", None) or VIDEO_PAD
    processor.image_token_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    processor.video_token_id = tokenizer.convert_tokens_to_ids(processor.video_token)
    ProcessorMixin.__init__(processor, image_processor, tokenizer, chat_template=chat_template)


class ImageOnlyQwenVLProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` without the video processor (which needs torchvision)."""

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ):
        _image_only_init(self, image_processor, tokenizer, chat_template)


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """`Qwen3VLProcessor` without the video processor (which needs torchvision).

    For images it differs from the Qwen2.5-VL one only in not returning `token_type_ids`. It keeps the
    vision start/end tokens the stock `__init__` sets: transformers < 5.25 reads them for video
    timestamps alone, 5.25 on every call (`get_text_with_replacements`).
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ):
        self.vision_start_token = getattr(tokenizer, "vision_start_token", None) or VISION_START
        self.vision_end_token = getattr(tokenizer, "vision_end_token", None) or VISION_END
        self.vision_start_token_id = tokenizer.convert_tokens_to_ids(self.vision_start_token)
        self.vision_end_token_id = tokenizer.convert_tokens_to_ids(self.vision_end_token)
        _image_only_init(self, image_processor, tokenizer, chat_template)


IMAGE_ONLY_PROCESSORS: tuple[type, ...] = (ImageOnlyQwenVLProcessor, ImageOnlyQwen3VLProcessor)


def qwen_image_processor(patch_size: int, merge_size: int, image_size: int) -> Any:
    """A Qwen2-VL image processor that maps an `image_size` square to `(image_size / patch_size)^2`
    patches, i.e. `(image_size / (patch_size * merge_size))^2` LLM tokens; min = max pixels pins the size
    (larger inputs are resized down to it). The PIL backend: no torchvision needed."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    factor = patch_size * merge_size
    if image_size % factor:
        raise UserError(
            f"model.tiny.image_size ({image_size}) must be a multiple of patch_size * merge_size ({factor})"
        )
    pixels = image_size * image_size
    return Qwen2VLImageProcessorPil(
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=2,
        min_pixels=pixels,
        max_pixels=pixels,
    )


def checkpoint_model_type(path: Path) -> str:
    """`model_type` of a checkpoint's config.json ("" when absent or unreadable: loading reports that)."""
    try:
        return str(json.loads((path / "config.json").read_text()).get("model_type", ""))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return ""


def image_only_processor_class(model_type: str) -> type:
    """The image-only processor for a checkpoint family: Qwen3-VL (dense or MoE) or Qwen2/2.5-VL."""
    return ImageOnlyQwen3VLProcessor if model_type.startswith("qwen3_vl") else ImageOnlyQwenVLProcessor


def load_processor(path: str | Path) -> Any:
    """`AutoProcessor.from_pretrained(path)`; where that fails for want of a video processor
    (no torchvision) and the folder holds a Qwen2-VL image processor (Qwen2.5-VL and Qwen3-VL both
    use it, with patch 14 and 16), the image-only processor of the checkpoint's family, loaded with
    the folder's tokenizer, image processor (transformers picks its PIL backend) and chat template."""
    from transformers import AutoProcessor

    path = Path(path)
    try:
        processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any failure falls through to the explicit build below
        first_error = err
    else:
        processor.tokenizer.padding_side = "left"
        return processor
    pre = path / "preprocessor_config.json"
    kind = ""
    if pre.is_file():
        config = read_json(pre, "image processor config")
        kind = config.get("image_processor_type", "") if isinstance(config, dict) else ""
    if not kind.startswith("Qwen2VLImageProcessor"):
        raise UserError(f"{path}: cannot load a processor ({type(first_error).__name__}: {first_error})")
    cls = image_only_processor_class(checkpoint_model_type(path))
    try:
        processor = cls.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # noqa: BLE001
        raise UserError(
            f"{path}: cannot load the tokenizer or image processor ({type(err).__name__}: {err})"
        ) from None
    processor.tokenizer.padding_side = "left"
    return processor
