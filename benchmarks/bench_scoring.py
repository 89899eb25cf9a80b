"""Scoring throughput of one reward in-process vs through the HTTP reward server on 127.0.0.1.

The same batch (Shapes prompts and their renders, upscaled to `--size`) is scored `--iters` times by
calling the reward directly and by `RemoteReward` against `qirl.rewards.server` in a background thread
of this process, so the ratio is the cost of the wire: JSON + base64 PNG coding on both sides, HTTP
on loopback and the server's thread hand-off. Both sides share this machine's cores, so on a small CPU
box the remote figure also pays for contention; a real deployment scores on another machine.

    python benchmarks/bench_scoring.py                           # cheap stand-in: pure transport cost
    python benchmarks/bench_scoring.py --reward oracle           # the Shapes oracle (~2 ms an image)
    python benchmarks/bench_scoring.py --reward remote --kw url=\"http://gpu-box:8000\" --kw names=\"vlm\"
    python benchmarks/bench_scoring.py --size 256 --batch 32     # larger images: PNG coding dominates
    python benchmarks/bench_scoring.py --threads 1               # pin torch's intra-op threads

`--kw key=value` passes a keyword to `build_reward` (value parsed as JSON when it parses, else text).
The default `brightness` reward is defined here: the mean pixel value, i.e. almost free, so its remote
throughput is the ceiling the transport allows.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from qirl.rewards.base import RewardModel, RewardRecord, build_reward
from qirl.rewards.client import RemoteReward
from qirl.rewards.server import BackgroundServer, make_app
from qirl.shapes import Scene, random_t2i_record, render_batch


class Brightness(RewardModel):
    """Stand-in reward: mean brightness per image (costs nothing, so only the transport is timed)."""

    name = "brightness"

    def score(self, images: Tensor, prompts: Sequence[str], records: Sequence[RewardRecord]) -> Tensor:
        return images.float().mean(dim=(1, 2, 3))


def make_reward(name: str, kwargs: dict) -> RewardModel:
    if name == "brightness":
        return Brightness()
    import qirl.rewards.client  # noqa: F401  (registers "remote")

    try:
        import qirl.rewards.face  # noqa: F401  (registers "face_identity"; dlib is imported lazily)
    except ImportError:
        pass
    return build_reward(name, **kwargs)


def make_batch(batch: int, size: int, seed: int = 0) -> tuple[Tensor, list[str], list[RewardRecord]]:
    rng = np.random.default_rng(seed)
    recs = [random_t2i_record(rng) for _ in range(batch)]
    images = render_batch([Scene.from_dict(r["scene"]) for r in recs])  # [B, 3, 32, 32]
    if size != images.shape[-1]:
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear").clamp(0, 1)
    records = [RewardRecord(task="t2i", category=r["category"]) for r in recs]
    return images, [r["prompt"] for r in recs], records


def timeit(fn: Callable[[], Tensor], iters: int, warmup: int = 1) -> tuple[list[float], Tensor]:
    out = fn()
    for _ in range(warmup - 1):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def parse_kw(items: Sequence[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--reward", default="brightness", help="a registered reward, or the stand-in 'brightness'"
    )
    ap.add_argument("--kw", action="append", default=[], metavar="KEY=VALUE", help="keyword for build_reward")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=32, help="image side in pixels (Shapes renders upscaled)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--workers", type=int, default=1, help="scoring threads in the server")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        # On a loaded 2-core box, torch's OpenMP barrier alone costs ~8 ms a reduction with 2 threads
        # (44 us with 1): pin the thread count to compare like with like.
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    reward = make_reward(args.reward, parse_kw(args.kw))
    images, prompts, records = make_batch(args.batch, args.size)
    local_t, local_out = timeit(lambda: reward(images, prompts, records), args.iters)

    app = make_app({args.reward: reward}, max_batch=max(args.batch, 1), workers=args.workers)
    with BackgroundServer(app) as srv:
        client = RemoteReward(srv.url, names=args.reward, max_batch=args.batch, timeout=300, retries=0)
        remote_t, remote_out = timeit(lambda: client(images, prompts, records), args.iters)
    if client.faults:
        raise SystemExit(f"remote scoring failed: {client.faults}")

    n = args.batch
    local_ips = n / statistics.median(local_t)
    remote_ips = n / statistics.median(remote_t)
    diff = (remote_out - local_out).abs().nan_to_num(0).max().item()
    print(f"reward {args.reward!r}: batch {n} x 3x{args.size}x{args.size}, {args.iters} iters, median times")
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )
    print(f"{'path':<12}{'ms/batch':>10}{'images/s':>12}")
    print(f"{'in-process':<12}{1e3 * statistics.median(local_t):>10.2f}{local_ips:>12.1f}")
    print(f"{'http':<12}{1e3 * statistics.median(remote_t):>10.2f}{remote_ips:>12.1f}")
    print(
        f"http / in-process throughput: {remote_ips / local_ips:.3f}  "
        f"(max |remote - local| = {diff:.2e}: 8-bit quantisation on the wire)"
    )


if __name__ == "__main__":
    main()
