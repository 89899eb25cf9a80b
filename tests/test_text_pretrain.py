"""Pretraining the text encoder by masked-token denoising, and `qirl pretrain` freezing it afterwards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_pretrain import TINY as PRETRAIN_TINY

from qirl.checkpoint import latest_checkpoint, load_checkpoint
from qirl.config import load_recipe
from qirl.errors import UserError
from qirl.models.text import CLS_ID, PAD_ID, UNK_ID, TextEncoder, build_tokenizer, tokenize
from qirl.pretrain import PretrainRecipe, pretrain
from qirl.shapes.corpus import grammar_corpus
from qirl.text_pretrain import mask_tokens, pretrain_text_encoder


def test_mask_tokens_hides_about_15_percent_of_the_words_and_nothing_else():
    ids = torch.randint(3, 50, (400, 12))  # [B, L] words
    ids[:, 0] = CLS_ID
    padding = torch.zeros_like(ids, dtype=torch.bool)
    padding[:, 9:] = True
    ids[padding] = PAD_ID
    corrupted, masked = mask_tokens(ids, padding, torch.Generator().manual_seed(0))
    assert not masked[:, 0].any() and not masked[padding].any()
    assert torch.equal(corrupted[masked], torch.full((int(masked.sum()),), UNK_ID))
    assert torch.equal(corrupted[~masked], ids[~masked])
    assert 0.13 < float(masked[:, 1:9].float().mean()) < 0.17
    again, _ = mask_tokens(ids, padding, torch.Generator().manual_seed(0))
    assert torch.equal(again, corrupted)  # the generator decides, nothing else


def test_pretrained_encoder_fills_in_a_masked_word_from_context():
    corpus = grammar_corpus(300, seed=1)
    tokenizer = build_tokenizer(corpus)
    torch.manual_seed(0)
    encoder = TextEncoder(tokenizer.get_vocab_size(), dim=32, depth=2, heads=2, max_len=64)
    losses = pretrain_text_encoder(encoder, tokenizer, corpus, steps=300, batch_size=32, lr=3e-3, seed=0)
    assert len(losses) == 300
    assert sum(losses[-30:]) / 30 < 0.5 * sum(losses[:30]) / 30
    encoder.eval()

    def guesses(prompt: str, word: str, k: int) -> list[str]:
        ids, padding = tokenize(tokenizer, [prompt], 64)  # [1, L]
        slot = int((ids[0] == tokenizer.token_to_id(word)).nonzero()[0])
        ids[0, slot] = UNK_ID  # masked, as in training
        with torch.no_grad():
            states, _ = encoder(ids, padding)  # [1, L, D]
        h = torch.nn.functional.normalize(states[0, slot], dim=-1)  # [D]
        e = torch.nn.functional.normalize(encoder.tok_emb.weight, dim=-1)  # [V, D]
        return [tokenizer.id_to_token(int(i)) for i in (e @ h).topk(k).indices]

    # What the context decides, it names; where only a shape fits, it names shapes (which one, it cannot know).
    assert guesses("change the background to grey", "background", 1) == ["background"]
    shapes = {"circle", "circles", "disc", "square", "squares", "triangle", "triangles", "diamond", "rhombus"}
    assert set(guesses("make the blue square red", "square", 2)) <= shapes


# test_pretrain's tiny model, text-to-image only, with a frozen encoder pretrained for 20 steps
TINY = PRETRAIN_TINY + ["data.edit_fraction=0.0", "train.text_encoder=frozen", "train.text_encoder_steps=20"]


def _text_encoder(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if k.startswith("text_encoder.")}


def test_frozen_encoder_is_pretrained_then_left_alone_and_the_run_resumes_exactly(tmp_path: Path):
    def recipe(out: Path, *extra: str) -> PretrainRecipe:
        return load_recipe(
            PretrainRecipe,
            None,
            TINY + ["train.steps=4", "run.checkpoint_every=2", f"run.out_dir={out}", *extra],
        )

    rows = list(pretrain(recipe(tmp_path / "full")))
    assert rows[0]["text_encoder_steps"] == 20 and rows[0]["text_encoder_loss"] > 0
    state = load_checkpoint(latest_checkpoint(tmp_path / "full"))
    first = load_checkpoint(tmp_path / "full" / "checkpoints" / "step_00000002")
    frozen = _text_encoder(state.tensors["model"])
    for name, value in frozen.items():
        assert torch.equal(value, first.tensors["model"][name]), name  # no DiT step moved it
        assert torch.equal(value, state.tensors["ema"][name]), name  # and the EMA is the pretrained encoder
    joint = list(pretrain(recipe(tmp_path / "joint", "train.text_encoder=joint")))
    assert "text_encoder_steps" not in joint[0]
    init = _text_encoder(load_checkpoint(latest_checkpoint(tmp_path / "joint")).tensors["model"])
    assert any(not torch.equal(frozen[k], init[k]) for k in frozen)  # the frozen one was trained first
    # Killed after step 3 (newest checkpoint: step 2), resumed: the same weights as the run that went through.
    cut = recipe(tmp_path / "cut")
    for row in pretrain(cut):
        if row.get("step") == 3:
            break
    resumed = list(pretrain(cut, resume=True))
    assert "text_encoder_steps" not in resumed[0]  # the encoder is not pretrained a second time
    a = load_checkpoint(latest_checkpoint(tmp_path / "cut")).tensors["model"]
    for name, value in state.tensors["model"].items():
        assert torch.equal(value, a[name]), name


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.text_encoder=thawed", "train.text_encoder must be joint or frozen"),
        ("train.text_encoder_steps=-1", "train.text_encoder_steps must be >= 0"),
        ("train.text_aux_weight=0.1", "train.text_aux_weight trains the text encoder"),
    ],
)
def test_text_encoder_options_are_checked(tmp_path: Path, override: str, message: str):
    recipe = load_recipe(
        PretrainRecipe, None, TINY + ["train.steps=2", f"run.out_dir={tmp_path / 'bad'}", override]
    )
    with pytest.raises(UserError, match=message):
        list(pretrain(recipe))
    assert not (tmp_path / "bad").exists()
