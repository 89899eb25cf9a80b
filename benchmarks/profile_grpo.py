"""Where a GRPO iteration's time goes: model forward, model backward, reward scoring, and the rest.

The issue's target: everything except model forward/backward and reward scoring ("overhead": prompt
drawing and encoding, the SDE step kernels, advantages, the optimizer step, checkpoints, metrics)
stays under 10% of an iteration. This runs a short GRPO run of a recipe with two probes:

- forward:  wall time inside the policy's ``velocity`` (rollout and training forwards),
- backward: wall time inside ``Tensor.backward`` (the training backward),
- scoring:  the time the loop waits for reward futures (``reward_wait_s``; scoring that overlaps the
            rollout costs nothing and is not counted),

and prints each as a share of the mean iteration time (``step_s``; held-out evaluation excluded, it is
reported apart). The first iteration is dropped as warm-up.

    python benchmarks/profile_grpo.py                              # recipes/t2i.yaml, 6 iterations
    python benchmarks/profile_grpo.py --recipe recipes/edit.yaml --iters 4 --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from qirl.config import load_recipe
from qirl.models.tiny_dit import TinyDiT
from qirl.rl.grpo import GrpoRecipe, grpo


class Timer:
    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        return timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/t2i.yaml")
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("overrides", nargs="*", help="recipe overrides key=value")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    forward, backward = Timer(), Timer()
    TinyDiT.velocity = forward.wrap(TinyDiT.velocity)
    torch.Tensor.backward = backward.wrap(torch.Tensor.backward)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_recipe(
            GrpoRecipe,
            args.recipe,
            [*args.overrides, f"train.iterations={args.iters}", "eval.every=0", f"run.out_dir={Path(tmp) / 'run'}"],
        )
        rows, marks = [], []
        for row in grpo(cfg):
            if "step_s" in row:
                rows.append(row)
                marks.append((forward.seconds, backward.seconds))
    rows, deltas = rows[1:], [(b[0] - a[0], b[1] - a[1]) for a, b in zip(marks, marks[1:], strict=False)]
    n = len(rows)
    step = sum(r["step_s"] for r in rows) / n
    fwd = sum(d[0] for d in deltas) / n
    bwd = sum(d[1] for d in deltas) / n
    wait = sum(r["reward_wait_s"] for r in rows) / n
    rest = step - fwd - bwd - wait
    table = {
        "iteration_s": round(step, 3),
        "forward": round(fwd / step, 3),
        "backward": round(bwd / step, 3),
        "reward_wait": round(wait / step, 3),
        "overhead": round(rest / step, 3),
        "rollout_s": round(sum(r["rollout_s"] for r in rows) / n, 3),
        "train_s": round(sum(r["train_s"] for r in rows) / n, 3),
        "checkpoint_s": round(sum(r["checkpoint_s"] for r in rows) / n, 3),
        "iterations_timed": n,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    print(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
