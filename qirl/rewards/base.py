"""The reward-model contract: `score(images, prompts, records) -> Tensor[B]`, NaN for "cannot score".

Everything that consumes rewards (GRPO, curation, `qirl score`, the HTTP server) sees this interface and
nothing else, so an oracle, a fine-tuned VLM, a face-identity model and a remote server are
interchangeable. Rewards are floats in [0, 1] by convention (an oracle's 0-100 is divided by 100, a
Likert expectation is normalised), so composite weights mean the same thing across rewards; GRPO
normalises per group anyway (DESIGN.md, data flow step 4).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from qirl.errors import UserError

TASKS = ("t2i", "edit")


@dataclass(frozen=True)
class RewardRecord:
    """What a reward model may need about one image beyond the image and its prompt."""

    task: str = "t2i"
    category: str = "default"
    source: Tensor | None = None  # [3, H, W] in [0, 1]: the edit's source image


class RewardModel(ABC):
    """A scorer of generated images. Subclasses set `name` and the tasks they can judge."""

    name: str = "reward"
    tasks: tuple[str, ...] = TASKS

    @abstractmethod
    def score(self, images: Tensor, prompts: Sequence[str], records: Sequence[RewardRecord]) -> Tensor:
        """images [B, 3, H, W] in [0, 1] -> rewards [B] float32 in [0, 1]; NaN where it cannot score
        (a task it does not judge, no face found, a failed remote call)."""

    def __call__(self, images: Tensor, prompts: Sequence[str], records: Sequence[RewardRecord] | None = None) -> Tensor:
        records = list(records) if records is not None else [RewardRecord()] * len(prompts)
        if not (images.shape[0] == len(prompts) == len(records)):
            raise ValueError(f"{images.shape[0]} images, {len(prompts)} prompts, {len(records)} records")
        return self.score(images, prompts, records)

    def task_mask(self, records: Sequence[RewardRecord]) -> Tensor:
        """bool [B]: the rows whose task this model judges (the others get NaN)."""
        return torch.tensor([r.task in self.tasks for r in records], dtype=torch.bool)


_REGISTRY: dict[str, Callable[..., RewardModel]] = {}


def register_reward(name: str) -> Callable[[Callable[..., RewardModel]], Callable[..., RewardModel]]:
    """Decorator: make a reward factory buildable by name from recipes and the CLI."""

    def deco(factory: Callable[..., RewardModel]) -> Callable[..., RewardModel]:
        _REGISTRY[name] = factory
        return factory

    return deco


def available_rewards() -> list[str]:
    _import_builtin_rewards()
    return sorted(_REGISTRY)


def build_reward(name: str, **kwargs: Any) -> RewardModel:
    """Build a registered reward; an unknown name is a `UserError` listing the known ones."""
    _import_builtin_rewards()
    if name not in _REGISTRY:
        raise UserError(f"unknown reward {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**kwargs)


def _import_builtin_rewards() -> None:
    """Importing the modules registers their rewards (kept lazy: some pull heavy optional packages)."""
    import qirl.rewards.client  # noqa: F401
    import qirl.rewards.face  # noqa: F401  (imports dlib only when built)
    import qirl.rewards.oracle  # noqa: F401
    import qirl.rewards.vlm  # noqa: F401  (transformers: a few seconds, only when rewards are built)
