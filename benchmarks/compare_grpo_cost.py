"""What a GRPO iteration costs with one model against another, measured side by side in one run.

Runs `--iters` iterations of the same recipe (default `recipes/t2i.yaml`: P = 8, G = 8, 10 SDE steps)
for each model, alternating the models run by run (`--rounds` times) so that whatever else the machine
is doing slows both alike, drops each run's first iteration (warm-up), and prints the mean iteration
time of each and the ratio to the first model. Held-out evaluation and checkpoints are off.

    # today's base (from git) against the shipped one
    mkdir -p /tmp/old && git archive 7f11a23 qirl/assets/base | tar -x -C /tmp/old
    python benchmarks/compare_grpo_cost.py --model /tmp/old/qirl/assets/base --model base
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from qirl.config import load_recipe
from qirl.rl.grpo import GrpoRecipe, grpo


def iteration_seconds(recipe: str, model: str, iters: int, overrides: list[str]) -> list[float]:
    """step_s of each iteration after the first of a fresh run of ``recipe`` on ``model``."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_recipe(
            GrpoRecipe,
            recipe,
            [
                *overrides,
                f"model={model}",
                f"train.iterations={iters}",
                "eval.every=0",
                f"run.checkpoint_every={iters + 1}",
                f"run.out_dir={Path(tmp) / 'run'}",
            ],
        )
        rows = [row["step_s"] for row in grpo(cfg) if "step_s" in row]
    return rows[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="model spec (repeat; the first is the reference)")
    ap.add_argument("--recipe", default="recipes/t2i.yaml")
    ap.add_argument("--iters", type=int, default=3, help="iterations per run (the first is dropped)")
    ap.add_argument("--rounds", type=int, default=2, help="runs per model, alternated")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("overrides", nargs="*", help="recipe overrides key=value")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    times: dict[str, list[float]] = {m: [] for m in args.model}
    for _ in range(args.rounds):
        for model in args.model:
            times[model] += iteration_seconds(args.recipe, model, args.iters, args.overrides)
    ref = statistics.mean(times[args.model[0]])
    table = {
        "recipe": args.recipe,
        "iterations_timed_per_model": len(times[args.model[0]]),
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "models": {
            m: {"iteration_s": round(statistics.mean(t), 3), "ratio": round(statistics.mean(t) / ref, 3)}
            for m, t in times.items()
        },
    }
    print(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
