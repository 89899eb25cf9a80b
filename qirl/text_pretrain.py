"""Pretraining the small text encoder on its own, before the DiT, so that it can be frozen like a real one.

Qwen-Image conditions on a frozen, pretrained Qwen2.5-VL: every word of the prompt reaches the DiT as a
distinct state, whatever the image loss would have paid for. The embedded model has no pretrained
encoder to load, and trained jointly with the DiT its encoder keeps only what the flow loss pays for
early (colour), so shape words end up nearly indistinguishable (see the base's model card). This module
gives it a language-model pretraining of its own, on the caption grammar, after which `qirl pretrain`
freezes it (`train.text_encoder: frozen`).

Objective: masked-token denoising in the BERT style (Devlin et al. 2019): 15% of the words of each
caption are replaced by ``[UNK]`` (the vocabulary has no ``[MASK]``; an unknown word is what a mask means),
and every output state must name the word at its position -- the masked ones from context (MLM), the
others from themselves (token identity, `token_identity_loss`). Logits are tau cos(h_i, E_j) against the
tied input embeddings (Press & Wolf 2017; CLIP's normalised logits, Radford et al. 2021), tau = 10.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from qirl.models.text import CLS_ID, UNK_ID, TextEncoder, tokenize

TOKEN_IDENTITY_TEMPERATURE = 10.0
MASK_PROBABILITY = 0.15


def token_identity_loss(
    states: torch.Tensor, ids: torch.Tensor, padding: torch.Tensor, embeddings: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of recovering each prompt token from its own output state, by cosine similarity
    with the (tied) token embeddings: ``logits_ij = tau cos(h_i, E_j)``, ``tau = 10``.

    Why: the jointly trained text encoder learns only what the flow loss pays for, and the shape word is
    worth little there, so its states barely differ between shapes (the stage-2 base: 0.1-0.6 at every
    word position between "circle" and "square" prompts, against 3-6 between "red" and "orange"; norms
    about 11). The DiT cannot use what the condition does not carry. A frozen pretrained encoder (T5, a
    VLM) keeps every word distinct; this loss asks the same of the small one. A fixed temperature and the
    tied embeddings leave no free head that could amplify tiny differences instead of the encoder.

    states [B, L, D], ids [B, L] (the words each state must name), padding [B, L] (True = padding),
    embeddings [V, D] -> scalar. Position 0 (``[CLS]``, which pools the prompt) is not asked to be itself.
    """
    keep = ~padding
    keep[:, 0] = False  # [B, L]
    if not bool(keep.any()):
        return states.sum() * 0.0  # every prompt of the batch was dropped to ""
    h = F.normalize(states[keep].float(), dim=-1)  # [M, D]
    e = F.normalize(embeddings.float(), dim=-1)  # [V, D]
    return F.cross_entropy(TOKEN_IDENTITY_TEMPERATURE * h @ e.T, ids[keep])


def mask_tokens(
    ids: torch.Tensor, padding: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's corruption, simplified: each word (not ``[CLS]``, not padding) becomes ``[UNK]`` with
    probability 0.15. ids, padding [B, L] -> (corrupted ids [B, L], masked [B, L] bool)."""
    words = ~padding & (ids != CLS_ID)  # [B, L]
    masked = (torch.rand(ids.shape, generator=generator) < MASK_PROBABILITY) & words  # [B, L]
    return torch.where(masked, torch.full_like(ids, UNK_ID), ids), masked


def pretrain_text_encoder(
    encoder: TextEncoder,
    tokenizer: Tokenizer,
    corpus: Sequence[str],
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    max_len: int = 64,
    seed: int = 0,
) -> list[float]:
    """Train `encoder` in place by masked-token denoising on `corpus`; returns the loss of every step.

    AdamW (betas 0.9/0.99, no weight decay), constant lr after a linear warm-up over the first 10% of
    steps, gradient clipping at 1. Deterministic given `seed` (its own generators; the caller's RNGs are
    untouched). Texts longer than `max_len` tokens are left out rather than truncated.
    """
    if steps <= 0:
        return []
    # captions longer than the encoder's context would be truncated (and warned about) every batch
    corpus = [text for text, e in zip(corpus, tokenizer.encode_batch(list(corpus)), strict=True) if len(e.ids) <= max_len]
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    device = encoder.tok_emb.weight.device
    opt = torch.optim.AdamW(encoder.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    warmup = max(1, steps // 10)
    losses: list[float] = []
    encoder.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup)
        texts = [corpus[i] for i in rng.integers(len(corpus), size=batch_size)]
        ids, padding = tokenize(tokenizer, texts, max_len, device)  # [B, L], [B, L]
        corrupted, _ = mask_tokens(ids.cpu(), padding.cpu(), gen)
        states, _ = encoder(corrupted.to(device), padding)  # [B, L, D]
        loss = token_identity_loss(states, ids, padding, encoder.tok_emb.weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    return losses
