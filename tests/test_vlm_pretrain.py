"""Caption pretraining of the embedded VLM (qirl.rewards.vlm.pretrain): the objective, resume, hand-off."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from vlm_cases import one_thread  # noqa: F401  (autouse: one intra-op thread)

from qirl.checkpoint import latest_checkpoint, load_checkpoint
from qirl.config import load_recipe
from qirl.errors import UserError
from qirl.rewards.vlm import VLMReward, VLMRewardConfig
from qirl.rewards.vlm.pretrain import (
    CaptionPretrainRecipe,
    caption_batch,
    caption_loss,
    caption_prompt,
    pretrain_vlm,
)
from qirl.rewards.vlm.tiny import build_tiny_checkpoint
from qirl.shapes.caption_parse import parse_caption


def recipe(out: Path, *extra: str) -> CaptionPretrainRecipe:
    return load_recipe(
        CaptionPretrainRecipe,
        None,
        [f"run.out_dir={out}", "model.device=cpu", "model.dtype=float32", "train.batch_size=4",
         "train.eval_images=4", "train.warmup_steps=1", "run.log_every=1", *extra],
    )


def test_batches_are_renders_of_their_captions() -> None:
    images, captions = caption_batch(np.random.default_rng(0), 3, 32)
    again, same = caption_batch(np.random.default_rng(0), 3, 32)
    assert same == captions and all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, again, strict=True))
    assert all(im.size == (32, 32) and im.mode == "RGB" for im in images)
    for c in captions:
        parse_caption(c)  # every caption is in the Shapes grammar (the vocabulary the VLM ships with)


def test_prompt_shows_the_image_and_no_rating_question(tmp_path: Path) -> None:
    rm = VLMReward(VLMRewardConfig(device="cpu", dtype="float32"))
    text = caption_prompt(rm.processor)
    assert text.count("<|image_pad|>") == 1 and "Rate" not in text and text.endswith("assistant\n")
    # A real checkpoint's chat template renders the same turns.
    ckpt = build_tiny_checkpoint("qwen2.5-vl", tmp_path / "ckpt")
    real = VLMReward(VLMRewardConfig(path=str(ckpt), device="cpu", dtype="float32"))
    assert caption_prompt(real.processor).count("<|image_pad|>") == 1


def test_loss_is_the_caption_tokens_cross_entropy_and_it_learns() -> None:
    torch.manual_seed(0)
    rm = VLMReward(VLMRewardConfig(device="cpu", dtype="float32"))
    images, captions = caption_batch(np.random.default_rng(1), 4, 32)
    with torch.no_grad():
        loss, acc = caption_loss(rm, images, captions)
    vocab = rm.model.get_output_embeddings().weight.shape[0]
    assert 0.0 <= acc <= 1.0 and abs(float(loss) - np.log(vocab)) < 1.5  # near uniform at random init
    opt = torch.optim.AdamW(rm.trainable_parameters(), lr=3e-3)
    for _ in range(30):  # one fixed batch: the captions are learnable from the image and the prefix
        loss_t, _ = caption_loss(rm, images, captions)
        opt.zero_grad()
        loss_t.backward()
        opt.step()
    assert float(loss_t.detach()) < 0.5 * float(loss)


def test_runs_resumes_exactly_and_hands_off_to_reward_training(tmp_path: Path) -> None:
    args = ("train.steps=4", "run.checkpoint_every=2")
    full = list(pretrain_vlm(recipe(tmp_path / "full", *args)))
    done = full[-1]
    assert done["done"] and {"eval_loss", "eval_token_acc"} <= done.keys()
    cut = recipe(tmp_path / "cut", *args)
    for row in pretrain_vlm(cut):
        if row.get("step") == 3:
            break
    with pytest.raises(UserError, match="--resume"):
        next(pretrain_vlm(cut))
    assert list(pretrain_vlm(cut, resume=True))[-1]["resumed_from"] == 2
    a = load_checkpoint(latest_checkpoint(tmp_path / "full")).tensors["model"]
    b = load_checkpoint(latest_checkpoint(tmp_path / "cut")).tensors["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    # The folder is a pointwise reward model: it scores, and `train.init_from` starts from its weights.
    rm = VLMReward.load(done["model"], device="cpu")
    assert rm.config.mode == "pointwise"
    images, captions = caption_batch(np.random.default_rng(2), 2, 32)
    r = rm.reward_rows([[im] for im in images], captions, ["t2i", "t2i"])
    assert r.shape == (2,) and bool(((r >= 0) & (r <= 1)).all())


def test_bad_settings_are_user_errors(tmp_path: Path) -> None:
    for bad, match in [
        (("model.mode=pairwise",), "pointwise"),
        (("model.path=some/folder",), "model.path"),
        (("train.steps=0",), "positive"),
    ]:
        with pytest.raises(UserError, match=match):
            next(pretrain_vlm(recipe(tmp_path / "x", *bad)))
