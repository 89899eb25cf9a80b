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

import functools
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from qirl.checkpoint import load_checkpoint, save_checkpoint
from qirl.config import dump_recipe
from qirl.errors import UserError
from qirl.models.text import build_tokenizer, tokenize
from qirl.models.tiny_dit import TinyDiT, TinyDiTConfig
from qirl.runlog import append_metrics, checkpoint_to_resume, start_metrics
from qirl.sampling import flow_matching_loss, sample_train_t
from qirl.schedules import ema_decay_at, lr_at
from qirl.shapes import CATEGORIES, SHAPES, random_edit_record, random_t2i_record, render_batch
from qirl.shapes.corpus import grammar_corpus
from qirl.shapes.render import render_shape_labels
from qirl.shapes.scene import Scene
from qirl.text_pretrain import pretrain_text_encoder, token_identity_loss


@dataclass
class PretrainData:
    edit_fraction: float = 0.4  # share of edit triples
    # "row": each row of a batch draws its task; "step": each step draws one task for its whole batch,
    # so a model with sequence edit conditioning runs one full-batch forward a step instead of two halves
    task_mix: str = "row"
    caption_dropout: float = 0.1  # CFG training: probability of the empty prompt
    vocab_samples: int = 20000  # records sampled to collect the tokenizer's vocabulary
    # T2I caption categories to draw from, uniformly (repeat a name to weight it, e.g. [single, single,
    # multi, spatial, attribute]); empty = the grammar's own mix of single, multi, spatial and attribute
    t2i_categories: list[str] = field(default_factory=list)


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
    # Auxiliary shape segmentation (see `ShapeSegmentationHead`): weight of its cross-entropy in the loss
    # (0 = off) and the number of DiT blocks whose output image tokens it reads.
    shape_aux_weight: float = 0.0
    shape_aux_layer: int = 3
    # Token identity (see `token_identity_loss`): weight of its cross-entropy on the text encoder's
    # output states (0 = off)
    text_aux_weight: float = 0.0
    # The text encoder: "joint" trains it with the DiT on the flow loss; "frozen" first pretrains it on
    # the caption grammar by masked-token denoising for `text_encoder_steps` steps (`qirl.text_pretrain`),
    # then freezes it, as Qwen-Image freezes its Qwen2.5-VL.
    text_encoder: str = "joint"
    text_encoder_steps: int = 500


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


class PretrainBatch(NamedTuple):
    prompts: list[str]
    sources: list[torch.Tensor | None]  # per row: the source image [3, H, W] of an edit, None for T2I
    targets: torch.Tensor  # [B, 3, H, W] in [0, 1]
    target_scenes: list[Scene]  # what `targets` renders (for the auxiliary shape labels)


def draw_batch(rng: np.random.Generator, batch_size: int, data: PretrainData, image_size: int) -> PretrainBatch:
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
            category = data.t2i_categories[rng.integers(len(data.t2i_categories))] if data.t2i_categories else None
            rec = random_t2i_record(rng, split="train", category=category)
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
    return PretrainBatch(prompts, sources, targets, target_scenes)


class ShapeSegmentationHead(torch.nn.Module):
    """An auxiliary head, used in pretraining only, that reads the image tokens after block `layer` and
    predicts each target pixel's shape class (background or one of SHAPES) from the noisy input.

    Why: the flow loss alone lets the tiny DiT draw the right colour at the right place as a blob that is
    the same for every shape word (MODEL_CARD, shape-word sensitivity): a wrong corner costs a few pixels
    of MSE. Supervising an intermediate representation with a dense, shape-discriminative target is the
    idea of REPA (Yu et al. 2025, "Representation Alignment for Generation", eq. 8: the flow loss plus
    lambda times a per-patch alignment loss on the hidden states of an early block, the projection head
    discarded after training); here the renderer gives the exact per-pixel shape map, so the target is
    a segmentation cross-entropy instead of a pretrained encoder's features. The head is not part of the
    exported model, so sampling and RL cost nothing extra.

    Tokens [B, N, D] -> logits [B, 1 + len(SHAPES), H, W].
    """

    def __init__(self, dim: int, patch_size: int, grid: int) -> None:
        super().__init__()
        self.patch_size, self.grid, self.classes = patch_size, grid, 1 + len(SHAPES)
        self.norm = torch.nn.LayerNorm(dim)
        self.proj = torch.nn.Linear(dim, patch_size * patch_size * self.classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, p, g, k = tokens.shape[0], self.patch_size, self.grid, self.classes
        logits = self.proj(self.norm(tokens))  # [B, N, p*p*K]
        logits = logits.reshape(b, g, g, p, p, k).permute(0, 5, 1, 3, 2, 4)  # [B, K, g, p, g, p]
        return logits.reshape(b, k, g * p, g * p)  # [B, K, H, W]


def sample_timesteps(train: PretrainTrain, n: int, generator: torch.Generator) -> torch.Tensor:
    """t in (0, 1): SD3's logit-normal (see `sample_train_t`) or uniform."""
    if train.timestep_sampling == "uniform":
        return torch.rand(n, generator=generator)
    return sample_train_t(n, generator, mean=train.logit_mean, std=train.logit_std)


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], model: torch.nn.Module, decay: float) -> None:
    """``ema = decay ema + (1 - decay) p`` for trained parameters; frozen ones and buffers are copied,
    because the average of a constant drifts from it by rounding."""
    for name, p in model.state_dict(keep_vars=True).items():
        if p.requires_grad:
            ema[name].mul_(decay).add_(p.detach(), alpha=1 - decay)
        else:
            ema[name].copy_(p.detach())


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
    unknown = sorted(set(recipe.data.t2i_categories) - set(CATEGORIES[:4]))
    if unknown:
        raise UserError(
            f"data.t2i_categories: unknown or non-training categories {', '.join(unknown)}; "
            f"expected some of {', '.join(CATEGORIES[:4])}"
        )
    aux_weight = recipe.train.shape_aux_weight
    if aux_weight < 0:
        raise UserError(f"train.shape_aux_weight must be >= 0, got {aux_weight}")
    if aux_weight and not 1 <= recipe.train.shape_aux_layer <= recipe.model.depth:
        raise UserError(
            f"train.shape_aux_layer must be between 1 and model.depth ({recipe.model.depth}), "
            f"got {recipe.train.shape_aux_layer}"
        )
    if aux_weight and recipe.model.edit_conditioning == "sequence" and recipe.data.task_mix != "step":
        # a mixed batch runs the DiT twice (T2I rows without source tokens), so one hooked block output
        # would not cover the whole batch
        raise UserError("train.shape_aux_weight needs data.task_mix: step with sequence edit conditioning")
    if recipe.train.text_aux_weight < 0:
        raise UserError(f"train.text_aux_weight must be >= 0, got {recipe.train.text_aux_weight}")
    if recipe.train.text_encoder not in ("joint", "frozen"):
        raise UserError(f"train.text_encoder must be joint or frozen, got {recipe.train.text_encoder!r}")
    frozen_text = recipe.train.text_encoder == "frozen"
    if frozen_text and recipe.train.text_aux_weight:
        raise UserError("train.text_aux_weight trains the text encoder; it has no effect with train.text_encoder: frozen")
    if recipe.train.text_encoder_steps < 0:
        raise UserError(f"train.text_encoder_steps must be >= 0, got {recipe.train.text_encoder_steps}")
    if recipe.run.export_dtype not in _EXPORT_DTYPES:
        raise UserError(f"run.export_dtype must be one of {', '.join(_EXPORT_DTYPES)}, got {recipe.run.export_dtype!r}")

    torch.manual_seed(recipe.run.seed)

    @functools.cache
    def corpus() -> list[str]:  # captions and instructions: the tokenizer's vocabulary, the encoder's text
        return grammar_corpus(recipe.data.vocab_samples, recipe.run.seed + 7919)

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
        tokenizer = build_tokenizer(corpus())
    model = TinyDiT(recipe.model, tokenizer)
    if init is not None:
        model.load_state_dict(init.state_dict())
    model.train()
    text_losses: list[float] = []
    if frozen_text and existing is None:
        # before the EMA copy below, so the EMA starts from (and keeps) the pretrained encoder
        text_losses = pretrain_text_encoder(
            model.text_encoder,
            tokenizer,
            corpus(),
            steps=recipe.train.text_encoder_steps,
            max_len=recipe.model.max_text_len,
            seed=recipe.run.seed,
        )
    if frozen_text:
        model.text_encoder.requires_grad_(False)
    aux_head = None
    if aux_weight:
        aux_head = ShapeSegmentationHead(recipe.model.dim, recipe.model.patch_size, model.grid)
        hidden: list[torch.Tensor] = []
        model.blocks[recipe.train.shape_aux_layer - 1].register_forward_hook(lambda m, i, o: hidden.append(o))
    params = [p for p in model.parameters() if p.requires_grad] + (list(aux_head.parameters()) if aux_head is not None else [])
    opt = torch.optim.AdamW(params, lr=recipe.train.lr, weight_decay=recipe.train.weight_decay, betas=(0.9, 0.99))
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    data_rng = np.random.default_rng(recipe.run.seed)
    gen = torch.Generator().manual_seed(recipe.run.seed)
    step = 0
    if existing is not None:
        model.load_state_dict(ckpt.tensors["model"])
        if aux_head is not None:
            if "shape_aux_head" not in ckpt.tensors:
                raise UserError(f"{existing}: was written without train.shape_aux_weight; resume with the same recipe")
            aux_head.load_state_dict(ckpt.tensors["shape_aux_head"])
        ema = {k: v.clone() for k, v in ckpt.tensors["ema"].items()}
        opt.load_state_dict(ckpt.nested("optimizer"))
        data_rng.bit_generator.state = ckpt.state["data_rng"]
        gen.set_state(ckpt.tensors["rng"]["torch"])
        step = ckpt.step
    metrics_file = start_metrics(out, recipe, step if existing is not None else None)
    if text_losses:
        tail = text_losses[-max(1, len(text_losses) // 10) :]
        row = {"step": 0, "text_encoder_steps": len(text_losses), "text_encoder_loss": sum(tail) / len(tail)}
        append_metrics(metrics_file, row)
        yield row

    def checkpoint() -> Path:
        tensors = {"model": model.state_dict(), "ema": ema, "rng": {"torch": gen.get_state()}}
        if aux_head is not None:
            tensors["shape_aux_head"] = aux_head.state_dict()
        return save_checkpoint(
            out,
            step,
            tensors,
            {"data_rng": data_rng.bit_generator.state, "tokenizer": tokenizer.to_str(), "recipe": dump_recipe(recipe)},
            nested={"optimizer": opt.state_dict()},
            keep=recipe.run.keep_checkpoints,
        )

    train = recipe.train
    n_params = sum(p.numel() for p in model.parameters())
    t_start = time.perf_counter()
    start_step = step
    window: list[float] = []
    aux_window: list[float] = []
    text_window: list[float] = []
    while step < train.steps:
        t0 = time.perf_counter()
        batch = draw_batch(data_rng, train.batch_size, recipe.data, recipe.model.image_size)
        t = sample_timesteps(train, train.batch_size, gen)  # [B]
        noise = torch.randn(batch.targets.shape, generator=gen)  # [B, 3, H, W]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, train.lr, train.warmup_steps, train.steps)
        cond = model.encode(batch.prompts, batch.sources)  # the text encoder trains too, unless frozen
        flow_loss = flow_matching_loss(model, model.encode_images(batch.targets), cond, t=t, noise=noise)
        loss = flow_loss
        if aux_head is not None:
            (tokens,) = hidden  # [B, Lt + N (+ N), D]: the hooked block ran once, on the whole batch
            hidden.clear()
            n_txt, n_img = cond.text.shape[1], model.grid * model.grid
            logits = aux_head(tokens[:, n_txt : n_txt + n_img])  # [B, K, H, W]
            labels = render_shape_labels(batch.target_scenes, recipe.model.image_size)  # [B, H, W]
            aux_loss = torch.nn.functional.cross_entropy(logits.float(), labels)
            loss = flow_loss + aux_weight * aux_loss
            aux_window.append(float(aux_loss.detach()))
        if train.text_aux_weight:
            ids, _ = tokenize(model.tokenizer, batch.prompts, recipe.model.max_text_len, model.device)  # [B, L]
            text_loss = token_identity_loss(cond.text, ids, cond.key_padding_mask, model.text_encoder.tok_emb.weight)
            loss = loss + train.text_aux_weight * text_loss
            text_window.append(float(text_loss.detach()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, train.grad_clip))
        opt.step()
        ema_update(ema, model, ema_decay_at(step, train.ema_decay))
        step += 1
        window.append(float(flow_loss.detach()))
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
            if aux_window:
                row["shape_aux_loss"] = sum(aux_window) / len(aux_window)
            if text_window:
                row["text_aux_loss"] = sum(text_window) / len(text_window)
            window.clear()
            aux_window.clear()
            text_window.clear()
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
