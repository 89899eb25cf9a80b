"""Time one GRPO step of a full-size Qwen-Image transformer (random weights) and its model FLOPs utilisation.

The issue's GPU target: on one H100/H200, a GRPO step of the Qwen-Image architecture at full size —
rollout with hybrid CFG (10 steps at 512 px, CFG in the rollout only), 2 trained SDE steps, LoRA — its
time and MFU (anchor: verl-omni reports 0.51 images/GPU/s for full fine-tuning without CFG on 4xH200;
aim: >= 40% MFU). This builds the step from qirl's own pieces, so it times what `qirl grpo` runs:

- the policy is `DiffusersPolicy` over a `QwenImagePipeline` whose transformer is
  `QwenImageTransformer2DModel()` at its default (Qwen-Image, 20B) config, bf16, random weights, and whose
  VAE is `AutoencoderKLQwenImage()` at its default config;
- the text encoder (Qwen2.5-VL-7B) is not built: prompt embeddings are random [B, L, 3584] tensors (its
  forward is one pass per prompt per iteration, < 1% of the step), so no checkpoint is needed;
- rollout: `qirl.sampling.sample_sde` (hybrid CFG, SDE on the window), then VAE decode;
- training: `trajectory_logprob` on each window step with grad (LoRA adapters through peft, gradient
  checkpointing on), the clipped GRPO loss with random advantages, AdamW.

Model FLOPs are counted, not assumed: `torch.utils.flop_counter.FlopCounterMode` over one conditional
forward of a micro-batch gives F (matmuls and SDPA). A step's model FLOPs are
``rollout: N (2 if CFG) F_row B + train: W (F + F_bwd) B`` with the backward of a LoRA model counted as
one forward (input gradients; frozen weights need no weight gradients, adapters are negligible) and of
full fine-tuning as two; gradient-checkpointing recomputation is not model FLOPs (PaLM's MFU
definition, Chowdhery et al. 2022, App. B). MFU = model FLOPs / step time / peak, with the dense bf16
peak of the card (H100/H200 SXM: 989 TFLOP/s) or ``--peak-tflops``.

    python benchmarks/bench_qwen_image_grpo.py                       # on a GPU: full size, 512 px
    python benchmarks/bench_qwen_image_grpo.py --batch 16 --micro-batch 8 --lora-rank 64
    python benchmarks/bench_qwen_image_grpo.py --tiny                # CPU smoke run of the same code

Output: a table (phase times, images/s, TFLOP/s, MFU) and one JSON line with every figure, the card,
torch / diffusers versions and the date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from collections.abc import Callable
from typing import Any

import torch

from qirl.models.diffusers_policy import DiffusersPolicy
from qirl.models.policy import Condition
from qirl.rl.lora import add_lora
from qirl.sampling import sample_sde, trajectory_logprob

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0}
TEXT_DIM = 3584  # Qwen2.5-VL-7B hidden size, Qwen-Image's joint_attention_dim


def peak_tflops(args: argparse.Namespace) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def build_policy(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> DiffusersPolicy:
    """A QwenImagePipeline of random-weight modules (no text encoder) wrapped as a qirl policy."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    transformer_kw: dict[str, Any] = {}
    vae_kw: dict[str, Any] = {}
    if args.tiny:  # the same architecture, a few layers wide enough to run on a CPU
        transformer_kw = dict(num_layers=2, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=64,
                              axes_dims_rope=(8, 12, 12))
        vae_kw = dict(base_dim=16, dim_mult=[1, 2, 2, 2])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in bf16 directly: 20B params in fp32 would not fit
    try:
        with torch.device(device):
            torch.manual_seed(0)
            transformer = QwenImageTransformer2DModel(**transformer_kw)
            vae = AutoencoderKLQwenImage(**vae_kw)
    finally:
        torch.set_default_dtype(previous)
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None, transformer=transformer
    )
    policy = DiffusersPolicy(pipe, "qwen-image", ".", resolution=args.resolution, gradient_checkpointing=not args.tiny)
    policy.to(device=device, dtype=dtype)
    return policy


def text_condition(b: int, length: int, dim: int, device: torch.device, dtype: torch.dtype) -> Condition:
    """Random prompt embeddings [b, length, dim] standing in for the frozen VLM's output."""
    text = torch.randn(b, length, dim, device=device, dtype=dtype)  # [B, L, D]
    return Condition(text=text, is_edit=torch.zeros(b, dtype=torch.bool, device=device))


def timed(fn: Callable[[], Any], sync: bool) -> tuple[Any, float]:
    if sync:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if sync:
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny config on the CPU (smoke run)")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10, help="rollout steps N")
    ap.add_argument("--window", type=int, default=2, help="trained SDE steps W")
    ap.add_argument("--batch", type=int, default=8, help="rollout rows B per GPU (prompts x group)")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--text-len", type=int, default=128)
    ap.add_argument("--lora-rank", type=int, default=64, help="0: full-parameter training")
    ap.add_argument("--iters", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="the card's dense bf16 peak (default: by name)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.resolution, args.steps, args.batch, args.micro_batch, args.text_len = 64, 3, 4, 2, 8
        args.iters, args.lora_rank = min(args.iters, 1), min(args.lora_rank, 4) or 0

    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    t_build = time.perf_counter()
    policy = build_policy(args, device, dtype)
    n_params = sum(p.numel() for p in policy.transformer.parameters())
    if args.lora_rank > 0:
        params = add_lora(policy, args.lora_rank, float(args.lora_rank), policy.default_lora_targets)
    else:
        params = list(policy.transformer.parameters())
        policy.transformer.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-5)
    build_s = time.perf_counter() - t_build
    text_dim = policy.transformer.config.joint_attention_dim
    B, M, W = args.batch, args.micro_batch, args.window
    window = list(range(W))
    chunks = [(a, min(a + M, B)) for a in range(0, B, M)]

    # Model FLOPs of one conditional forward of a micro-batch (counted by torch).
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(M, *policy.latent_shape, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        policy.velocity(x, torch.full((M,), 0.5, device=device), text_condition(M, args.text_len, text_dim, device, dtype))
    f_row = counter.get_total_flops() / M
    cfg = args.guidance > 1.0
    bwd = 1.0 if args.lora_rank > 0 else 2.0
    flops_step = B * f_row * (args.steps * (2 if cfg else 1) + W * (1.0 + bwd))

    def step() -> dict[str, float]:
        times = {"rollout": 0.0, "decode": 0.0, "train": 0.0}
        rollouts = []
        for a, b in chunks:
            cond = text_condition(b - a, args.text_len, text_dim, device, dtype)
            uncond = text_condition(b - a, 8, text_dim, device, dtype)
            ro, s = timed(lambda cond=cond, uncond=uncond, n=b - a: sample_sde(
                policy, cond, args.steps, guidance=args.guidance, shift=1.71, cfg_mode="hybrid",
                sde_window=window, uncond=uncond, generator=None, noise=torch.randn(n, *policy.latent_shape),
            ), cuda)
            times["rollout"] += s
            _, s = timed(lambda ro=ro: policy.decode(ro.latents), cuda)
            times["decode"] += s
            rollouts.append((cond, ro))

        def train() -> None:
            opt.zero_grad(set_to_none=True)
            for cond, ro in rollouts:
                adv = torch.randn(cond.batch_size, device=device)  # [b]
                for n in window:
                    logp = trajectory_logprob(policy, ro, n, cond)  # [b]
                    ratio = torch.exp(logp - ro.logps_old[n])
                    clipped = ratio.clamp(1 - 1e-3, 1 + 1e-3)
                    loss = -torch.minimum(ratio * adv, clipped * adv).mean() / (len(rollouts) * W)
                    loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()

        _, times["train"] = timed(train, cuda)
        times["step"] = sum(times.values())
        return times

    step()  # warm-up (allocator, kernels)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    runs = [step() for _ in range(args.iters)]
    mean = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
    peak = peak_tflops(args)
    achieved = flops_step / mean["step"] / 1e12
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu (tiny smoke run)",
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "transformer_params": n_params,
        "lora_rank": args.lora_rank,
        "resolution": args.resolution,
        "batch": B,
        "micro_batch": M,
        "steps": args.steps,
        "window": W,
        "guidance": args.guidance,
        "build_s": round(build_s, 1),
        **{f"{k}_s": round(v, 3) for k, v in mean.items()},
        "images_per_s": round(B / mean["step"], 3),
        "model_flops_per_step": int(flops_step),
        "achieved_tflops": round(achieved, 2),
        "mfu": round(achieved / peak, 4) if peak else None,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None,
    }
    print(f"# {result['device']}, {n_params / 1e9:.2f}B transformer params, LoRA rank {args.lora_rank}, {args.resolution} px")
    print("| phase | s / step | share |")
    print("| --- | --- | --- |")
    for k in ("rollout", "decode", "train"):
        print(f"| {k} | {mean[k]:.3f} | {mean[k] / mean['step']:.1%} |")
    mfu = f"{result['mfu']:.1%}" if result["mfu"] is not None else "n/a (no peak known)"
    print(f"\nstep {mean['step']:.3f} s, {flops_step / 1e12:.2f} TFLOP, {result['images_per_s']} images/s, {achieved:.1f} TFLOP/s, MFU {mfu}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
