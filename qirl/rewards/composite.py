"""Composite task rewards: K named reward models with default and per-category weights.

The report combines its reward models per prompt group (Qwen-Image-2.0-RL, Method):

    A(x_0^i, c) = sum_k w_k (R_k(x_0^i, c) - mu_k) / sigma_k

with per-group statistics (computed by `qirl.ops.group_advantage`), and calibrates the weights w_k per
prompt category. This module holds the K rewards and their weights; it returns the raw reward matrix
`[B, K]` and the weight matrix `[B, K]` and leaves normalisation to the advantage. For reporting (and
curation by composite range) `combined` gives the weighted mean of the valid rewards of each row.

Declared in recipes as:

    rewards:
      models:
        - {name: oracle_alignment, weight: 1.0}
        - {name: vlm_pointwise, weight: 0.5, args: {path: runs/rm_pointwise/model}}
      category_weights:            # optional: per-category overrides of the weights above
        spatial: {oracle_alignment: 2.0}
      monitors:                    # optional: scored and logged beside the rewards, never trained on
        - {name: vlm_pairwise, args: {path: builtin}}

A monitor is the RLHF guard against leaving the reward model's data: an independent judge (another
paradigm, seed or annotation round) logged each iteration beside the training reward (`qirl.rl.grpo`:
its mean `monitor/<name>` and its within-group agreement `monitor_agreement/<name>`). Reward models
agree where both saw data like the policy's images and drift apart where the policy exploits one of
them (the ensemble-disagreement signal of Coste et al. 2024, "Reward Model Ensembles Help Mitigate
Overoptimization", arXiv:2310.02743). Measured on Shapes (docs/grpo.md): in a hacked run the monitor's
mean fell while the trained reward rose; its within-group agreement was near 0 in every run, so the
mean is the signal to watch at that scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from qirl.errors import UserError
from qirl.rewards.base import RewardModel, RewardRecord, build_reward


@dataclass
class RewardSpec:
    name: str = "oracle"
    weight: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)


def parse_reward_spec(text: str, flag: str = "--reward") -> RewardSpec:
    """`name` or `name:key=value,key=value` (e.g. `vlm_pointwise:path=builtin,dimension=fidelity`) as the
    command line names a reward; values are read as YAML scalars. ``flag`` names the option in errors."""
    import yaml

    name, _, rest = text.partition(":")
    args = {}
    for pair in filter(None, rest.split(",")):
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise UserError(f"{flag} {text!r}: arguments must be key=value, got {pair!r}")
        args[key] = yaml.safe_load(value)
    return RewardSpec(name=name, args=args)


@dataclass
class CompositeConfig:
    models: list[RewardSpec] = field(default_factory=lambda: [RewardSpec()])
    category_weights: dict[str, dict[str, float]] = field(default_factory=dict)
    monitors: list[RewardSpec] = field(default_factory=list)


class CompositeReward:
    """K reward models scored together, with weights per prompt category."""

    def __init__(
        self,
        rewards: Sequence[RewardModel],
        weights: Sequence[float],
        category_weights: dict[str, dict[str, float]] | None = None,
    ) -> None:
        self.rewards = list(rewards)
        self.names = [r.name for r in self.rewards]
        if len(set(self.names)) != len(self.names):
            raise UserError(f"reward names must be unique, got {self.names}")
        self.default_weights = torch.tensor([float(w) for w in weights], dtype=torch.float32)  # [K]
        self.category_weights = {}
        for category, table in (category_weights or {}).items():
            unknown = sorted(set(table) - set(self.names))
            if unknown:
                raise UserError(f"category_weights.{category}: unknown reward(s) {', '.join(unknown)}")
            row = self.default_weights.clone()
            for name, w in table.items():
                row[self.names.index(name)] = float(w)
            self.category_weights[category] = row

    @classmethod
    def from_config(cls, config: CompositeConfig) -> CompositeReward:
        if not config.models:
            raise UserError("rewards.models: at least one reward model is needed")
        rewards = [build_reward(spec.name, **spec.args) for spec in config.models]
        return cls(rewards, [spec.weight for spec in config.models], config.category_weights)

    def __len__(self) -> int:
        return len(self.rewards)

    def score_all(self, images: Tensor, prompts: Sequence[str], records: Sequence[RewardRecord]) -> Tensor:
        """Rewards [B, K] (float32, NaN where a model cannot score a row)."""
        cols = [r(images, prompts, records).float().reshape(-1).cpu() for r in self.rewards]  # K x [B]
        return torch.stack(cols, dim=1)  # [B, K]

    def weights(self, categories: Sequence[str]) -> Tensor:
        """Weights [B, K]: each row's category override, else the defaults."""
        rows = [self.category_weights.get(c, self.default_weights) for c in categories]
        return torch.stack(rows) if rows else self.default_weights[None, :0]  # [B, K]

    def combined(self, rewards: Tensor, categories: Sequence[str]) -> Tensor:
        """Weighted mean of each row's valid rewards [B] (NaN when none is valid); for reports."""
        w = self.weights(categories)  # [B, K]
        valid = ~torch.isnan(rewards)  # [B, K]
        w = torch.where(valid, w, torch.zeros_like(w))
        total = w.sum(dim=1)  # [B]
        value = (torch.nan_to_num(rewards) * w).sum(dim=1) / total  # [B]
        return torch.where(total > 0, value, torch.full_like(value, float("nan")))
