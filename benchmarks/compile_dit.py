"""Does `torch.compile` of the DiT, or another thread count, make the embedded default's GRPO faster on CPU?

Times the two model calls a GRPO iteration of `recipes/t2i.yaml` is made of, on the shipped base model:

- rollout:  a no-grad CFG forward of one micro-batch ([cond ; uncond], 2 x 16 rows), as `sample_sde` runs it
- train:    a forward + backward of one micro-batch (16 rows, CFG-free), as the surrogate loss runs it

for each setting (eager or `torch.compile` with inductor, times intra-op thread counts), alternating the
settings round by round so whatever else the machine does slows all alike, and prints the mean time of each
and its ratio to eager at the default thread count. Compilation happens before timing (its one-off cost is
printed apart).

    python benchmarks/compile_dit.py                       # threads 1 and 2, 5 rounds of 5 calls
    python benchmarks/compile_dit.py --threads 1 2 --rounds 3 --out benchmarks/results/compile_dit_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from qirl.models.policy import Condition
from qirl.models.registry import load_policy


def make_calls(policy, compiled: bool):  # noqa: ANN001, ANN201
    """(rollout(), train()) closures over fixed inputs; the compiled variant compiles the DiT module."""
    model = torch.compile(policy) if compiled else policy
    prompts = [f"a red circle and a blue square {i}" for i in range(16)]
    with torch.no_grad():
        cond = policy.encode(prompts)
        both = Condition.cat([cond, policy.null_condition(cond)])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, *policy.latent_shape, generator=gen)  # [16, C, H, W]
    t = torch.full((16,), 0.7)

    def rollout() -> None:
        with torch.no_grad():
            model(torch.cat([x, x]), torch.cat([t, t]), both)  # [32, C, H, W]

    def train() -> None:
        v = model(x, t, cond)  # [16, C, H, W]
        v.square().mean().backward()
        policy.zero_grad(set_to_none=True)

    return rollout, train


def timed(fn, calls: int) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="base")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=5, help="calls per timing")
    ap.add_argument("--out", type=Path, default=None, help="also write the table as JSON here")
    args = ap.parse_args()
    default_threads = torch.get_num_threads()
    policy = load_policy(args.model)
    policy.eval()
    settings = {}
    compile_s = {}
    for compiled in (False, True):
        torch.set_num_threads(default_threads)
        t0 = time.perf_counter()
        rollout, train = make_calls(policy, compiled)
        rollout()
        train()  # compiles the forward and the backward graph
        compile_s["compiled" if compiled else "eager"] = round(time.perf_counter() - t0, 1)
        for threads in args.threads:
            settings[f"{'compiled' if compiled else 'eager'}/threads={threads}"] = (rollout, train, threads)
    times: dict[str, dict[str, list[float]]] = {k: {"rollout": [], "train": []} for k in settings}
    for _ in range(args.rounds):
        for name, (rollout, train, threads) in settings.items():
            torch.set_num_threads(threads)
            rollout()  # warm the thread pool at this size
            times[name]["rollout"].append(timed(rollout, args.calls))
            times[name]["train"].append(timed(train, args.calls))
    torch.set_num_threads(default_threads)
    ref_name = f"eager/threads={default_threads}" if f"eager/threads={default_threads}" in times else next(iter(times))
    ref = {k: statistics.mean(v) for k, v in times[ref_name].items()}
    table = {
        "model": args.model,
        "machine": platform.processor() or platform.machine(),
        "cores": torch.get_num_threads(),
        "torch": torch.__version__,
        "reference": ref_name,
        "first_call_s": compile_s,
        "settings": {
            name: {
                f"{k}_ms": round(1000 * statistics.mean(v), 2) for k, v in per.items()
            } | {f"{k}_ratio": round(statistics.mean(v) / ref[k], 3) for k, v in per.items()}
            for name, per in times.items()
        },
    }
    text = json.dumps(table, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
