"""A word-level tokenizer and a small transformer text encoder that qirl builds and trains itself.

Why not a downloaded pretrained encoder: the Shapes world has a vocabulary of a few hundred words, and
the embedded default must run offline on a laptop CPU. A word-level vocabulary built from the caption
corpus and a 2-layer encoder are enough to represent "a red circle left of a small blue square", and they
ship in a few hundred kilobytes. `qirl pretrain` either trains the encoder jointly with the DiT
(`train.text_encoder: joint`) or pretrains it on the captions first and then freezes it
(`frozen`, `qirl.text_pretrain`). Post-training always leaves it frozen, as Qwen-Image freezes its
Qwen2.5-VL encoder.

The tokenizer is a `tokenizers.Tokenizer` (WordLevel model, NFKC + lowercase normaliser, whitespace then
punctuation pre-tokeniser, ``[CLS]`` prepended), saved as a standard ``tokenizer.json``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from tokenizers.processors import TemplateProcessing
from torch import Tensor, nn

from qirl.errors import UserError
from qirl.models.layers import EncoderBlock

logger = logging.getLogger(__name__)

PAD, UNK, CLS = "[PAD]", "[UNK]", "[CLS]"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, CLS)
PAD_ID, UNK_ID, CLS_ID = 0, 1, 2


def _make_tokenizer(vocab: dict[str, int]) -> Tokenizer:
    tokenizer = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tokenizer.post_processor = TemplateProcessing(single=f"{CLS} $A", special_tokens=[(CLS, CLS_ID)])
    # Registered as special (they already have their ids) so decode() skips them and no prompt text
    # such as "[cls]" can be split into them.
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def build_tokenizer(texts: Iterable[str], min_count: int = 1) -> Tokenizer:
    """A WordLevel tokenizer whose vocabulary is every word (seen ``min_count`` times) in ``texts``.

    The vocabulary is ``[PAD], [UNK], [CLS]`` (ids 0, 1, 2) and then the words in sorted order, so the
    same corpus always gives the same ids, whatever order it is read in.
    """
    scratch = _make_tokenizer({tok: i for i, tok in enumerate(SPECIAL_TOKENS)})
    assert scratch.normalizer is not None and scratch.pre_tokenizer is not None
    counts: dict[str, int] = {}
    for text in texts:
        for word, _ in scratch.pre_tokenizer.pre_tokenize_str(scratch.normalizer.normalize_str(text)):
            counts[word] = counts.get(word, 0) + 1
    words = sorted(w for w, n in counts.items() if n >= min_count and w not in SPECIAL_TOKENS)
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *words))}
    return _make_tokenizer(vocab)


def save_tokenizer(tokenizer: Tokenizer, path: str | os.PathLike[str]) -> None:
    tokenizer.save(str(path))


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Read a tokenizer.json; a missing or unreadable file is a `UserError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: tokenizer file not found")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:
        raise UserError(f"{path}: not a valid tokenizer.json ({exc})") from exc
    for i, tok in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(tok) != i:
            raise UserError(f"{path}: special token {tok} must have id {i}")
    return tokenizer


def tokenize(
    tokenizer: Tokenizer, texts: Sequence[str], max_len: int, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """Token ids [B, L] (``[CLS]`` first, right-padded with ``[PAD]``) and key_padding_mask [B, L].

    L is the longest prompt in the batch (capped at ``max_len``), not ``max_len``: short prompts
    make short sequences, which is most of the joint-attention cost of the tiny DiT.
    """
    encodings = tokenizer.encode_batch(list(texts))
    ids = [e.ids for e in encodings]
    if any(len(x) > max_len for x in ids):
        logger.warning("some prompts exceed %d tokens and are truncated", max_len)
        ids = [x[:max_len] for x in ids]
    length = max(len(x) for x in ids)
    out = torch.full((len(ids), length), PAD_ID, dtype=torch.long)  # [B, L]
    for row, x in enumerate(ids):
        out[row, : len(x)] = torch.tensor(x, dtype=torch.long)
    mask = out == PAD_ID  # [B, L], True = padding
    return out.to(device), mask.to(device)


class TextEncoder(nn.Module):
    """Token embedding + learned positions + pre-LN transformer layers; pooled output is ``[CLS]``.

    Returns token states [B, L, D] (final LayerNorm applied) and pooled [B, D] (the ``[CLS]`` state),
    the BERT recipe (Devlin et al. 2019), small.
    """

    def __init__(
        self, vocab_size: int, dim: int, depth: int, heads: int, max_len: int, mlp_ratio: float = 4.0
    ):
        super().__init__()
        self.max_len = max_len
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Parameter(torch.zeros(max_len, dim))
        self.blocks = nn.ModuleList([EncoderBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb, std=0.02)

    def forward(self, ids: Tensor, key_padding_mask: Tensor) -> tuple[Tensor, Tensor]:
        length = ids.shape[1]
        x = self.tok_emb(ids) + self.pos_emb[:length]  # [B, L, D]
        for block in self.blocks:
            x = block(x, key_padding_mask)  # [B, L, D]
        x = self.norm(x)  # [B, L, D]
        return x, x[:, 0]  # [B, L, D], [B, D]
