"""LoRA for RL post-training, through peft (Hu et al. 2022, "LoRA: Low-Rank Adaptation", arXiv:2106.09685).

``W' = W + (alpha / r) B A`` on the chosen linear layers, with A [r, in] random and B [out, r] zero, so
the adapted policy starts equal to the base (the first GRPO ratio stays 1). Only A and B train; the
exported model has the product merged into W and is an ordinary model directory again.

peft's ``inject_adapter_in_model`` works on any ``nn.Module``, so the same call adapts the tiny DiT
here and a diffusers transformer later (issue #8); ``target_modules`` is a regex over module names.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from qirl.errors import UserError

# The DiT blocks' attention and MLP projections (not the frozen text encoder, whose modules share names).
TINY_DIT_TARGETS = r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"


def add_lora(policy: torch.nn.Module, rank: int, alpha: float, targets: str = TINY_DIT_TARGETS) -> list[torch.nn.Parameter]:
    """Inject LoRA adapters in place; freeze everything else; return the adapter parameters."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise UserError("train.lora_rank > 0 needs peft: pip install 'qirl[lora]'") from None
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, init_lora_weights=True)
    try:
        inject_adapter_in_model(config, policy)
    except ValueError as err:  # no module matched
        raise UserError(f"train.lora_targets={targets!r}: {str(err).splitlines()[0]}") from None
    params = []
    for name, p in policy.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_" in name:
            params.append(p)
    return params


@contextmanager
def adapters_disabled(policy: torch.nn.Module) -> Iterator[None]:
    """Run ``policy`` as its base model: every LoRA layer's adapters off, then back on.

    A LoRA run's frozen base weights are exactly the reference policy of the KL term, so no copy of the
    model is needed (TRL's PPO and DPO trainers take their reference the same way). peft's
    ``enable_adapters`` also toggles the adapters' ``requires_grad``: call this outside a forward whose
    backward is still to come.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in policy.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def merged_copy(policy: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``policy`` with every LoRA layer merged into its base linear and replaced by it."""
    from peft.tuners.lora import LoraLayer

    clean = copy.deepcopy(policy)
    for name, module in list(clean.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = clean.get_submodule(parent_name) if parent_name else clean
            setattr(parent, child, module.get_base_layer())
    return clean


def save_policy(policy: Any, directory: str | Path, lora: bool) -> None:
    """``save_pretrained`` of the policy (merged first when it carries LoRA adapters).

    The merge works on a copy of the trained weights (the frozen text encoders and VAE of a diffusers
    policy are shared, not copied). A GPU policy is moved to host memory for it and back, so exporting a
    20B transformer never holds two copies on the GPU."""
    if not lora:
        policy.save_pretrained(directory)
        return
    device = next(policy.parameters()).device
    if device.type != "cpu":
        policy.to("cpu")
    try:
        merged_copy(policy).save_pretrained(directory)
    finally:
        if device.type != "cpu":
            policy.to(device)
