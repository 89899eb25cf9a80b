"""Data-parallel GRPO on the CPU: N processes (gloo) against one process with the same total threads.

Runs the same recipe twice, side by side in one invocation, with the same global batch:

    one:  qirl --threads T grpo RECIPE ...                       (1 process x T threads)
    many: qirl --threads T/N grpo RECIPE ... --nproc N           (N processes x T/N threads, DDP or FSDP2)

and prints the mean iteration time of each (``step_s`` from metrics.jsonl, the first iteration dropped
as warm-up), images per second, the ratio, and the largest weight difference between the two exported
models (the runs must agree: `tests/test_distributed.py`). On a machine with T cores this measures the
overhead of processes and collectives, not scaling: the compute is the same and only its split differs.

    python benchmarks/bench_distributed.py                            # 2 cores: 1x2 threads vs 2x1
    python benchmarks/bench_distributed.py --strategy fsdp --iters 6
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def run(out: Path, args: argparse.Namespace, nproc: int) -> list[dict]:
    threads = max(1, args.threads // nproc)
    cmd = [sys.executable, "-m", "qirl.cli", "--threads", str(threads), "grpo", args.recipe]
    cmd += [
        f"train.iterations={args.iters}",
        f"train.prompts_per_iter={args.prompts}",
        f"train.group_size={args.group}",
        "eval.every=0",
        "run.checkpoint_every=1000",
        "run.tensorboard=false",
        f"distributed.strategy={args.strategy}",
        f"run.out_dir={out}",
        "--quiet",
        "--nproc",
        str(nproc),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"step_s"' in line]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/t2i.yaml")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=8, help="P (global)")
    ap.add_argument("--group", type=int, default=8, help="G")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="total CPU threads of each arm")
    ap.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"])
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        rows = {
            "one": run(Path(tmp) / "one", args, 1),
            "many": run(Path(tmp) / "many", args, args.nproc),
        }
        w1 = load_file(str(Path(tmp) / "one" / "model" / "model.safetensors"))
        w2 = load_file(str(Path(tmp) / "many" / "model" / "model.safetensors"))
        diff = max(float((w1[k] - w2[k]).abs().max()) for k in w1)

    images = args.prompts * args.group
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"# {args.recipe}: P={args.prompts} G={args.group}, {args.iters} iterations (first dropped)")
    print("| arm | processes x threads | s / iteration | images / s |")
    print("| --- | --- | --- | --- |")
    mean = {}
    for name, nproc in (("one", 1), ("many", args.nproc)):
        steps = [r["step_s"] for r in rows[name][1:]] or [r["step_s"] for r in rows[name]]
        mean[name] = sum(steps) / len(steps)
        label = "1 process" if nproc == 1 else f"{nproc} processes ({args.strategy}, gloo)"
        threads = max(1, args.threads // nproc)
        print(f"| {label} | {nproc} x {threads} | {mean[name]:.2f} | {images / mean[name]:.1f} |")
    print(f"\nratio (N processes / 1 process time): {mean['many'] / mean['one']:.2f}")
    print(f"max |weight difference| between the two exported models: {diff:.2e}")


if __name__ == "__main__":
    main()
