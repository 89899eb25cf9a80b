"""The one RL training loop: what GRPO and distillation share, so each supplies only its iteration.

A trainer (`qirl.rl.grpo`, `qirl.rl.distill`) does

    session = Session.start(recipe, resume)            # processes, out_dir, checkpoint to resume, eval sets
    ... its own set-up (rewards, teachers, prompt source) ...
    policy = session.load(model, tasks)                 # seeded load, trained state (LoRA/EMA/AdamW), metrics log
    yield from session.loop(one_iteration, nfe)         # eval at 0, iterations, checkpoints, eval, metrics
    yield session.finish(**extra_summary)               # export <out_dir>/model (EMA, LoRA merged), summary

``one_iteration(i)`` collects a batch, computes the loss, calls ``session.state.step`` (clip, AdamW, EMA,
skip on non-finite) and returns its metrics. The session sets the learning rate before it, and after it
adds the step, gradient norm, skips, lr, cumulative ``nfe``, checkpoint time and the evaluation, writes
atomic checkpoints every ``run.checkpoint_every`` iterations and at the end, and logs every
``run.log_every`` iterations (JSONL, TensorBoard, W&B). Evaluation (`qirl.rl.heldout`) runs before the
first iteration and every ``eval.every``, with the EMA weights when kept; the summary's
``eval_first`` / ``eval_last`` are the first and last of them. The loop never prints.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qirl.distributed import World
from qirl.models.policy import FlowPolicy
from qirl.models.registry import load_policy
from qirl.rl.common import TrainerRecipe, TrainState, ema_weights, export_policy, start_run
from qirl.rl.heldout import heldout_eval, heldout_sets
from qirl.runlog import open_metrics

EVAL_KEY = "eval_oracle_overall"


@dataclass
class Session:
    """One RL run from set-up to export (module docstring)."""

    recipe: TrainerRecipe
    world: World
    mine: slice  # this rank's share of train.prompts_per_iter
    out: Path
    resume_from: Path | None
    eval_sets: dict[str, Any]
    model: str = ""
    policy: Any = None  # FlowPolicy once loaded
    state: TrainState | None = None
    log: Any = None
    iteration: int = 0
    start_iteration: int = 0
    evals: dict[int, float] = field(default_factory=dict)  # eval overall by iteration, for the summary
    nfe_per_iteration: int = 0
    t_start: float = field(default_factory=time.perf_counter)

    @classmethod
    def start(cls, recipe: TrainerRecipe, resume: bool) -> Session:
        """Join the process group (if any), find the checkpoint to resume and resolve the eval sets."""
        world, mine, out, existing = start_run(recipe, resume)
        eval_sets = heldout_sets(recipe.eval) if recipe.eval.every else {}
        return cls(recipe, world, mine, out, existing, eval_sets)

    def load(
        self, model: str, tasks: set[str], prepare: Callable[[FlowPolicy], None] | None = None
    ) -> FlowPolicy:
        """Seed torch with ``run.seed``, load the trained policy (eval mode: no dropout, so a ratio is exactly
        1 before the update), call ``prepare(policy)`` (GRPO keeps its frozen KL reference there, before
        LoRA or data-parallel wrapping), then build and restore the trained state and open the metrics."""
        recipe = self.recipe
        torch.manual_seed(recipe.run.seed)
        self.model = model
        self.policy = load_policy(model, options=recipe.policy)
        self.policy.eval()
        if prepare is not None:
            prepare(self.policy)
        self.state = TrainState.create(
            self.policy, recipe.train, recipe.run.seed, self.world, recipe.distributed, tasks, self.resume_from
        )
        self.iteration = self.start_iteration = self.state.iteration
        resumed_at = self.iteration if self.resume_from is not None else None
        self.log = open_metrics(self.out, recipe, resumed_at, recipe.run.tensorboard, self.world.is_main)
        return self.policy

    def evaluate(self, step: int) -> dict[str, float]:
        """Oracle scores of the eval sets (EMA weights when kept); every rank runs it (FSDP's forward is a
        collective), rank 0 saves the grids."""
        grid = self.out / "grids" / f"step_{step:05d}" if self.world.is_main else None
        with ema_weights(self.state.named, self.state.ema):
            row = heldout_eval(self.policy, self.recipe.eval, self.eval_sets, grid)
        if EVAL_KEY in row:
            self.evals[step] = row[EVAL_KEY]
        return row

    def loop(self, one_iteration: Callable[[int], dict[str, Any]], nfe_per_iteration: int) -> Iterator[dict[str, Any]]:
        """Run iterations until ``train.iterations``; yield the logged rows (module docstring)."""
        recipe, state = self.recipe, self.state
        tr, run = recipe.train, recipe.run
        self.nfe_per_iteration = nfe_per_iteration
        try:
            if self.eval_sets and self.iteration == 0:
                row = {"step": 0, "total": tr.iterations, "nfe": 0, **self.evaluate(0)}
                self.log.append(row)
                yield row
            while self.iteration < tr.iterations:
                t0 = time.perf_counter()
                lr = tr.lr_at(self.iteration)
                for group in state.opt.param_groups:
                    group["lr"] = lr
                metrics = one_iteration(self.iteration)
                self.iteration += 1
                t_ckpt = time.perf_counter()
                if self.iteration % run.checkpoint_every == 0 or self.iteration == tr.iterations:
                    state.save(self.out, self.iteration, recipe)
                row: dict[str, Any] = {
                    "step": self.iteration,
                    "total": tr.iterations,
                    **metrics,
                    "grad_norm": state.grad_norm,
                    "skipped": state.skipped,
                    "lr": lr,
                    "nfe": self.iteration * nfe_per_iteration,
                    "checkpoint_s": time.perf_counter() - t_ckpt,
                    "step_s": time.perf_counter() - t0,
                }
                if self.eval_sets and self.iteration % recipe.eval.every == 0:
                    row.update(self.evaluate(self.iteration))
                if self.iteration % run.log_every == 0 or self.iteration == tr.iterations or EVAL_KEY in row:
                    self.log.append(row)
                    yield row
        finally:
            self.log.close()

    def finish(self, **extra: Any) -> dict[str, Any]:
        """Export ``<out_dir>/model`` (EMA weights when kept, LoRA merged; rank 0 writes) and the summary."""
        tr, state = self.recipe.train, self.state
        final = self.out / "model"
        with ema_weights(state.named, state.ema):
            rebuild = lambda: load_policy(self.model, device="cpu")  # noqa: E731 - FSDP export only
            export_policy(self.policy, final, tr.lora_rank > 0, self.world, rebuild, tr)
        evals = self.evals
        return {
            "done": True,
            "steps": self.iteration,
            "resumed_from": self.start_iteration,
            "skipped": state.skipped,
            **extra,
            "train_seconds": round(time.perf_counter() - self.t_start, 1),
            "nfe": self.iteration * self.nfe_per_iteration,
            **({"eval_first": round(evals[min(evals)], 2), "eval_last": round(evals[max(evals)], 2)} if evals else {}),
            "model": str(final),
        }
