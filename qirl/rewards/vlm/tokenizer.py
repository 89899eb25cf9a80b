"""The embedded VLM's tokenizer and processor: a word-level vocabulary qirl builds and ships.

The embedded reward VLM is a tiny Qwen2.5-VL (backbone.py) that must run offline, so it cannot use
Qwen's 151k-token BPE. It gets a `tokenizers` WordLevel model over everything it will ever read or
write: the Shapes caption and instruction grammar, the rating prompt template, the chain-of-thought
reasoning phrases, the digits "1".."5" (one token each, so the score distribution is five logits),
and the special tokens Qwen2.5-VL's processor and chat format use (`<|im_start|>`, `<|image_pad|>`, ...).
Text is NFKC-normalised and lowercased, split on whitespace, punctuation and single digits. The file
ships in `qirl/assets/vlm/` and is rebuilt by `python -m qirl.rewards.vlm`.

The processor is transformers' `Qwen2_5_VLProcessor` (or, for a Qwen3-VL checkpoint,
`Qwen3VLProcessor`) with the video branch removed (`ImageOnlyQwenVLProcessor`,
`ImageOnlyQwen3VLProcessor`): the stock classes insist on a video processor, which needs torchvision,
and a reward model never sees video. Image handling (patchify, `<|image_pad|>` expansion,
`mm_token_type_ids` for the 3-D RoPE) is the stock code. Where torchvision is installed,
`load_processor` returns the stock processor (fast image processor, video processor included).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLProcessor, Qwen3VLProcessor
from transformers.processing_utils import ProcessorMixin

from qirl.errors import UserError
from qirl.files import read_json
from qirl.shapes.corpus import grammar_corpus

logger = logging.getLogger(__name__)

ASSET_DIR = Path(__file__).resolve().parents[2] / "assets" / "vlm"

PAD, UNK = "<|endoftext|>", "<|unk|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

SCORE_TOKENS: tuple[str, ...] = ("1", "2", "3", "4", "5")

# Words of reasoning texts beyond the grammar's: those of qirl.rewards.annotate's reason phrases are
# also harvested from its judgements at build time (`_reason_corpus`); unknown words become <|unk|>,
# so this list only has to be generous, not exact.
REASON_WORDS = """
the a an is are was were be been not no none nothing missing extra wrong right correct incorrect colour
color colours colors shape shapes size sizes position positions place placed location count counts
number too many few more less fewer object objects background image picture edit edited instruction
prompt source blurry blur blurred sharp soft noisy noise uneven grainy stray marks mark artifact
artifacts distorted distortion deformed malformed broken fragments fragmented smeared warped jagged
irregular ambiguous clean clear clearly crisp faint off frame cut touches touching overlap overlapping
crowded together outside inside edge edges contrast weak barely stands out texture aesthetics
consistency alignment fidelity quality overall good bad poor poorly formed fine matches match mismatch
does do has have had looks read reads appears appeared visible absent present empty blank should
instead of but and or with without than as it its in on at to from by into onto unchanged changed
moved recoloured resized added removed requested unrequested preserved kept shifted drifted beyond
partly partially only just slightly little bit far very somewhat mostly fully completely expected novel
problems problem found noted specific minor major issues issue tie same similar better worse one two
three four five six
""".split()


def template_words() -> list[str]:
    """Every word of the rating prompts (model.py builds them; kept here so the vocabulary has them)."""
    from qirl.rewards.vlm.prompting import DIMENSIONS, template_texts

    return [*template_texts(), *DIMENSIONS]


def _reason_corpus(n: int, seed: int) -> list[str]:
    """Reason phrases of the annotation generator for perturbed renders of `n` prompts (T2I and
    edits), when `qirl.rewards.annotate` is installed; the same words a CoT model must write."""
    try:
        from qirl.rewards import annotate
    except ImportError:
        return []
    from qirl.shapes import Scene, random_edit_record, random_t2i_record, render

    rng = np.random.default_rng(seed)
    phrases: set[str] = set()
    for i in range(n):
        edit = i % 4 == 3
        rec = random_edit_record(rng) if edit else random_t2i_record(rng)
        scene = Scene.from_dict(rec["target_scene" if edit else "scene"])
        source = Scene.from_dict(rec["source_scene"]) if edit else None
        for kind in annotate.PERTURBATIONS:
            if kind == "unchanged" and source is None:
                continue
            img = np.clip(annotate.perturb(scene, kind, 32, rng, source=source), 0.0, 1.0)
            if source is not None:
                truth = annotate.judge_edit(render(source, 32), rec["prompt"], img)
            else:
                truth = annotate.judge_t2i(img, rec["prompt"])
            phrases.update(truth.reasons)
    return sorted(phrases)


def _backend(vocab: dict[str, int]) -> Tokenizer:
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation(),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    # Special tokens are matched before normalisation, so "<|image_pad|>" is never lowercased or split.
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


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


def build_tokenizer(corpus_size: int = 4000, seed: int = 0) -> PreTrainedTokenizerFast:
    """Build the embedded vocabulary: specials (fixed ids 0..7), the score digits, then words sorted.

    Sorted words make the ids a function of the word set only, not of the order the corpus is read in.
    """
    scratch = _backend({tok: i for i, tok in enumerate(SPECIAL_TOKENS)})
    assert scratch.normalizer is not None and scratch.pre_tokenizer is not None
    words: set[str] = set()
    texts = [
        *grammar_corpus(corpus_size, seed),
        *_reason_corpus(corpus_size // 20, seed),
        *template_words(),
        *REASON_WORDS,
    ]
    for text in texts:
        for word, _ in scratch.pre_tokenizer.pre_tokenize_str(scratch.normalizer.normalize_str(text)):
            words.add(word)
    words -= set(SPECIAL_TOKENS) | set(SCORE_TOKENS)
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *SCORE_TOKENS, *sorted(words)))}
    return wrap(_backend(vocab))


def load_embedded_tokenizer(path: str | Path = ASSET_DIR) -> PreTrainedTokenizerFast:
    """The shipped tokenizer; a missing or unreadable file is a `UserError` naming it."""
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        raise UserError(f"{file}: embedded VLM tokenizer not found (rebuild: python -m qirl.rewards.vlm)")
    try:
        backend = Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
        raise UserError(f"{file}: not a valid tokenizer.json ({err})") from None
    return wrap(backend)


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

    For images it differs from the Qwen2.5-VL one only in not returning `token_type_ids`; the
    vision start/end tokens it also keeps are used by its video timestamps alone.
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ):
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
