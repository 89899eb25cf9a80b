"""Resolve a model name to a policy: `base` (shipped), a saved model folder, or a run directory.

Every command that takes `--model` goes through `load_policy`, so the same spellings work everywhere.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from qirl.errors import UserError
from qirl.models.policy import FlowPolicy


def base_model_path() -> Path:
    """The shipped pretrained tiny DiT (see its MODEL_CARD.md)."""
    return Path(str(resources.files("qirl") / "assets" / "base"))


def resolve_model_path(spec: str) -> Path:
    """`base`, a folder with config.json + model.safetensors, or a run folder holding `model/`."""
    path = base_model_path() if spec == "base" else Path(spec)
    if not path.exists():
        raise UserError(f"model {spec!r}: no such folder (use 'base', a model folder or a run folder)")
    if (path / "config.json").is_file():
        return path
    if (path / "model" / "config.json").is_file():
        return path / "model"
    raise UserError(f"{path}: not a model folder (no config.json) nor a finished run (no model/config.json)")


def load_policy(
    spec: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> FlowPolicy:
    """Load a policy for inference or training; the tiny DiT is the only embedded architecture."""
    from qirl.models.tiny_dit import TinyDiT

    policy = TinyDiT.from_pretrained(resolve_model_path(spec), dtype=dtype, device=device)
    policy.eval()
    return policy
