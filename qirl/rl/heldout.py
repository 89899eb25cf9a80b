"""Evaluation during RL: oracle scores and sample grids on fixed prompts (ODE, fixed noise).

The training reward can rise while what it stands for falls (reward hacking). Both trainers therefore
score the policy's deterministic samples of fixed prompts that training never draws with the oracle
every few iterations. Recipes evaluate on the validation sets (`val-t2i`, `val-edit`), so that tuning
against these curves leaves `heldout-*` unseen for the final figures in docs: T2I overall and pillars (`qirl.shapes.oracle.aggregate`, Qwen-Image-Bench style) and edit
overall, success, preservation and quality (`aggregate_edits`). Noise is `image_noise(seed, i)`, so
two evaluations differ only by the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qirl.data import PromptRecord, make_grid, save_image_atomic
from qirl.errors import UserError
from qirl.prompt_sets import image_noise, record_source, resolve_prompts
from qirl.sampling import sample_ode
from qirl.shapes import aggregate, aggregate_edits, score_edit, score_t2i


@dataclass
class HeldoutConfig:
    every: int = 10  # iterations between evaluations (0: never); also once before training
    prompts: str = "val-t2i"  # a built-in set or JSONL; comma-separated for several (e.g. both tasks)
    n: int = 32  # first n prompts of each set
    num_steps: int = 10  # ODE steps
    guidance: float = 3.0
    seed: int = 0
    grid: int = 16  # images of each set saved as <out_dir>/grids/<set>_<step>.png (0: none)


def heldout_sets(cfg: HeldoutConfig) -> dict[str, list[PromptRecord]]:
    """{task: the first ``cfg.n`` records of that task} over the listed sets; UserError on an empty one."""
    by_task: dict[str, list[PromptRecord]] = {}
    for spec in [s.strip() for s in cfg.prompts.split(",") if s.strip()]:
        records = resolve_prompts(spec)
        for task in ("t2i", "edit"):
            rows = [r for r in records if r.task == task]
            if rows:
                by_task.setdefault(task, []).extend(rows)
    if not by_task:
        raise UserError(f"eval.prompts={cfg.prompts!r}: no prompts")
    return {task: rows[: cfg.n] for task, rows in by_task.items()}


@torch.no_grad()
def heldout_eval(
    policy: Any, cfg: HeldoutConfig, sets: dict[str, list[PromptRecord]], grid_path: Path | None = None
) -> dict[str, float]:
    """Oracle scores (0-100) of the policy's samples of each task's held-out prompts.

    Keys: ``eval/<task>/<metric>`` for every pillar (T2I) or edit metric, and ``eval_oracle_overall``,
    the mean over tasks of their overall. With ``grid_path`` the first ``cfg.grid`` images of each task
    are saved as ``<grid_path>_<task>.png`` (edit grids interleave source and output).
    """
    out: dict[str, float] = {}
    size = policy.image_size
    for task, records in sets.items():
        sources = [record_source(r, size) for r in records]
        cond = policy.encode([r.prompt for r in records], sources if task == "edit" else None)
        noise = torch.stack([image_noise(cfg.seed, i, tuple(policy.latent_shape)) for i in range(len(records))])
        latents = sample_ode(policy, cond, cfg.num_steps, guidance=cfg.guidance, noise=noise.to(policy.device))
        images = policy.decode(latents).float().cpu()  # [B, 3, H, W] in [0, 1]
        hwc = images.permute(0, 2, 3, 1).numpy()  # [B, H, W, 3]
        if task == "t2i":
            agg = aggregate([score_t2i(img, r.prompt) for img, r in zip(hwc, records, strict=True)])
        else:
            agg = aggregate_edits(
                [
                    score_edit(src.permute(1, 2, 0).numpy(), r.prompt, img)
                    for src, img, r in zip(sources, hwc, records, strict=True)
                ]
            )
        for key, value in agg.items():
            if key != "n" and value is not None:
                out[f"eval/{task}/{key}"] = float(value)
        if grid_path is not None and cfg.grid > 0:
            shown = images[: cfg.grid]
            if task == "edit":
                pairs = torch.stack([torch.stack(sources[: cfg.grid]), shown], dim=1)  # [n, 2, 3, H, W]
                shown = pairs.flatten(0, 1)  # source, output, source, output, ...
            save_image_atomic(make_grid(shown, ncol=8, upscale=2), f"{grid_path}_{task}.png")
    overall = [out[f"eval/{task}/overall"] for task in sets if f"eval/{task}/overall" in out]
    out["eval_oracle_overall"] = float(np.mean(overall)) if overall else float("nan")
    return out
