"""The embedded VLM's tokenizer and processor: a word-level vocabulary qirl builds and ships.

The embedded reward VLM is a tiny Qwen2.5-VL (backbone.py) that must run offline, so it cannot use
Qwen's 151k-token BPE. It gets a `tokenizers` WordLevel model over everything it will ever read or
write: the Shapes caption and instruction grammar, the rating prompt template, the chain-of-thought
reasoning phrases, the digits "1".."5" (one token each, so the score distribution is five logits),
and the special tokens Qwen2.5-VL's processor and chat format use (`<|im_start|>`, `<|image_pad|>`, ...).
Text is NFKC-normalised and lowercased, split on whitespace, punctuation and single digits. The file
ships in `qirl/assets/vlm/` and is rebuilt by `python -m qirl.rewards.vlm`.

Qwen's special tokens, `wrap` and the image-only processors live in `qirl.models.qwen_vl`, shared with
Qwen-Image's adapter.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from qirl.errors import UserError
from qirl.models.qwen_vl import SPECIAL_TOKENS, UNK, wrap
from qirl.shapes.corpus import grammar_corpus

logger = logging.getLogger(__name__)

ASSET_DIR = Path(__file__).resolve().parents[2] / "assets" / "vlm"

SCORE_TOKENS: tuple[str, ...] = ("1", "2", "3", "4", "5")

# Words of reasoning texts beyond the grammar's: those of qirl.shapes.judge's reason phrases are
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
    """Reason phrases of the Shapes judge (`qirl.shapes.judge`) for perturbed renders of `n` prompts
    (T2I and edits): the same words a chain-of-thought reward model must write."""
    from qirl.shapes import Scene, random_edit_record, random_t2i_record, render
    from qirl.shapes.judge import judge_edit, judge_t2i
    from qirl.shapes.perturb import PERTURBATIONS, perturb

    rng = np.random.default_rng(seed)
    phrases: set[str] = set()
    for i in range(n):
        edit = i % 4 == 3
        rec = random_edit_record(rng) if edit else random_t2i_record(rng)
        scene = Scene.from_dict(rec["target_scene" if edit else "scene"])
        source = Scene.from_dict(rec["source_scene"]) if edit else None
        for kind in PERTURBATIONS:
            if kind == "unchanged" and source is None:
                continue
            img = np.clip(perturb(scene, kind, 32, rng, source=source), 0.0, 1.0)
            if source is not None:
                truth = judge_edit(render(source, 32), rec["prompt"], img)
            else:
                truth = judge_t2i(img, rec["prompt"])
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


