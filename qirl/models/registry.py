"""Resolve a model name to a policy: `base` (shipped), a saved model folder, or a run directory.

Every command that takes `--model` goes through `load_policy`, so the same spellings work everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from qirl.checkpoint import latest_checkpoint
from qirl.errors import UserError
from qirl.models.policy import FlowPolicy

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class PolicyOptions:
    """How a trainer loads its policy (the recipe's ``policy:`` section); the tiny DiT uses only
    ``device``/``dtype``, a diffusers pipeline all of them.

    device: auto (cuda:LOCAL_RANK when CUDA is there, else cpu) | cpu | cuda | cuda:N.
    dtype: float32 | bfloat16 | float16 of the weights (log-probs and the SDE step stay fp32).
    resolution: image side in pixels (0: the model's default; the tiny DiT is fixed at its own).
    gradient_checkpointing: recompute transformer blocks in backward (diffusers models).
    max_sequence_length: text tokens kept per prompt (0: the pipeline's default).
    embedded_guidance: the guidance value a guidance-distilled transformer (FLUX.1-dev) takes as input
        (0: the saved value, else the pipeline's default 3.5); such models sample with ``guidance: 1``.
    """

    device: str = "auto"
    dtype: str = "float32"
    resolution: int = 0
    gradient_checkpointing: bool = False
    max_sequence_length: int = 0
    embedded_guidance: float = 0.0

    def torch_dtype(self) -> torch.dtype:
        if self.dtype not in DTYPES:
            raise UserError(f"policy.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        return DTYPES[self.dtype]

    def torch_device(self) -> torch.device:
        """The device to load on; ``auto`` under torchrun is this process's GPU."""
        import os

        if self.device == "auto":
            if torch.cuda.is_available():
                return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            return torch.device("cpu")
        try:
            return torch.device(self.device)
        except RuntimeError:
            raise UserError(f"policy.device: unknown device {self.device!r}") from None


def base_model_path() -> Path:
    """The shipped pretrained tiny DiT (see its MODEL_CARD.md)."""
    return Path(str(resources.files("qirl") / "assets" / "base"))


def is_model_folder(path: Path) -> bool:
    """A tiny-DiT folder (config.json), a diffusers pipeline (model_index.json) or a saved diffusers policy
    (qirl_policy.json)."""
    from qirl.models.diffusers_policy import is_diffusers_folder

    return (path / "config.json").is_file() or is_diffusers_folder(path)


def resolve_model_path(spec: str) -> Path:
    """`base`, a model folder (`is_model_folder`), or a run folder holding one as `model/`."""
    path = base_model_path() if spec == "base" else Path(spec)
    if not path.exists():
        raise UserError(f"model {spec!r}: no such folder (use 'base', a model folder or a run folder)")
    if is_model_folder(path):
        return path
    if is_model_folder(path / "model"):
        return path / "model"
    raise UserError(
        f"{path}: not a model folder (no config.json, model_index.json or qirl_policy.json) "
        "nor a finished run (no model/ holding one)"
    )


def _from_run_checkpoint(run: Path) -> FlowPolicy:
    """The weights of a run's newest checkpoint, or of the checkpoint folder ``run`` itself: a pretraining
    run's EMA, or a full-weight GRPO / distillation run's trained weights (their EMA when the run keeps
    one, as its export does) over the model the run started from."""
    import yaml
    from tokenizers import Tokenizer

    from qirl.checkpoint import load_checkpoint
    from qirl.models.tiny_dit import TinyDiT, TinyDiTConfig

    ckpt = load_checkpoint(run if (run / "state.json").is_file() else latest_checkpoint(run))
    recipe = yaml.safe_load(ckpt.state.get("recipe", "")) or {}
    start = recipe.get("model") if isinstance(recipe.get("model"), str) else recipe.get("student")
    if "tokenizer" not in ckpt.state and isinstance(start, str):
        return _from_rl_checkpoint(ckpt, recipe, start)
    if "tokenizer" not in ckpt.state or "ema" not in ckpt.tensors:
        raise UserError(f"{ckpt.path}: not a pretraining or RL checkpoint (no tokenizer, EMA or starting model)")
    config = TinyDiTConfig.from_dict(recipe["model"], str(ckpt.path))
    model = TinyDiT(config, Tokenizer.from_str(ckpt.state["tokenizer"]))
    model.load_state_dict(ckpt.tensors["ema"])
    return model


def _from_rl_checkpoint(ckpt: Any, recipe: dict[str, Any], start: str) -> FlowPolicy:
    """A GRPO or distillation checkpoint: the starting policy with the checkpoint's trained weights."""
    if ckpt.state.get("format") == "sharded":
        raise UserError(f"{ckpt.path}: a sharded (FSDP) checkpoint; resume the run to export its model instead")
    if int((recipe.get("train") or {}).get("lora_rank", 0) or 0) > 0:
        raise UserError(f"{ckpt.path}: a LoRA run's checkpoint; resume the run to export its merged model instead")
    weights = ckpt.tensors.get("ema") or ckpt.tensors.get("model")
    if not weights:
        raise UserError(f"{ckpt.path}: checkpoint holds no model weights")
    policy = load_policy(start)
    own = policy.state_dict()
    if unknown := sorted(set(weights) - set(own)):
        raise UserError(f"{ckpt.path}: weights {unknown[:3]} are not in its starting model {start!r}")
    with torch.no_grad():
        for name, value in weights.items():
            own[name].copy_(value)
    return policy


def load_policy(
    spec: str,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    options: PolicyOptions | None = None,
) -> FlowPolicy:
    """Load a policy for inference or training.

    `spec`: `base`, a model folder, a finished run folder (its `model/`), a run still in progress (its
    newest checkpoint: a pretraining run's EMA, a full-weight GRPO or distillation run's trained weights)
    or one checkpoint folder (`<run>/checkpoints/step_00000030`). A diffusers pipeline folder (model_index.json) or a saved
    `DiffusersPolicy` (qirl_policy.json) loads a `qirl.models.diffusers_policy.DiffusersPolicy` with the
    options' resolution, max_sequence_length, embedded_guidance and gradient_checkpointing.
    ``options`` (a recipe's ``policy:`` section) sets the device and dtype unless ``device``/``dtype`` are
    given; without either the policy is fp32 on the CPU.
    """
    from qirl.models.diffusers_policy import DiffusersPolicy, is_diffusers_folder
    from qirl.models.tiny_dit import TinyDiT

    if options is not None:
        device = device if device is not None else options.torch_device()
        dtype = dtype if dtype is not None else options.torch_dtype()
    device = device if device is not None else "cpu"
    path = Path(spec)
    checkpoint = (path / "state.json").is_file() and path.parent.name == "checkpoints"
    if checkpoint or (spec != "base" and not is_model_folder(path / "model") and latest_checkpoint(path) is not None):
        policy = _from_run_checkpoint(path)
    else:
        folder = resolve_model_path(spec)
        if is_diffusers_folder(folder):
            return DiffusersPolicy.from_pretrained(folder, device=device, dtype=dtype or torch.float32, options=options)
        policy = TinyDiT.from_pretrained(folder, dtype=dtype, device=device)
    policy.to(device=device, dtype=dtype or torch.float32)
    policy.eval()
    return policy
