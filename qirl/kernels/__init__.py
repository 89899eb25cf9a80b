"""Triton kernels for qirl's three hot paths, each beside its pure-torch reference (installed as qirl.kernels).

- `cfg_sde_step`: fused CFG + flow-matching SDE step + transition log-prob, and `sde_logprob` of a
  given next state with its backward (GRPO rollout and training step).
- `group_advantage`: group-normalised, category-weighted advantages in one launch.
- `velocity_mse`: distillation loss with a fused backward.

Call them through `qirl.ops`, which picks Triton or the reference once per call. This package imports
nothing at import time, so importing it never imports Triton (see `_runtime` for why that matters).
"""
