"""Caption pretraining of the embedded VLM: the perception a reward model is fine-tuned from.

The report fine-tunes reward models from a pretrained VLM (Qwen-VL), which already sees colours, shapes,
counts and positions; only the rating is learned from annotations. The embedded tiny Qwen2.5-VL starts
from random weights, and a vision tower learned from scratch on ~16k rated images ordered a GRPO group's
images at chance (docs/rewards.md). This stage gives it the missing pretraining, as VLMs get it:
next-token prediction of a caption given the image (the captioning objective of Qwen-VL's first stage,
Bai et al. 2023), on an unlimited stream of Shapes renders and their captions (`random_t2i_record`,
which never draws a held-out attribute pair).

Each example is one chat turn, the image alone in the user message (no new words, so the shipped
vocabulary is unchanged), and the caption as the assistant's answer:

    <system>You are a careful image rater.</system><user><image></user><assistant>{caption}

    L = mean over caption tokens t of -log p(token_t | image, tokens_<t)

The result is a pointwise reward folder (`<out_dir>/model`) whose score head is untrained; `qirl score
train ... train.init_from=<out_dir>/model` fine-tunes it into a reward model.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from qirl.checkpoint import load_checkpoint, save_checkpoint
from qirl.config import dump_recipe
from qirl.errors import UserError
from qirl.rewards.vlm import backbone as bb
from qirl.rewards.vlm.losses import lm_loss
from qirl.rewards.vlm.model import VLMReward, VLMRewardConfig
from qirl.rewards.vlm.prompting import _CHATML, _VISION, SYSTEM, has_chat_template
from qirl.runlog import append_metrics, checkpoint_to_resume, start_metrics
from qirl.schedules import lr_at
from qirl.shapes import random_t2i_record
from qirl.shapes.render import render_numpy
from qirl.shapes.scene import Scene


@dataclass
class CaptionTrain:
    steps: int = 4000
    batch_size: int = 32  # captioned renders per step
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    eval_images: int = 256  # fixed held-out renders for the caption token accuracy


@dataclass
class CaptionRun:
    out_dir: str = "runs/vlm_pretrain"
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 2


@dataclass
class CaptionPretrainRecipe:
    model: VLMRewardConfig = field(default_factory=VLMRewardConfig)
    train: CaptionTrain = field(default_factory=CaptionTrain)
    run: CaptionRun = field(default_factory=CaptionRun)


def caption_prompt(processor: Any) -> str:
    """The chat text up to the assistant's answer: the system turn, then a user turn holding the image."""
    if has_chat_template(processor):
        messages = [
            {"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
            {"role": "user", "content": [{"type": "image"}]},
        ]
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return _CHATML.format(role="system", content=SYSTEM) + _CHATML.format(role="user", content=_VISION) + (
        "<|im_start|>assistant\n"
    )


def caption_batch(rng: np.random.Generator, n: int, size: int) -> tuple[list[Image.Image], list[str]]:
    """n clean renders of random training-split scenes and their captions."""
    records = [random_t2i_record(rng, "train") for _ in range(n)]
    pixels = render_numpy([Scene.from_dict(r["scene"]) for r in records], size)  # [n, H, W, 3] in [0, 1]
    images = [Image.fromarray((p * 255.0).round().astype(np.uint8)) for p in pixels]
    return images, [r["prompt"] for r in records]


def caption_loss(rm: VLMReward, images: Sequence[Image.Image], captions: Sequence[str]) -> tuple[torch.Tensor, float]:
    """(mean caption-token cross-entropy, token accuracy) under teacher forcing."""
    prompt = caption_prompt(rm.processor)
    batch = bb.encode(rm.processor, [[im] for im in images], [prompt] * len(images), list(captions))
    logits, targets = bb.completion_token_logits(rm.model, rm.hidden(batch), batch)  # [N, V], [N]
    accuracy = float((logits.argmax(-1) == targets).float().mean()) if targets.numel() else float("nan")
    return lm_loss(logits, targets), accuracy


def _check(recipe: CaptionPretrainRecipe) -> None:
    recipe.model.validate("model")
    if recipe.model.mode != "pointwise":
        raise UserError("caption pretraining builds a pointwise reward folder; set model.mode=pointwise")
    if recipe.model.path:
        raise UserError("caption pretraining starts the embedded VLM from scratch; model.path must be empty")
    t = recipe.train
    if t.steps < 1 or t.batch_size < 1 or t.lr <= 0 or t.eval_images < 1:
        raise UserError("train.steps, train.batch_size, train.lr and train.eval_images must be positive")
    if recipe.run.log_every < 1 or recipe.run.checkpoint_every < 1:
        raise UserError("run.log_every and run.checkpoint_every must be positive")


@torch.no_grad()
def _evaluate(rm: VLMReward, images: list[Image.Image], captions: list[str], batch: int) -> dict[str, float]:
    rm.eval()
    losses, accs, sizes = [], [], []
    for i in range(0, len(images), batch):
        loss, acc = caption_loss(rm, images[i : i + batch], captions[i : i + batch])
        losses.append(float(loss))
        accs.append(acc)
        sizes.append(len(images[i : i + batch]))
    rm.train()
    w = np.asarray(sizes, dtype=np.float64)
    return {"eval_loss": float(np.average(losses, weights=w)), "eval_token_acc": float(np.average(accs, weights=w))}


def pretrain_vlm(recipe: CaptionPretrainRecipe, resume: bool = False) -> Iterator[dict[str, Any]]:
    """Caption-pretrain the embedded VLM; yield metrics every `log_every` steps, then `done`."""
    _check(recipe)
    out = Path(recipe.run.out_dir)
    existing = checkpoint_to_resume(out, resume)
    size = recipe.model.tiny.image_size
    rm = VLMReward(recipe.model)
    rm.train()
    opt = torch.optim.AdamW(rm.trainable_parameters(), lr=recipe.train.lr, weight_decay=recipe.train.weight_decay)
    # Held-out renders come from their own stream (seed + 1), so resuming never changes them.
    eval_images, eval_captions = caption_batch(
        np.random.default_rng(recipe.run.seed + 1), recipe.train.eval_images, size
    )
    data_rng = np.random.default_rng(recipe.run.seed)
    step = 0
    if existing is not None:
        ckpt = load_checkpoint(existing)
        rm.load_state_dict(ckpt.tensors["model"])
        opt.load_state_dict(ckpt.nested("optimizer"))
        data_rng.bit_generator.state = ckpt.state["data_rng"]
        step = ckpt.step
    metrics_file = start_metrics(out, recipe, step if existing is not None else None)
    train = recipe.train
    t_start, start_step = time.perf_counter(), step
    window: dict[str, list[float]] = {}
    while step < train.steps:
        t0 = time.perf_counter()
        images, captions = caption_batch(data_rng, train.batch_size, size)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, train.lr, train.warmup_steps, train.steps)
        loss, acc = caption_loss(rm, images, captions)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(rm.trainable_parameters(), train.grad_clip))
        opt.step()
        step += 1
        for k, v in {"loss": float(loss.detach()), "token_acc": acc, "grad_norm": grad_norm}.items():
            window.setdefault(k, []).append(v)
        if step % recipe.run.checkpoint_every == 0 or step == train.steps:
            save_checkpoint(
                out,
                step,
                {"model": rm.state_dict()},
                {"data_rng": data_rng.bit_generator.state, "recipe": dump_recipe(recipe)},
                nested={"optimizer": opt.state_dict()},
                keep=recipe.run.keep_checkpoints,
            )
        if step % recipe.run.log_every == 0 or step == train.steps:
            row = {"step": step, "total": train.steps, "lr": lr_at(step - 1, train.lr, train.warmup_steps, train.steps),
                   "step_s": time.perf_counter() - t0, **{k: float(np.mean(v)) for k, v in window.items()}}
            window.clear()
            append_metrics(metrics_file, row)
            yield row
    evaluation = _evaluate(rm, eval_images, eval_captions, recipe.model.batch_size)
    final = rm.save(out / "model")
    append_metrics(metrics_file, {"step": step, "total": train.steps, "eval": True, **evaluation})
    yield {
        "done": True,
        "steps": step,
        "resumed_from": start_step,
        "params": sum(p.numel() for p in rm.trainable_parameters()),
        "train_seconds": round(time.perf_counter() - t_start, 1),
        "model": str(final),
        **evaluation,
    }
