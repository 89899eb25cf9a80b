"""GRPO ablations on the Shapes world: run the arms, then print the validation-oracle table.

Every arm is `qirl grpo <recipe> <overrides>` with the same budget (iterations, P x G, eval set), into
<out>/<arm> (default runs/ablations). The table reads each arm's metrics.jsonl: the oracle overall and
pillars on the recipe's eval set (`val-t2i`) at the last evaluation, and their change from step 0 (the
starting model, same prompts and noise), plus the mean training reward of the last 5 iterations (its
own reward's scale).

    python benchmarks/grpo_ablations.py --run                  # all arms, 2 at a time, one thread each
    python benchmarks/grpo_ablations.py --run --arms cfg_both,cfg_none
    python benchmarks/grpo_ablations.py                        # only print the table of finished arms
    python benchmarks/grpo_ablations.py --extra ref=runs/grpo_t2i   # add a finished run as an arm
    python benchmarks/grpo_ablations.py --run --model /tmp/old/qirl/assets/base --out runs/abl_prev
                                                               # every arm from another starting model
    python benchmarks/grpo_ablations.py --arms default,cfg_both --bench 2
                                                               # + all of val-t2i, 2 seeds, 95% CIs

A finished run of the default recipe with the same eval settings can stand in for the `default` arm
(its evaluation at step `--iterations` is read).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ITERATIONS = 40
ARMS: dict[str, tuple[str, list[str]]] = {
    "default": ("recipes/t2i.yaml", []),
    "cfg_both": ("recipes/t2i.yaml", ["sampling.cfg_mode=both"]),
    "cfg_both_detached": ("recipes/t2i.yaml", ["sampling.cfg_mode=both", "sampling.detach_uncond=true"]),
    # the detached objective's gradient is s * grad v_c (s = 3): the same step at lr / s
    "cfg_both_detached_lr": ("recipes/t2i.yaml", ["sampling.cfg_mode=both", "sampling.detach_uncond=true",
                                                  "train.lr=1e-5"]),
    "cfg_none": ("recipes/t2i.yaml", ["sampling.cfg_mode=none"]),
    "curated": ("recipes/t2i.yaml", ["data.prompts=recipes/data/t2i_curated.jsonl"]),
    "3r_calibrated": ("recipes/ablations/t2i_3r_calibrated.yaml", []),
    "3r_uniform": ("recipes/ablations/t2i_3r_uniform.yaml", []),
    "rm_pointwise": ("recipes/t2i_rm.yaml", []),
    "rm_pairwise": ("recipes/t2i_rm.yaml", ["rewards.models=[{name: vlm_pairwise, args: {path: builtin}}]"]),
}
PILLARS = ["Quality", "Aesthetics", "Alignment", "Real-world Fidelity", "Creative Generation"]


def command(arm: str, iterations: int, out: Path, model: str | None) -> list[str]:
    recipe, overrides = ARMS[arm]
    chosen = [f"model={model}"] if model else []
    return [
        sys.executable, "-m", "qirl.cli.main", "--threads", "1", "grpo", recipe, *overrides, *chosen,
        f"train.iterations={iterations}", "eval.every=20",
        f"run.out_dir={out / arm}", "--quiet", "--json",
    ]  # fmt: skip


def run_arm(arm: str, iterations: int, out: Path, model: str | None) -> tuple[str, int, float]:
    t0 = time.perf_counter()
    log = out / f"{arm}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        rc = subprocess.call(command(arm, iterations, out, model), stdout=fh, stderr=subprocess.STDOUT)
    return arm, rc, time.perf_counter() - t0


def row_for(name: str, run: Path, step: int) -> str | None:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    evals = {r["step"]: r for r in rows if "eval/t2i/overall" in r}
    if 0 not in evals:
        return None
    last = max((s for s in evals if s <= step), default=None)
    if last is None or last == 0:
        return None
    first, end = evals[0], evals[last]
    rewards = [r["reward"] for r in rows if "reward" in r and last - 5 < r["step"] <= last]
    cells = [f"{end['eval/t2i/overall']:.1f} ({end['eval/t2i/overall'] - first['eval/t2i/overall']:+.1f})"]
    steady = [end[f"eval/t2i/{p}"] - first[f"eval/t2i/{p}"] for p in PILLARS[:4] if f"eval/t2i/{p}" in end]
    cells.append(f"{sum(steady) / len(steady):+.1f}" if steady else "n/a")
    for p in PILLARS:
        key = f"eval/t2i/{p}"
        cells.append(f"{end[key] - first[key]:+.1f}" if key in end and key in first else "n/a")
    reward = f"{sum(rewards) / len(rewards):.3f}" if rewards else "n/a"
    return f"| {name} | {last} | {' | '.join(cells)} | {reward} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="store_true", help="run the arms (skips arms whose run dir exists)")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--iterations", type=int, default=ITERATIONS)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--extra", action="append", default=[], help="name=run_dir of a finished run to add")
    ap.add_argument("--model", default=None, help="the policy every arm starts from (default: the recipe's)")
    ap.add_argument("--out", type=Path, default=Path("runs/ablations"), help="folder of the arms' runs")
    ap.add_argument("--bench", type=int, default=0, metavar="SEEDS",
                    help="also judge the starting model and every finished arm's exported model on all of "
                         "val-t2i with `qirl eval bench` (SEEDS images per prompt, 95%% intervals)")
    args = ap.parse_args()
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        sys.exit(f"unknown arms {unknown}; known: {', '.join(ARMS)}")
    if args.run:
        todo = [a for a in arms if not (args.out / a / "metrics.jsonl").exists()]
        with ThreadPoolExecutor(args.parallel) as pool:
            for arm, rc, seconds in pool.map(lambda a: run_arm(a, args.iterations, args.out, args.model), todo):
                shown = " ".join(["qirl", *command(arm, args.iterations, args.out, args.model)[3:]])
                print(f"{arm}: exit {rc} in {seconds:.0f} s  ({shown})", flush=True)
    header = "| arm | iteration | val overall (change) | overall without Creative, change | "
    header += " | ".join(f"{p} change" for p in PILLARS) + " | train reward |"
    print(header)
    print("|" + " --- |" * (len(PILLARS) + 5))
    for arm in arms:
        line = row_for(arm, args.out / arm, args.iterations)
        if line:
            print(line)
    for item in args.extra:
        name, _, run = item.partition("=")
        line = row_for(name, Path(run), args.iterations)
        if line:
            print(line)
    if args.bench:
        finished = {a: args.out / a / "model" for a in arms if (args.out / a / "model").is_dir()}
        finished |= {n: Path(r) / "model" for n, _, r in (e.partition("=") for e in args.extra)}
        bench_table(args.model or "base", finished, args.bench, args.out / "bench")


def bench_table(start: str, models: dict[str, Path], seeds: int, out: Path) -> None:
    """`qirl eval bench` of the starting model and each arm's export on val-t2i (sampled with the CLI's
    20-step ODE, CFG 3), printed as overall [95% CI] and each pillar's change from the start."""
    cmd = [sys.executable, "-m", "qirl.cli.main", "eval", "bench", "--task", "t2i", "--prompts", "val-t2i",
           "--seeds", str(seeds), "--model", f"start={start}", "--out", str(out), "--quiet", "--json"]
    for name, path in models.items():
        cmd += ["--model", f"{name}={path}"]
    print("\n$ qirl " + " ".join(cmd[3:]), flush=True)
    results = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)["results"]
    first = results["start"]["t2i"]
    print("| model | val-t2i overall [95% CI] | change | " + " | ".join(f"{p} change" for p in PILLARS) + " |")
    print("|" + " --- |" * (len(PILLARS) + 3))
    for name, r in results.items():
        t = r["t2i"]
        lo, hi = t["overall_ci"]
        change = [f"{t['pillars'][p] - first['pillars'][p]:+.1f}" for p in PILLARS]
        print(f"| {name} | {t['overall']:.1f} [{lo:.1f}, {hi:.1f}] | {t['overall'] - first['overall']:+.1f} | "
              + " | ".join(change) + " |")


if __name__ == "__main__":
    main()
