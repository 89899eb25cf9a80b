"""Flow-matching pretraining of the tiny unified DiT on the Shapes world (`qirl pretrain`).

Objective (rectified flow / flow matching; Lipman et al. 2023, Liu et al. 2023, as used by SD3 and
Qwen-Image): with x_0 the target image latents, eps ~ N(0, I) and t ~ p(t),

    x_t = (1 - t) x_0 + t eps,      L = E || v_theta(x_t, t, c) - (eps - x_0) ||^2

p(t) is the logit-normal of SD3 (Esser et al. 2024, eq. 19: t = sigmoid(u), u ~ N(m, s^2)) by default,
which spends training on the middle timesteps. The condition c is dropped (empty prompt; an edit keeps
its source image) with probability `caption_dropout`, so the same network gives the unconditional
velocity that classifier-free guidance needs (Ho & Salimans 2022). Every batch mixes T2I pairs
(caption -> render) and edit triples (instruction + source render -> target render), rendered on the fly.

The run is a generator of metric dicts. It checkpoints atomically (model, EMA, optimizer, both RNGs,
step) every `checkpoint_every` steps; `resume=True` continues bit-exactly on CPU from the last one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qirl.checkpoint import load_checkpoint, save_checkpoint
from qirl.config import dump_recipe
from qirl.errors import UserError
from qirl.models.text import build_tokenizer
from qirl.models.tiny_dit import TinyDiT, TinyDiTConfig
from qirl.runlog import append_metrics, checkpoint_to_resume, start_metrics
from qirl.sampling import flow_matching_loss, sample_train_t
from qirl.schedules import ema_decay_at, lr_at
from qirl.shapes import random_edit_record, random_t2i_record, render_batch
from qirl.shapes.corpus import grammar_corpus
from qirl.shapes.scene import Scene


@dataclass
class PretrainData:
    edit_fraction: float = 0.4  # share of edit triples
    # "row": each row of a batch draws its task; "step": each step draws one task for its whole batch,
    # so a model with sequence edit conditioning runs one full-batch forward a step instead of two halves
    task_mix: str = "row"
    caption_dropout: float = 0.1  # CFG training: probability of the empty prompt
    vocab_samples: int = 20000  # records sampled to collect the tokenizer's vocabulary


@dataclass
class PretrainTrain:
    steps: int = 3000
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 200
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    timestep_sampling: str = "logit_normal"  # logit_normal | uniform
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # A model folder ("base" = the shipped one) to start from instead of random weights: a second stage
    # with its own schedule (and its own run.seed, so it sees new data). Its config must be `model:`'s.
    init_from: str = ""


@dataclass
class PretrainRun:
    out_dir: str = "runs/pretrain"
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    export_dtype: str = "float32"  # dtype of the exported `model/` weights (float16 halves a shipped file)


@dataclass
class PretrainRecipe:
    model: TinyDiTConfig = field(default_factory=TinyDiTConfig)
    data: PretrainData = field(default_factory=PretrainData)
    train: PretrainTrain = field(default_factory=PretrainTrain)
    run: PretrainRun = field(default_factory=PretrainRun)


_EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def draw_batch(
    rng: np.random.Generator, batch_size: int, data: PretrainData, image_size: int
) -> tuple[list[str], list[torch.Tensor | None], torch.Tensor]:
    """Prompts, per-item sources (None for T2I) and target images `[B, 3, H, W]` for one step."""
    prompts: list[str] = []
    source_scenes: list[Scene | None] = []
    target_scenes: list[Scene] = []
    step_is_edit = rng.random() < data.edit_fraction if data.task_mix == "step" else None
    for _ in range(batch_size):
        if (rng.random() < data.edit_fraction) if step_is_edit is None else step_is_edit:
            rec = random_edit_record(rng, split="train")
            source_scenes.append(Scene.from_dict(rec["source_scene"]))
            target_scenes.append(Scene.from_dict(rec["target_scene"]))
        else:
            rec = random_t2i_record(rng, split="train")
            source_scenes.append(None)
            target_scenes.append(Scene.from_dict(rec["scene"]))
        prompt = rec["prompt"] if rng.random() >= data.caption_dropout else ""
        prompts.append(prompt)
    targets = render_batch(target_scenes, image_size)  # [B, 3, H, W]
    edit_idx = [i for i, s in enumerate(source_scenes) if s is not None]
    sources: list[torch.Tensor | None] = [None] * batch_size
    if edit_idx:
        rendered = render_batch([source_scenes[i] for i in edit_idx], image_size)  # [E, 3, H, W]
        for j, i in enumerate(edit_idx):
            sources[i] = rendered[j]
    return prompts, sources, targets


def sample_timesteps(train: PretrainTrain, n: int, generator: torch.Generator) -> torch.Tensor:
    """t in (0, 1): SD3's logit-normal (see `sample_train_t`) or uniform."""
    if train.timestep_sampling == "uniform":
        return torch.rand(n, generator=generator)
    return sample_train_t(n, generator, mean=train.logit_mean, std=train.logit_std)


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], model: torch.nn.Module, decay: float) -> None:
    for name, p in model.state_dict().items():
        if p.dtype.is_floating_point:
            ema[name].mul_(decay).add_(p.detach(), alpha=1 - decay)
        else:
            ema[name].copy_(p)


def _init_model(recipe: PretrainRecipe) -> TinyDiT:
    """The model `train.init_from` names, checked against the recipe's `model:` section."""
    from qirl.models.registry import base_model_path

    spec = recipe.train.init_from
    init = TinyDiT.from_pretrained(base_model_path() if spec == "base" else spec)
    wanted = asdict(replace(recipe.model, vocab_size=init.config.vocab_size))
    diff = sorted(k for k, v in asdict(init.config).items() if wanted[k] != v)
    if diff:
        raise UserError(
            f"train.init_from={spec!r}: its config differs from the recipe's model section in {', '.join(diff)}"
        )
    return init


def pretrain(recipe: PretrainRecipe, resume: bool = False) -> Iterator[dict[str, Any]]:
    """Run pretraining; yield metrics every `log_every` steps and a final summary (`done`)."""
    out = Path(recipe.run.out_dir)
    existing = checkpoint_to_resume(out, resume)
    if recipe.data.task_mix not in ("row", "step"):
        raise UserError(f"data.task_mix must be row or step, got {recipe.data.task_mix!r}")
    if recipe.train.timestep_sampling not in ("logit_normal", "uniform"):
        raise UserError(f"train.timestep_sampling must be logit_normal or uniform, got {recipe.train.timestep_sampling!r}")
    TinyDiTConfig.from_dict(asdict(recipe.model), "recipe model")  # validates: UserError naming the key
    if recipe.run.export_dtype not in _EXPORT_DTYPES:
        raise UserError(f"run.export_dtype must be one of {', '.join(_EXPORT_DTYPES)}, got {recipe.run.export_dtype!r}")

    torch.manual_seed(recipe.run.seed)
    if existing is not None:
        ckpt = load_checkpoint(existing)
        tokenizer_json = ckpt.state["tokenizer"]
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(tokenizer_json)
        init = None
    elif recipe.train.init_from:
        init = _init_model(recipe)
        tokenizer = init.tokenizer
    else:
        init = None
        tokenizer = build_tokenizer(grammar_corpus(recipe.data.vocab_samples, recipe.run.seed + 7919))
    model = TinyDiT(recipe.model, tokenizer)
    if init is not None:
        model.load_state_dict(init.state_dict())
    model.train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=recipe.train.lr, weight_decay=recipe.train.weight_decay, betas=(0.9, 0.99)
    )
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    data_rng = np.random.default_rng(recipe.run.seed)
    gen = torch.Generator().manual_seed(recipe.run.seed)
    step = 0
    if existing is not None:
        model.load_state_dict(ckpt.tensors["model"])
        ema = {k: v.clone() for k, v in ckpt.tensors["ema"].items()}
        opt.load_state_dict(ckpt.nested("optimizer"))
        data_rng.bit_generator.state = ckpt.state["data_rng"]
        gen.set_state(ckpt.tensors["rng"]["torch"])
        step = ckpt.step
    metrics_file = start_metrics(out, recipe, step if existing is not None else None)

    def checkpoint() -> Path:
        return save_checkpoint(
            out,
            step,
            {"model": model.state_dict(), "ema": ema, "rng": {"torch": gen.get_state()}},
            {"data_rng": data_rng.bit_generator.state, "tokenizer": tokenizer.to_str(), "recipe": dump_recipe(recipe)},
            nested={"optimizer": opt.state_dict()},
            keep=recipe.run.keep_checkpoints,
        )

    train = recipe.train
    n_params = sum(p.numel() for p in model.parameters())
    t_start = time.perf_counter()
    start_step = step
    window: list[float] = []
    while step < train.steps:
        t0 = time.perf_counter()
        prompts, sources, targets = draw_batch(data_rng, train.batch_size, recipe.data, recipe.model.image_size)
        t = sample_timesteps(train, train.batch_size, gen)  # [B]
        noise = torch.randn(targets.shape, generator=gen)  # [B, 3, H, W]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, train.lr, train.warmup_steps, train.steps)
        cond = model.encode(prompts, sources)  # the text encoder trains too
        loss = flow_matching_loss(model, model.encode_images(targets), cond, t=t, noise=noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip))
        opt.step()
        ema_update(ema, model, ema_decay_at(step, train.ema_decay))
        step += 1
        window.append(float(loss.detach()))
        # Checkpoint before reporting, so a consumer that stops (or is killed) after seeing step N
        # finds step N on disk.
        if step % recipe.run.checkpoint_every == 0 or step == train.steps:
            checkpoint()
        if step % recipe.run.log_every == 0 or step == train.steps:
            row = {
                "step": step,
                "total": train.steps,
                "loss": sum(window) / len(window),
                "lr": lr_at(step - 1, train.lr, train.warmup_steps, train.steps),
                "grad_norm": grad_norm,
                "step_s": time.perf_counter() - t0,
            }
            window.clear()
            append_metrics(metrics_file, row)
            yield row

    final = out / "model"
    model.load_state_dict(ema)
    model.save_pretrained(final, dtype=_EXPORT_DTYPES[recipe.run.export_dtype])
    elapsed = time.perf_counter() - t_start
    yield {
        "done": True,
        "steps": step,
        "resumed_from": start_step,
        "params": n_params,
        "train_seconds": round(elapsed, 1),
        "model": str(final),
    }
