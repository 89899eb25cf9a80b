"""Models under evaluation: `[label=]spec[@key=value...]` and the images they generate.

`spec` is anything `load_policy` takes ("base", a model folder, a run folder, a diffusers pipeline
folder); the options after `@` set its sampling (`steps`, `guidance`, `shift`), so `cfg1=base@guidance=1`
compares the base model without guidance against itself with it, and how it loads (`resolution`,
`dtype`: `qwen=/models/Qwen-Image@resolution=512@dtype=bfloat16`). The label (default: the text as given) names the model in
votes, tables and figures.

Every model draws the same initial noise for the same (prompt, seed): image `i` of a prompt set under
seed `s` starts from `image_noise(s, i, shape)`, independent of batch size, of the prompt subset and of
the other models, so a comparison is between models, not between noise draws.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from qirl.data import PromptRecord
from qirl.errors import UserError
from qirl.models.policy import FlowPolicy
from qirl.prompt_sets import image_noise, record_source
from qirl.sampling import sample_ode


@dataclass(frozen=True)
class Sampling:
    """Euler ODE sampling options (see `qirl.sampling.sample_ode`)."""

    steps: int = 20
    guidance: float = 3.0
    shift: float = 1.0


@dataclass(frozen=True)
class ModelSpec:
    label: str
    path: str
    sampling: Sampling
    resolution: int = 0  # a diffusers pipeline's image side (0: its default)
    dtype: str = "float32"


_KEYS = {"steps": int, "guidance": float, "shift": float}
_LOAD_KEYS = {"resolution": int, "dtype": str}


def parse_model_spec(text: str, default: Sampling | None = None) -> ModelSpec:
    """`[label=]spec[@key=value[@key=value]]` -> ModelSpec; a malformed option is a `UserError`."""
    text = text.strip()
    head, *opts = text.split("@")
    label, eq, path = head.partition("=")
    if not eq:
        label, path = text, head
    if not path or not label:
        raise UserError(f"model {text!r}: empty model name")
    values: dict[str, int | float] = {}
    load: dict[str, int | str] = {}
    for opt in opts:
        key, eq, value = opt.partition("=")
        known = {**_KEYS, **_LOAD_KEYS}
        if not eq or key not in known:
            raise UserError(f"model {text!r}: option {opt!r} must be one of {', '.join(k + '=...' for k in known)}")
        try:
            (load if key in _LOAD_KEYS else values)[key] = known[key](value)
        except ValueError:
            raise UserError(f"model {text!r}: {key} must be a number, got {value!r}") from None
    sampling = replace(default or Sampling(), **values)
    if sampling.steps < 1 or sampling.shift <= 0:
        raise UserError(f"model {text!r}: steps must be >= 1 and shift > 0")
    return ModelSpec(label, path, sampling, **load)  # type: ignore[arg-type]


def parse_models(texts: Sequence[str], default: Sampling | None = None) -> list[ModelSpec]:
    """Specs from `--models a,b --models c` (comma-separated and repeatable); labels must be unique."""
    specs = [parse_model_spec(t, default) for text in texts for t in text.split(",") if t.strip()]
    labels = [s.label for s in specs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise UserError(f"model label(s) given twice: {', '.join(dup)} (name them: label=spec)")
    return specs


def slug(label: str) -> str:
    """A file-name-safe form of a model label."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "model"


def load_models(specs: Sequence[ModelSpec], device: str | torch.device = "cpu") -> dict[str, FlowPolicy]:
    """label -> policy; specs sharing a path share one policy. Fails (UserError) before any work."""
    from qirl.models.registry import PolicyOptions, load_policy

    by_path: dict[tuple[str, int, str], FlowPolicy] = {}
    out = {}
    for s in specs:
        key = (s.path, s.resolution, s.dtype)
        if key not in by_path:
            options = PolicyOptions(dtype=s.dtype, resolution=s.resolution)
            by_path[key] = load_policy(s.path, device=device, options=options)
        out[s.label] = by_path[key]
    return out


@torch.no_grad()
def generate_images(
    policy: FlowPolicy,
    records: Sequence[PromptRecord],
    jobs: Sequence[tuple[int, int]],
    sampling: Sampling,
    batch_size: int = 64,
) -> torch.Tensor:
    """Images [N, 3, H, W] (float32, CPU) for jobs (prompt index into `records`, seed), in job order.

    The policy is put in eval mode for the call and given back in the mode it had (training loops call
    this between steps).
    """
    was_training = bool(getattr(policy, "training", False))
    if hasattr(policy, "eval"):
        policy.eval()
    try:
        shape = tuple(policy.latent_shape)
        size = shape[-1]
        sources = {i: record_source(records[i], size) for i in sorted({i for i, _ in jobs})}
        out = []
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            cond = policy.encode([records[i].prompt for i, _ in chunk], [sources[i] for i, _ in chunk])
            noise = torch.stack([image_noise(s, i, shape) for i, s in chunk]).to(policy.device)  # [b, C, H, W]
            latents = sample_ode(
                policy, cond, num_steps=sampling.steps, guidance=sampling.guidance, shift=sampling.shift, noise=noise
            )  # [b, C, H, W]
            out.append(policy.decode(latents).float().clamp(0, 1).cpu())  # [b, 3, H, W]
        return torch.cat(out)  # [N, 3, H, W]
    finally:
        if was_training and hasattr(policy, "train"):
            policy.train()


def job_sources(records: Sequence[PromptRecord], jobs: Sequence[tuple[int, int]], size: int) -> list[torch.Tensor | None]:
    """The edit source [3, H, W] of each job (None for T2I)."""
    cache = {i: record_source(records[i], size) for i in sorted({i for i, _ in jobs})}
    return [cache[i] for i, _ in jobs]
