"""The GPU benchmark script runs end to end on its tiny CPU config (so it cannot rot between GPU runs)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_qwen_image_grpo.py"


def test_qwen_image_grpo_benchmark_smoke_run() -> None:
    spec = importlib.util.spec_from_file_location("bench_qwen_image_grpo", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--tiny"])
    assert result["lora_rank"] == 4 and result["batch"] == 4
    assert result["step_s"] > 0 and result["images_per_s"] > 0
    assert result["model_flops_per_step"] > 0 and result["mfu"] is None  # counted FLOPs; no peak on a CPU
