"""Training and evaluating VLM reward models on an annotation set (`qirl score train recipe.yaml`).

Pointwise: each example is one image, one rating dimension drawn from `data.dimensions` (the prompt
names it, so one model answers every dimension) and that dimension's Likert label; the loss is
`losses.pointwise_loss` (CE + regression of the expectation). With `model.cot` the assistant text is
`<reasoning> Score: ` (reasoning templated from the row's `reasons`, prompting.reasoning_text, cut to
`model.max_cot_tokens` tokens) under teacher forcing: LM cross-entropy on the reasoning and marker
tokens plus the score loss at the position after the marker.

Pairwise: each example is a valid pair of the same prompt; both images go through the backbone in one
batch and `losses.bradley_terry_loss` (soft label, ties 0.5) trains the scalar head and the backbone.
After training, the mean and std of r over training images are stored for the reward's normalisation.

The run is a generator of metric dicts; it checkpoints atomically (model, optimizer, data RNG, step)
through `qirl.checkpoint`, resumes exactly with `resume=True`, and writes the final model with
`VLMReward.save` to `<out_dir>/model`.

Evaluation (`evaluate_reward_model`) is against the oracle, not the noisy labels: pairwise accuracy on
`pairwise_test` (does the model order the two images as the oracle does; oracle ties skipped, a model
tie counts one half) and, on `pointwise_test`, Spearman's rank correlation of reward and oracle score
and the same pairwise accuracy over every two images of the same prompt.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qirl.checkpoint import load_checkpoint, save_checkpoint
from qirl.config import dump_recipe
from qirl.errors import UserError
from qirl.rewards.vlm.backbone import completion_token_logits
from qirl.rewards.vlm.data import (
    LABEL_COLUMNS,
    image_row,
    load_annotations,
    needs_source,
    quiet_progress,
    require,
)
from qirl.rewards.vlm.losses import (
    bradley_terry_loss,
    expected_score,
    lm_loss,
    pointwise_loss,
    within_group_rank_loss,
)
from qirl.rewards.vlm.model import VLMReward, VLMRewardConfig
from qirl.rewards.vlm.prompting import MARKER, answer_prefix, reasoning_text
from qirl.runlog import append_metrics, checkpoint_to_resume, start_metrics
from qirl.schedules import lr_at
from qirl.stats import spearman


@dataclass
class RewardData:
    path: str = "data/annotations"  # a DatasetDict folder (qirl.rewards.annotate schema)
    dimensions: list[str] = field(default_factory=lambda: list(LABEL_COLUMNS))  # pointwise labels trained
    only_valid: bool = True  # pairwise: skip rows whose `valid` is false
    max_eval: int = 256  # rows per test split in evaluations (0 = all)


@dataclass
class RewardTrain:
    steps: int = 300
    batch_size: int = 16  # images (pointwise) or pairs (pairwise) per step
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 20
    grad_clip: float = 1.0
    regression_weight: float = 1.0  # pointwise: weight of ((E - y) / 4)^2 beside the CE (losses.py)
    # Pointwise: draw each batch as batch_size / group_size prompts x group_size of their images, all asked
    # one dimension, and add rank_weight x the within-prompt ranking term (losses.py). 1 / 0.0: plain rows.
    group_size: int = 1
    rank_weight: float = 0.0
    lm_weight: float = 1.0  # CoT: weight of the reasoning tokens' LM loss
    freeze_vision: bool = False  # train the decoder (and head) only
    gradient_checkpointing: bool = False  # for large checkpoints
    calibration_images: int = 256  # pairwise: training images used for the reward's mean / std
    # A trained reward folder (`qirl score train`'s <out_dir>/model) to continue from, e.g. on the union
    # of annotation rounds (data.path=a,b); its mode must be the recipe's. Empty: start from model.path.
    init_from: str = ""


@dataclass
class RewardRun:
    out_dir: str = "runs/rm"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0 = evaluate at the end only
    checkpoint_every: int = 100
    keep_checkpoints: int = 2


@dataclass
class RewardTrainRecipe:
    model: VLMRewardConfig = field(default_factory=VLMRewardConfig)
    data: RewardData = field(default_factory=RewardData)
    train: RewardTrain = field(default_factory=RewardTrain)
    run: RewardRun = field(default_factory=RewardRun)


# ------------------------------------------------------------------------------------------ metrics


def pair_accuracy(
    s_a: torch.Tensor, s_b: torch.Tensor, o_a: torch.Tensor, o_b: torch.Tensor, tie_eps: float
) -> tuple[float, int]:
    """Agreement of the model's order with the oracle's; oracle ties (|diff| <= tie_eps) and NaN scores
    skipped; a model tie counts 1/2."""
    keep = ((o_a - o_b).abs() > tie_eps) & s_a.isfinite() & s_b.isfinite()
    if not keep.any():
        return float("nan"), 0
    agree = torch.sign(s_a - s_b)[keep] * torch.sign(o_a - o_b)[keep]  # +1 agree, -1 disagree, 0 model tie
    return float(((agree + 1) / 2).mean()), int(keep.sum())


def _subset(ds: Any, max_rows: int) -> Any:
    return ds.select(range(min(len(ds), max_rows))) if max_rows and len(ds) > max_rows else ds


class DimensionMean:
    """A pointwise reward asked several questions, scored as the weighted mean of the answers: the
    composite of `recipes/t2i_rm.yaml` (alignment, fidelity, quality), as `evaluate_reward_model` sees it."""

    def __init__(self, model: VLMReward, weights: dict[str, float]) -> None:
        if model.config.mode != "pointwise":
            raise UserError("dimensions: only a pointwise reward model answers per-dimension questions")
        from qirl.rewards.vlm.model import DIMENSIONS

        if bad := [d for d in weights if d not in DIMENSIONS]:
            raise UserError(f"dimensions: unknown {', '.join(bad)}; expected some of {', '.join(DIMENSIONS)}")
        if not weights or sum(weights.values()) <= 0 or min(weights.values()) < 0:
            raise UserError(f"dimensions: weights must be >= 0 with a positive sum, got {weights}")
        self.model, self.weights = model, weights

    @classmethod
    def parse(cls, model: VLMReward, specs: Sequence[str]) -> DimensionMean:
        """From `dim` / `dim=weight` strings (weight 1 by default)."""
        weights: dict[str, float] = {}
        for spec in specs:
            dim, _, w = spec.partition("=")
            try:
                weights[dim.strip()] = float(w) if w else 1.0
            except ValueError:
                raise UserError(f"--dimension {spec!r}: the weight must be a number") from None
        return cls(model, weights)

    def reward_rows(self, rows: Sequence[Any], prompts: Sequence[str], tasks: Sequence[str]) -> torch.Tensor:
        asked = self.model.config.dimension
        total = sum(self.weights.values())
        try:
            out = 0.0
            for dim, w in self.weights.items():
                self.model.config.dimension = dim
                out = out + (w / total) * self.model.reward_rows(rows, prompts, tasks)  # [N]
        finally:
            self.model.config.dimension = asked
        return out


def evaluate_reward_model(
    model: VLMReward, dataset: Any, max_rows: int = 0, tie_eps: float = 1e-6
) -> dict[str, float | int]:
    """Held-out agreement with the oracle on `pairwise_test` and `pointwise_test` (whichever exist).

    `dataset`: a DatasetDict or its folder. Returns `pairwise_accuracy` / `pairwise_n` (pairs of
    `pairwise_test`, oracle ties skipped), `label_accuracy` (same pairs against the annotators' label,
    their ties skipped), `spearman` / `spearman_n` (reward vs oracle on `pointwise_test`) and
    `prompt_pair_accuracy` / `prompt_pair_n` (every two `pointwise_test` images of one prompt).
    """
    data = load_annotations(dataset) if isinstance(dataset, (str, Path)) else dataset
    out: dict[str, float | int] = {}
    if "pairwise_test" in data:
        ds = _subset(
            require(
                data,
                "pairwise_test",
                ("image_a", "image_b", "prompt", "task", "oracle_a", "oracle_b"),
                "evaluate",
            ),
            max_rows,
        )
        needs_source(ds, "pairwise_test", "evaluate")
        rows = [ds[i] for i in range(len(ds))]
        if "valid" in ds.column_names:
            rows = [r for r in rows if r["valid"]]
        prompts, tasks = [r["prompt"] for r in rows], [r["task"] for r in rows]
        s_a = model.reward_rows([image_row(r, "image_a", "pairwise_test") for r in rows], prompts, tasks)
        s_b = model.reward_rows([image_row(r, "image_b", "pairwise_test") for r in rows], prompts, tasks)
        o_a = torch.tensor([r["oracle_a"] for r in rows], dtype=torch.float64)
        o_b = torch.tensor([r["oracle_b"] for r in rows], dtype=torch.float64)
        out["pairwise_accuracy"], out["pairwise_n"] = pair_accuracy(
            s_a.double(), s_b.double(), o_a, o_b, tie_eps
        )
        if "label" in ds.column_names:
            lab = torch.tensor([r["label"] for r in rows], dtype=torch.float64)
            out["label_accuracy"], _ = pair_accuracy(s_a.double(), s_b.double(), lab, 1 - lab, 0.25)
    if "pointwise_test" in data:
        ds = _subset(
            require(data, "pointwise_test", ("image", "prompt", "task", "oracle"), "evaluate"), max_rows
        )
        needs_source(ds, "pointwise_test", "evaluate")
        rows = [ds[i] for i in range(len(ds))]
        s = model.reward_rows(
            [image_row(r, "image", "pointwise_test") for r in rows],
            [r["prompt"] for r in rows],
            [r["task"] for r in rows],
        ).double()
        o = torch.tensor([r["oracle"] for r in rows], dtype=torch.float64)
        ok = s.isfinite()
        out["spearman"], out["spearman_n"] = (
            spearman(s[ok].numpy(), o[ok].numpy()) if ok.sum() > 1 else float("nan"),
            int(ok.sum()),
        )
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(r["prompt"], []).append(i)
        pa = [(i, j) for g in groups.values() for i, j in combinations(g, 2)]
        if pa:
            ia, ib = torch.tensor([p[0] for p in pa]), torch.tensor([p[1] for p in pa])
            out["prompt_pair_accuracy"], out["prompt_pair_n"] = pair_accuracy(
                s[ia], s[ib], o[ia], o[ib], tie_eps
            )
    if not out:
        raise UserError("evaluate: the dataset has neither a 'pairwise_test' nor a 'pointwise_test' split")
    return out


# ------------------------------------------------------------------------------------------ training


def _truncate_words(rm: VLMReward, text: str, max_tokens: int) -> str:
    ids = rm.tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else rm.tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)


def _pointwise_step(
    rm: VLMReward, rows: list[dict], recipe: RewardTrainRecipe, rng: np.random.Generator
) -> tuple[torch.Tensor, dict[str, float]]:
    """One pointwise batch. Consecutive runs of `train.group_size` rows are one prompt's images and are
    asked one dimension, so the ranking term can compare them."""
    images, prompts, tasks, dims, labels, completions, groups = [], [], [], [], [], [], []
    group_size = recipe.train.group_size
    for i, r in enumerate(rows):
        img = image_row(r, "image", "pointwise")
        if i % group_size == 0:  # a new group: draw its dimension
            dim = recipe.data.dimensions[int(rng.integers(len(recipe.data.dimensions)))]
        if img is None:
            continue
        reasoning = None
        if recipe.model.cot:
            reasoning = _truncate_words(rm, reasoning_text(r.get("reasons")), recipe.model.max_cot_tokens)
        label = r[dim]
        if not isinstance(label, (int, np.integer)) or not 1 <= label <= 5:
            raise UserError(f"pointwise: column {dim!r} must hold Likert integers 1..5, got {label!r}")
        images.append(img)
        prompts.append(r["prompt"])
        tasks.append(r["task"])
        dims.append(dim)
        labels.append(int(label))
        groups.append(i // group_size)
        completions.append(answer_prefix(reasoning))
    if not images:
        raise UserError("pointwise: a batch had no usable rows (edit rows without source_image?)")
    batch = rm.encode(images, prompts, tasks, completions, dims)
    hidden = rm.hidden(batch)  # [B, L, H]
    logits5 = rm.score_logits(hidden, batch["score_pos"])  # [B, 5]
    y = torch.tensor(labels)
    loss, parts = pointwise_loss(logits5, y, recipe.train.regression_weight)
    metrics = {
        "ce": float(parts["ce"]),
        "reg": float(parts["reg"]),
        "label_acc": float((logits5.argmax(-1).cpu() + 1 == y).float().mean()),
    }
    if recipe.train.rank_weight > 0:
        rank = within_group_rank_loss(expected_score(logits5), y, torch.tensor(groups))
        if rank is not None:
            loss = loss + recipe.train.rank_weight * rank
            metrics["rank"] = float(rank.detach())
    if recipe.model.cot:
        # Every completion token (the reasoning and the marker; the score is not in the text) is an LM target.
        lm = lm_loss(*completion_token_logits(rm.model, hidden, batch))
        loss = loss + recipe.train.lm_weight * lm
        metrics["lm"] = float(lm.detach())
    return loss, metrics


def _pairwise_step(rm: VLMReward, rows: list[dict]) -> tuple[torch.Tensor, dict[str, float]]:
    a_rows, b_rows, prompts, tasks, labels = [], [], [], [], []
    for r in rows:
        a, b = image_row(r, "image_a", "pairwise"), image_row(r, "image_b", "pairwise")
        if a is None or b is None:
            continue
        a_rows.append(a)
        b_rows.append(b)
        if not isinstance(r["label"], (int, float)) or not 0.0 <= r["label"] <= 1.0:
            raise UserError(
                f"pairwise: column 'label' must be in [0, 1] (1 a, 0 b, 0.5 tie), got {r['label']!r}"
            )
        prompts.append(r["prompt"])
        tasks.append(r["task"])
        labels.append(float(r["label"]))
    if not a_rows:
        raise UserError("pairwise: a batch had no usable rows (edit rows without source_image?)")
    n = len(a_rows)
    batch = rm.encode(a_rows + b_rows, prompts * 2, tasks * 2, [MARKER] * (2 * n))
    r = rm.scalar(rm.hidden(batch), batch["score_pos"])  # [2N]
    lab = torch.tensor(labels)
    loss = bradley_terry_loss(r[:n], r[n:], lab)
    d = (r[:n] - r[n:]).detach().cpu()
    decided = lab != 0.5
    acc = float(((d > 0).float() == lab)[decided].float().mean()) if decided.any() else float("nan")
    return loss, {"pair_acc": acc}


@torch.no_grad()
def _calibrate(rm: VLMReward, ds: Any, n: int, rng: np.random.Generator) -> tuple[float, float]:
    """Mean and std of the raw r over up to `n` training images (both sides of the pairs)."""
    idx = rng.permutation(len(ds))[: max(1, n // 2)]
    rows = [ds[int(i)] for i in idx]
    imgs = [image_row(r, k, "pairwise") for r in rows for k in ("image_a", "image_b")]
    prompts = [r["prompt"] for r in rows for _ in range(2)]
    tasks = [r["task"] for r in rows for _ in range(2)]
    raw = rm.run_rows(imgs, prompts, tasks)
    raw = raw[raw.isfinite()]
    if raw.numel() < 2:
        return 0.0, 1.0
    return float(raw.mean()), max(float(raw.std()), 1e-6)


def _freeze_vision(rm: VLMReward) -> None:
    visual = getattr(rm.model.base_model, "visual", None) or getattr(rm.model, "visual", None)
    if visual is None:
        raise UserError("train.freeze_vision: this checkpoint has no 'visual' tower to freeze")
    for p in visual.parameters():
        p.requires_grad_(False)


def _check(recipe: RewardTrainRecipe) -> None:
    recipe.model.validate("model")
    if not recipe.data.dimensions or any(d not in LABEL_COLUMNS for d in recipe.data.dimensions):
        raise UserError(
            f"data.dimensions must be a non-empty subset of {', '.join(LABEL_COLUMNS)}, got {recipe.data.dimensions}"
        )
    t = recipe.train
    if t.steps < 1 or t.batch_size < 1 or t.lr <= 0:
        raise UserError("train.steps, train.batch_size and train.lr must be positive")
    if recipe.run.log_every < 1 or recipe.run.checkpoint_every < 1:
        raise UserError("run.log_every and run.checkpoint_every must be positive")
    if t.group_size < 1 or t.batch_size % t.group_size or t.rank_weight < 0:
        raise UserError("train.group_size must divide train.batch_size and train.rank_weight be >= 0")
    if t.rank_weight > 0 and t.group_size < 2:
        raise UserError("train.rank_weight needs train.group_size >= 2 (images of one prompt to rank)")
    if recipe.model.mode != "pointwise" and (t.group_size > 1 or t.rank_weight > 0):
        raise UserError("train.group_size and train.rank_weight are for pointwise reward models")
    if t.init_from and recipe.model.path:
        raise UserError("train.init_from and model.path both name weights to start from; set one")


def _initial_model(recipe: RewardTrainRecipe) -> VLMReward:
    """The recipe's model, or the trained reward folder `train.init_from` (head included) with the
    recipe's run-time settings."""
    if not recipe.train.init_from:
        return VLMReward(recipe.model)
    m = recipe.model
    rm = VLMReward.load(recipe.train.init_from, device=m.device, dtype=m.dtype, batch_size=m.batch_size,
                        dimension=m.dimension, cot=m.cot, max_cot_tokens=m.max_cot_tokens, tasks=m.tasks)
    if rm.config.mode != m.mode:
        raise UserError(f"train.init_from={recipe.train.init_from}: a {rm.config.mode} reward model, "
                        f"the recipe trains a {m.mode} one (model.mode)")
    return rm


def _rows_by_prompt(ds: Any) -> list[np.ndarray]:
    """Row indices of each prompt with at least two images (a ranking needs two)."""
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(ds["prompt"]):
        groups.setdefault(prompt, []).append(i)
    kept = [np.asarray(g) for g in groups.values() if len(g) >= 2]
    if not kept:
        raise UserError("train.group_size > 1: no prompt of the training split has two images")
    return kept


def _grouped_batch(
    by_prompt: list[np.ndarray], n_groups: int, group_size: int, rng: np.random.Generator
) -> list[int]:
    """n_groups distinct prompts x group_size of their rows (with replacement when a prompt has fewer),
    laid out group after group."""
    picked = rng.choice(len(by_prompt), size=min(n_groups, len(by_prompt)), replace=False)
    idx: list[int] = []
    for p in picked:
        rows = by_prompt[int(p)]
        idx.extend(int(i) for i in rng.choice(rows, size=group_size, replace=len(rows) < group_size))
    return idx


def train_reward_model(recipe: RewardTrainRecipe, resume: bool = False) -> Iterator[dict[str, Any]]:
    """Train a VLM reward model; yield metrics every `log_every` steps (and evaluations), then `done`."""
    _check(recipe)
    out = Path(recipe.run.out_dir)
    existing = checkpoint_to_resume(out, resume)
    pointwise = recipe.model.mode == "pointwise"
    data = load_annotations(recipe.data.path)
    where = recipe.data.path
    if pointwise:
        cols = ["image", "prompt", "task", *recipe.data.dimensions] + (
            ["reasons"] if recipe.model.cot else []
        )
        ds = require(data, "pointwise", cols, where)
        needs_source(ds, "pointwise", where)
    else:
        ds = require(data, "pairwise", ["image_a", "image_b", "prompt", "task", "label"], where)
        needs_source(ds, "pairwise", where)
        if recipe.data.only_valid and "valid" in ds.column_names:
            with quiet_progress():
                ds = ds.filter(lambda v: bool(v), input_columns="valid")
            if len(ds) == 0:
                raise UserError(f"{where}: split 'pairwise' has no valid rows")

    rm = _initial_model(recipe)
    if recipe.train.freeze_vision:
        _freeze_vision(rm)
    if recipe.train.gradient_checkpointing:
        rm.model.gradient_checkpointing_enable()
    rm.train()
    opt = torch.optim.AdamW(
        rm.trainable_parameters(), lr=recipe.train.lr, weight_decay=recipe.train.weight_decay
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

    def checkpoint() -> None:
        save_checkpoint(
            out,
            step,
            {"model": rm.state_dict()},
            {"data_rng": data_rng.bit_generator.state, "recipe": dump_recipe(recipe)},
            nested={"optimizer": opt.state_dict()},
            keep=recipe.run.keep_checkpoints,
        )

    train = recipe.train
    t_start, start_step = time.perf_counter(), step
    window: dict[str, list[float]] = {}
    by_prompt = _rows_by_prompt(ds) if train.group_size > 1 else None
    while step < train.steps:
        t0 = time.perf_counter()
        if by_prompt is None:
            idx = data_rng.choice(len(ds), size=min(train.batch_size, len(ds)), replace=False)
        else:
            idx = _grouped_batch(by_prompt, train.batch_size // train.group_size, train.group_size, data_rng)
        rows = [ds[int(i)] for i in idx]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, train.lr, train.warmup_steps, train.steps)
        rm.train()
        if pointwise:
            loss, parts = _pointwise_step(rm, rows, recipe, data_rng)
        else:
            loss, parts = _pairwise_step(rm, rows)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(rm.trainable_parameters(), train.grad_clip))
        opt.step()
        step += 1
        for k, v in {"loss": float(loss.detach()), "grad_norm": grad_norm, **parts}.items():
            window.setdefault(k, []).append(v)
        if step % recipe.run.checkpoint_every == 0 or step == train.steps:
            checkpoint()
        if step % recipe.run.log_every == 0 or step == train.steps:
            row: dict[str, Any] = {
                "step": step,
                "total": train.steps,
                "lr": lr_at(step - 1, train.lr, train.warmup_steps, train.steps),
                "step_s": time.perf_counter() - t0,
            }
            row.update(
                {
                    k: float(np.nanmean(v)) if not all(math.isnan(x) for x in v) else float("nan")
                    for k, v in window.items()
                }
            )
            window.clear()
            append_metrics(metrics_file, row)
            yield row
        if recipe.run.eval_every and step % recipe.run.eval_every == 0 and step < train.steps:
            ev = {
                "step": step,
                "total": train.steps,
                "eval": True,
                **evaluate_reward_model(rm, data, max_rows=recipe.data.max_eval),
            }
            append_metrics(metrics_file, ev)
            yield ev

    if not pointwise:
        rm.config.head_mean, rm.config.head_std = _calibrate(
            rm, ds, train.calibration_images, np.random.default_rng(recipe.run.seed + 1)
        )
    final = rm.save(out / "model")
    evaluation = evaluate_reward_model(rm, data, max_rows=recipe.data.max_eval)
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


def score_dataset_rows(model: VLMReward, rows: Sequence[dict], key: str = "image") -> torch.Tensor:
    """Rewards for annotation rows (a convenience for notebooks and the CLI's `score` command)."""
    return model.reward_rows(
        [image_row(r, key, "rows") for r in rows], [r["prompt"] for r in rows], [r["task"] for r in rows]
    )
