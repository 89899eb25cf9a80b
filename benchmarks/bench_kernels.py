"""Speed and memory of qirl's kernels against eager torch and torch.compile, with achieved bandwidth.

Providers: `eager` (the `*_ref` reference, what runs on CPU), `compile` (torch.compile of the same
reference) and `triton` (the kernels; CUDA only: the interpreter's timings mean nothing). Modes:
`fwd`, `bwd` (the backward alone, graph kept) and `full` (both) for the ops that have a backward.

Bytes moved are the minimum an op must read and write, computed from the shapes (module docstrings);
GB/s = bytes / median time, and `frac_copy` divides it by the bandwidth of `clone()` of a tensor of the
same size and dtype, timed in the same run, so the figure carries across GPUs. Inputs come from the
factories the tests use (`tests/kernel_cases.py`).

    # CPU (reference vs torch.compile, small sizes): a smoke test of the script, not a GPU figure
    python benchmarks/bench_kernels.py
    # on a GPU: the sizes of the issue, every provider, CSV with the GPU name and versions
    python benchmarks/bench_kernels.py --sizes gpu --csv benchmarks/results/kernels_$(hostname).csv

Timings use `triton.testing.do_bench` on CUDA (median, p20, p80) and a perf_counter loop on CPU.
"""

from __future__ import annotations

import argparse
import csv
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import kernel_cases  # noqa: E402  (the tests' input factories; switches the interpreter on without CUDA)

from qirl.kernels import cfg_sde_step as sde  # noqa: E402
from qirl.kernels import group_advantage as adv  # noqa: E402
from qirl.kernels import velocity_mse as mse  # noqa: E402

logger = logging.getLogger("bench_kernels")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Latent batches [B, C, H, W]: 16 x 16 x 128 x 128 (FLUX/SD3-like at 1024 px) and 16 x 64 x 64 x 64
# (Qwen-Image-like channels); both 4.2M elements per tensor, enough to fill an H100/H200.
LATENTS = {
    "gpu": [(16, 16, 128, 128), (16, 64, 64, 64)],
    "cpu": [(4, 16, 32, 32)],
}
REWARDS = {"gpu": [(64, 16, 4), (1024, 24, 8)], "cpu": [(64, 16, 4)]}  # [P, G, K]


@dataclass
class Row:
    op: str
    mode: str
    provider: str
    dtype: str
    shape: str
    numel: int
    bytes: int
    ms_median: float
    ms_p20: float
    ms_p80: float
    gbps: float
    copy_gbps: float
    frac_copy: float
    speedup_vs_eager: float = float("nan")
    peak_mem_mb: str = ""
    device: str = ""
    torch: str = torch.__version__
    triton: str = ""
    python: str = platform.python_version()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu:{platform.processor() or platform.machine()}"


def time_ms(fn: Callable[[], object], device: torch.device, rep_ms: int) -> tuple[float, float, float]:
    """(median, p20, p80) in milliseconds."""
    if device.type == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return med, p20, p80
    for _ in range(3):
        fn()
    samples: list[float] = []
    deadline = time.perf_counter() + rep_ms / 1000
    while len(samples) < 5 or (time.perf_counter() < deadline and len(samples) < 200):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return statistics.median(samples), q[1], q[7]


def peak_mb(fn: Callable[[], object], device: torch.device) -> str:
    """Peak extra CUDA memory of one call; not measured on CPU."""
    if device.type != "cuda":
        return ""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return f"{(torch.cuda.max_memory_allocated(device) - base) / 2**20:.1f}"


def copy_gbps(numel: int, dtype: torch.dtype, device: torch.device, rep_ms: int) -> float:
    """Bandwidth of a device-to-device copy (clone) of `numel` elements, timed in this run."""
    x = torch.empty(numel, dtype=dtype, device=device).normal_()
    ms, _, _ = time_ms(lambda: x.clone(), device, rep_ms)
    return 2 * numel * x.element_size() / ms / 1e6


# --------------------------------------------------------------------------------------------------
# Cases: a forward closure, leaves to differentiate, and the bytes each mode must move
# --------------------------------------------------------------------------------------------------


@dataclass
class Case:
    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    numel: int  # elements of the largest tensor
    forward: dict[str, Callable[[], torch.Tensor]]  # provider -> closure returning the differentiated output
    leaves: list[torch.Tensor]  # tensors that require grad (empty: forward only)
    bytes: dict[str, int]  # mode -> bytes moved


def sde_step_case(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Case:
    """Rollout step with hybrid CFG (guided): reads v_u, v_c, x_t, eps; writes x_next and B log-probs."""
    c = kernel_cases.sde_case(shape[0], shape[1:], dtype, 0, guided=True, device=device)
    n, e = c.v.numel(), c.v.element_size()
    compiled = torch.compile(sde.cfg_sde_step_ref, dynamic=False)

    def run(fn: Callable) -> Callable[[], torch.Tensor]:
        return lambda: (
            fn(c.v, c.x_t, c.eps, c.t, c.dt, c.noise_level, v_uncond=c.v_uncond, guidance=c.guidance).x_next
        )

    forward = {
        "eager": run(sde.cfg_sde_step_ref),
        "compile": run(compiled),
        "triton": run(sde.cfg_sde_step_triton),
    }
    return Case("cfg_sde_step", shape, dtype, n, forward, [], {"fwd": 5 * n * e + 4 * shape[0]})


def sde_logprob_case(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Case:
    """Training step (hybrid CFG: conditional velocity only): reads v, x_t, x_next; backward writes d v."""
    c = kernel_cases.sde_case(shape[0], shape[1:], dtype, 0, guided=False, device=device)
    x_next = sde.cfg_sde_step_ref(c.v, c.x_t, c.eps, c.t, c.dt, c.noise_level).x_next
    v = c.v.detach().requires_grad_()
    n, e = v.numel(), v.element_size()
    compiled = torch.compile(sde.sde_logprob_ref, dynamic=False)

    def run(fn: Callable) -> Callable[[], torch.Tensor]:
        return lambda: fn(v, c.x_t, x_next, c.t, c.dt, c.noise_level)

    forward = {
        "eager": run(sde.sde_logprob_ref),
        "compile": run(compiled),
        "triton": run(sde.sde_logprob_triton),
    }
    fwd, bwd = 3 * n * e + 4 * shape[0], 4 * n * e + 4 * shape[0]
    return Case("sde_logprob", shape, dtype, n, forward, [v], {"fwd": fwd, "bwd": bwd, "full": fwd + bwd})


def velocity_mse_case(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Case:
    """Distillation loss: reads student and teacher; backward reads both again and writes d student."""
    student, teacher = kernel_cases.mse_case(shape[0], shape[1:], dtype, 0, device=device)
    s = student.requires_grad_()
    n, e = s.numel(), s.element_size()
    compiled = torch.compile(mse.velocity_mse_ref, dynamic=False)
    forward = {
        "eager": lambda: mse.velocity_mse_ref(s, teacher).loss,
        "compile": lambda: compiled(s, teacher).loss,
        "triton": lambda: mse.velocity_mse_triton(s, teacher).loss,
    }
    fwd, bwd = 2 * n * e, 3 * n * e
    return Case("velocity_mse", shape, dtype, n, forward, [s], {"fwd": fwd, "bwd": bwd, "full": fwd + bwd})


def group_advantage_case(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Case:
    """Advantages: reads rewards [P, G, K] and weights [P, K]; writes [P, G] fp32. Launch-bound."""
    rewards, weights = kernel_cases.reward_case(*shape, dtype, 0, per_prompt_weights=True, device=device)
    p, g, k = shape
    compiled = torch.compile(adv.group_advantage_ref, dynamic=False)
    forward = {
        "eager": lambda: adv.group_advantage_ref(rewards, weights, clip=5.0),
        "compile": lambda: compiled(rewards, weights, clip=5.0),
        "triton": lambda: adv.group_advantage_triton(rewards, weights, clip=5.0),
    }
    nbytes = p * g * k * rewards.element_size() + p * k * 4 + p * g * 4
    return Case("group_advantage", shape, dtype, p * g * k, forward, [], {"fwd": nbytes})


BUILDERS = {
    "cfg_sde_step": (sde_step_case, "latent"),
    "sde_logprob": (sde_logprob_case, "latent"),
    "velocity_mse": (velocity_mse_case, "latent"),
    "group_advantage": (group_advantage_case, "reward"),
}


def mode_fn(case: Case, provider: str, mode: str) -> Callable[[], object]:
    """The closure to time for one mode: forward, backward alone (graph kept), or both."""
    forward = case.forward[provider]
    if mode == "fwd":
        if case.leaves:
            return lambda: _no_grad_call(forward)
        return forward
    out = forward()
    grad = torch.ones_like(out)
    if mode == "bwd":
        return lambda: torch.autograd.grad(out, case.leaves, grad, retain_graph=True)
    return lambda: torch.autograd.grad(forward(), case.leaves, grad)


def _no_grad_call(fn: Callable[[], object]) -> object:
    # forward timings without autograd bookkeeping, as in a rollout; `full` includes it
    with torch.no_grad():
        return fn()


def run(args: argparse.Namespace) -> list[Row]:
    device = torch.device(args.device)
    providers = [p for p in args.providers if p != "triton" or device.type == "cuda"]
    if "triton" in args.providers and device.type != "cuda":
        logger.warning("no CUDA device: the triton provider is skipped (interpreter timings mean nothing)")
    triton_version = ""
    if kernel_cases.HAS_TRITON:
        import triton

        triton_version = triton.__version__
    rows: list[Row] = []
    copies: dict[tuple[int, torch.dtype], float] = {}
    for op in args.ops:
        builder, kind = BUILDERS[op]
        shapes = LATENTS[args.sizes] if kind == "latent" else REWARDS[args.sizes]
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            for shape in shapes:
                case = builder(shape, dtype, device)
                key = (case.numel, dtype)
                if key not in copies:
                    copies[key] = copy_gbps(case.numel, dtype, device, args.rep_ms)
                for mode in (m for m in args.modes if m in case.bytes):
                    eager_ms = float("nan")
                    for provider in providers:
                        try:
                            fn = mode_fn(case, provider, mode)
                            med, p20, p80 = time_ms(fn, device, args.rep_ms)
                            mem = peak_mb(fn, device)
                        except (
                            Exception
                        ) as exc:  # one provider failing (no compiler, OOM) must not end the run
                            logger.warning(
                                "%s %s %s %s %s failed: %s", op, mode, provider, dtype_name, shape, exc
                            )
                            continue
                        if provider == "eager":
                            eager_ms = med
                        gbps = case.bytes[mode] / med / 1e6
                        rows.append(
                            Row(
                                op=op,
                                mode=mode,
                                provider=provider,
                                dtype=dtype_name,
                                shape="x".join(map(str, shape)),
                                numel=case.numel,
                                bytes=case.bytes[mode],
                                ms_median=med,
                                ms_p20=p20,
                                ms_p80=p80,
                                gbps=gbps,
                                copy_gbps=copies[key],
                                frac_copy=gbps / copies[key],
                                speedup_vs_eager=eager_ms / med,
                                peak_mem_mb=mem,
                                device=device_name(device),
                                triton=triton_version,
                            )
                        )
                        print(format_row(rows[-1]), flush=True)
    return rows


HEADER = (
    f"{'op':<16}{'mode':<5}{'provider':<9}{'dtype':<6}{'shape':<15}{'median ms':>10}{'p20':>9}{'p80':>9}"
    f"{'GB/s':>9}{'copy':>8}{'x eager':>8}{'peak MB':>9}"
)


def format_row(r: Row) -> str:
    return (
        f"{r.op:<16}{r.mode:<5}{r.provider:<9}{r.dtype:<6}{r.shape:<15}{r.ms_median:>10.4f}{r.ms_p20:>9.4f}"
        f"{r.ms_p80:>9.4f}{r.gbps:>9.2f}{r.frac_copy:>8.2f}{r.speedup_vs_eager:>8.2f}{r.peak_mem_mb:>9}"
    )


def write_csv(rows: list[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(Row.__dataclass_fields__)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow(asdict(r))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=default_device)
    parser.add_argument(
        "--sizes", choices=sorted(LATENTS), default="gpu" if default_device == "cuda" else "cpu"
    )
    parser.add_argument("--ops", nargs="+", choices=list(BUILDERS), default=list(BUILDERS))
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=list(DTYPES),
        default=["bf16", "fp32"] if default_device == "cuda" else ["fp32"],
    )
    parser.add_argument("--modes", nargs="+", choices=["fwd", "bwd", "full"], default=["fwd", "bwd", "full"])
    parser.add_argument(
        "--providers",
        nargs="+",
        choices=["eager", "compile", "triton"],
        default=["eager", "compile", "triton"],
    )
    parser.add_argument("--rep-ms", type=int, default=200, help="time budget per measurement")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (CPU runs only). 1 by default: on a shared machine OpenMP barriers "
        "waiting on descheduled threads quantised timings to multiples of 8 ms",
    )
    parser.add_argument("--csv", type=Path, help="write the rows here (e.g. benchmarks/results/<gpu>.csv)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    print(f"# {device_name(device)}  torch {torch.__version__}  python {platform.python_version()}")
    print(HEADER)
    rows = run(args)
    if args.csv:
        write_csv(rows, args.csv)
        print(f"# wrote {len(rows)} rows to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
