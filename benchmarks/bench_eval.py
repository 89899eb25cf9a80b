"""Where the time of `qirl eval` goes: sampling vs judging per image, and rating with bootstrap intervals.

    python benchmarks/bench_eval.py                        # one model, full held-out sets, 3 seeds
    python benchmarks/bench_eval.py --n-prompts 16 --seeds 1 --threads 1
    python benchmarks/bench_eval.py --votes 5000 --models 8 --bootstrap 1000   # ratings only: --n-prompts 0

Sampling and the oracle are timed separately on the same images (`generate_images`, then the judge), so
the per-image figures add up to what `qirl eval bench` spends; ratings are timed on simulated votes
(online Elo + Bradley-Terry, each with the bootstrap). Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from qirl.eval.bench import bench_records
from qirl.eval.judges import OracleJudge
from qirl.eval.models import Sampling, generate_images, job_sources
from qirl.eval.ratings import VoteArrays, compute_ratings, expected_score


def time_bench(model: str, n_prompts: int | None, seeds: int, steps: int, batch: int) -> None:
    from qirl.models.registry import load_policy

    policy, judge = load_policy(model), OracleJudge()
    for task in ("t2i", "edit"):
        records = bench_records(task, n_prompts=n_prompts)
        jobs = [(i, s) for i in range(len(records)) for s in range(seeds)]
        t0 = time.perf_counter()
        images = generate_images(policy, records, jobs, Sampling(steps=steps), batch)  # [N, 3, H, W]
        t1 = time.perf_counter()
        judge.score(images, [records[i] for i, _ in jobs], job_sources(records, jobs, images.shape[-1]))
        t2 = time.perf_counter()
        print(json.dumps({"what": f"bench {task}", "images": len(jobs), "sample_s": round(t1 - t0, 2),
                          "judge_s": round(t2 - t1, 2), "ms_per_image": round(1000 * (t2 - t0) / len(jobs), 1),
                          "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}))


def time_ratings(n_votes: int, n_models: int, n_boot: int) -> None:
    rng = np.random.default_rng(0)
    truth = rng.normal(1000, 100, n_models)
    a = rng.integers(0, n_models, n_votes)
    b = (a + rng.integers(1, n_models, n_votes)) % n_models  # never a == b
    s = (rng.random(n_votes) < expected_score(truth[a], truth[b])).astype(float)
    votes = VoteArrays(tuple(f"m{i}" for i in range(n_models)), a, b, s)
    t0 = time.perf_counter()
    compute_ratings(votes, n_boot=n_boot)
    print(json.dumps({"what": "ratings", "votes": n_votes, "models": n_models, "bootstrap": n_boot,
                      "seconds": round(time.perf_counter() - t0, 2)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="base")
    p.add_argument("--n-prompts", type=int, default=None, help="first N prompts per set (0: skip the bench)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--votes", type=int, default=2000)
    p.add_argument("--models", type=int, default=4)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.n_prompts != 0:
        time_bench(args.model, args.n_prompts, args.seeds, args.steps, args.batch_size)
    time_ratings(args.votes, args.models, args.bootstrap)


if __name__ == "__main__":
    main()
