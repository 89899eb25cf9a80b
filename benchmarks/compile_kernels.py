"""Compile every qirl kernel variant ahead of time for a CUDA architecture, without a GPU.

Why: Triton's interpreter (the CPU tests) accepts code the compiler rejects (a global that is not
constexpr, a dtype mix, an op a backend lacks), and a GPU is not always at hand. This compiles each
kernel in each constexpr variant and dtype combination the launchers use, down to a cubin with the
`ptxas` that ships in Triton's wheel, and reports from the PTX how wide the global loads and stores are
(128-bit accesses are what a memory-bound kernel needs to reach copy bandwidth).

    python benchmarks/compile_kernels.py --arch 90        # H100 / H200
    python benchmarks/compile_kernels.py --arch 80 --ptx  # A100, and print the first kernel's PTX

Pointers and the element count get Triton's 16-divisibility hint, as at run time for aligned tensors and
sample sizes divisible by 16 (every latent in the benchmarks). TRITON_INTERPRET must be unset.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Compiled:
    name: str
    variant: str
    ptx: str
    cubin_bytes: int

    def access_widths(self) -> str:
        """Count global loads/stores by vector width, e.g. 'ld v4:5 v1:2 | st v4:1'."""
        parts = []
        for op in ("ld", "st"):
            found = re.findall(rf"\b{op}\.global(?:\.[a-z]+)*?(?:\.v(\d))?\.[bfsu]\d+", self.ptx)
            counts: dict[str, int] = {}
            for width in found:
                key = f"v{width or 1}"
                counts[key] = counts.get(key, 0) + 1
            parts.append(f"{op} " + " ".join(f"{k}:{v}" for k, v in sorted(counts.items(), reverse=True)))
        return " | ".join(parts)


def compile_all(arch: int = 90) -> list[Compiled]:
    """Compile every kernel variant for `sm_<arch>`; raises on the first compile error."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: it turns @triton.jit into the interpreter")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qirl.kernels import cfg_sde_step as sde
    from qirl.kernels import group_advantage as adv
    from qirl.kernels import velocity_mse as mse

    target = GPUTarget("cuda", arch, 32)
    done: list[Compiled] = []

    def build(
        kernel: Callable, signature: dict[str, str], constexprs: dict[str, object], warps: int = 4
    ) -> None:
        sig = {**signature, **{name: "constexpr" for name in constexprs}}
        names = list(sig)
        hinted = [i for i, name in enumerate(names) if sig[name].startswith("*") or name == "N"]
        attrs = {(i,): [["tt.divisibility", 16]] for i in hinted}
        src = ASTSource(kernel, sig, constexprs=constexprs, attrs=attrs)
        out = triton.compile(src, target=target, options={"num_warps": warps, "enable_fp_fusion": True})
        variant = ",".join(
            f"{k}={v}" for k, v in constexprs.items() if k not in ("BLOCK", "BLOCK_G", "BLOCK_K")
        )
        types = sorted({t for t in signature.values() if t.startswith("*") and t != "*fp32"}) or ["*fp32"]
        done.append(
            Compiled(kernel.__name__, f"{'/'.join(types)} {variant}", out.asm["ptx"], len(out.asm["cubin"]))
        )

    scalars = {"guidance": "fp32", "noise_level": "fp32", "scale": "fp32", "N": "i32"}
    times = {"t_ptr": "*fp32", "dt_ptr": "*fp32"}
    for io, state in (("*bf16", "*bf16"), ("*fp16", "*fp32"), ("*fp32", "*fp32")):
        for guided in (False, True):
            build(
                sde._cfg_sde_step_kernel,
                {
                    "v_ptr": io,
                    "vu_ptr": io,
                    "x_ptr": state,
                    "eps_ptr": io,
                    "xn_ptr": state,
                    "vout_ptr": io,
                    "part_ptr": "*fp32",
                    **times,
                    **scalars,
                },
                {"GUIDED": guided, "WRITE_V": guided, "BLOCK": 1024},
            )
            build(
                sde._sde_logprob_fwd_kernel,
                {
                    "v_ptr": io,
                    "vu_ptr": io,
                    "x_ptr": state,
                    "xn_ptr": state,
                    "part_ptr": "*fp32",
                    **times,
                    **scalars,
                },
                {"GUIDED": guided, "BLOCK": 1024},
            )
            build(
                sde._sde_logprob_bwd_kernel,
                {
                    "g_ptr": "*fp32",
                    "v_ptr": io,
                    "vu_ptr": io,
                    "x_ptr": state,
                    "xn_ptr": state,
                    "gv_ptr": io,
                    "gvu_ptr": io,
                    "gx_ptr": state,
                    "gxn_ptr": state,
                    **times,
                    **scalars,
                },
                {
                    "GUIDED": guided,
                    "NEED_V": True,
                    "NEED_VU": guided,
                    "NEED_X": not guided,
                    "NEED_XN": not guided,
                    "BLOCK": 1024,
                },
            )
        build(
            mse._velocity_mse_fwd_kernel,
            {"s_ptr": io, "t_ptr": io, "part_ptr": "*fp32", "inv_n": "fp32", "N": "i32"},
            {"BLOCK": 1024},
        )
        build(
            mse._velocity_mse_bwd_kernel,
            {
                "g_ptr": "*fp32",
                "s_ptr": io,
                "t_ptr": io,
                "gs_ptr": io,
                "gt_ptr": io,
                "two_inv_n": "fp32",
                "N": "i32",
            },
            {"NEED_S": True, "NEED_T": False, "BLOCK": 1024},
        )
    for weighted in (False, True):
        build(
            adv._group_advantage_kernel,
            {
                "r_ptr": "*fp32",
                "w_ptr": "*fp32",
                "out_ptr": "*fp32",
                "G": "i32",
                "K": "i32",
                "stride_wp": "i32",
                "eps": "fp32",
                "clip": "fp32",
            },
            {"HAS_W": weighted, "UNBIASED": weighted, "CLIP": weighted, "BLOCK_G": 16, "BLOCK_K": 4},
            warps=1,
        )
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for H100/H200")
    parser.add_argument("--ptx", action="store_true", help="print the first kernel's PTX")
    args = parser.parse_args(argv)
    results = compile_all(args.arch)
    width = max(len(r.name) for r in results)
    for r in results:
        print(f"{r.name:<{width}}  {r.variant:<58}  cubin {r.cubin_bytes:>7} B  {r.access_widths()}")
    if args.ptx:
        print(results[0].ptx)
    print(f"compiled {len(results)} kernel variants for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
