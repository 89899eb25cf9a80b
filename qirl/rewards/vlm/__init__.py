"""VLM reward models on transformers vision-language models (Qwen2.5-VL / Qwen3-VL family).

One code path serves a 7B checkpoint on a cluster (`path=<local folder>`) and the embedded default, a
tiny Qwen2.5-VL with a shipped word-level tokenizer (`path=None`):

- pointwise: the score distribution over the tokens "1".."5" after "Score: ", reward (E - 1) / 4,
  optionally after a chain of thought (model.py, losses.py);
- pairwise: a scalar head on the last hidden state, trained with Bradley-Terry (ties as soft 0.5 labels).

Registered rewards (`qirl.rewards.base.build_reward`): "vlm_pointwise", "vlm_pointwise_cot" and
"vlm_pairwise", each taking `path` (a folder written by `VLMReward.save`, or a VLM checkpoint folder
for zero-shot use, or None for the untrained embedded model) and any `VLMRewardConfig` key.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from qirl.models.qwen_vl import TinyVLMSpec
from qirl.rewards.base import register_reward
from qirl.rewards.vlm.losses import bradley_terry_loss, expected_score, normalised_reward, pointwise_loss
from qirl.rewards.vlm.model import META_FILE, VLMReward, VLMRewardConfig
from qirl.rewards.vlm.train import (
    DimensionMean,
    RewardData,
    RewardRun,
    RewardTrain,
    RewardTrainRecipe,
    evaluate_reward_model,
    train_reward_model,
)
from qirl.stats import spearman

__all__ = [
    "DimensionMean",
    "RewardData",
    "RewardRun",
    "RewardTrain",
    "RewardTrainRecipe",
    "TinyVLMSpec",
    "VLMReward",
    "VLMRewardConfig",
    "bradley_terry_loss",
    "evaluate_reward_model",
    "expected_score",
    "load_vlm_reward",
    "normalised_reward",
    "pointwise_loss",
    "spearman",
    "train_reward_model",
]


# Reward models trained by `qirl score train recipes/rm_<mode>.yaml` on `qirl score annotate`'s data and
# shipped with qirl (1.2 MB each; MODEL_CARD.md in each folder), so GRPO recipes can use learned rewards
# on a fresh clone: `path: builtin`.
BUILTIN_DIRS = {"pointwise": "rm_pointwise", "pairwise": "rm_pairwise"}


def builtin_reward_path(mode: str) -> Path:
    from qirl.errors import UserError

    if mode not in BUILTIN_DIRS:
        raise UserError(f"no built-in {mode} reward model ships with qirl (built in: {', '.join(BUILTIN_DIRS)})")
    return Path(str(resources.files("qirl") / "assets" / BUILTIN_DIRS[mode]))


def load_vlm_reward(mode: str, path: str | None = None, **kwargs: Any) -> VLMReward:
    """A folder from `VLMReward.save` loads as saved (its mode must match); "builtin" is the shipped one
    of that mode; any other folder is a VLM checkpoint used zero-shot; None is the embedded tiny model
    (untrained)."""
    if path == "builtin":
        if kwargs.get("cot"):
            from qirl.errors import UserError

            raise UserError("no built-in chain-of-thought reward model ships with qirl (see docs/rewards.md)")
        path = str(builtin_reward_path(mode))
    if path is not None and (Path(path) / META_FILE).is_file():
        reward = VLMReward.load(path, **kwargs)
        if reward.config.mode != mode:
            from qirl.errors import UserError

            raise UserError(f"{path}: is a {reward.config.mode} VLM reward, asked for {mode}")
        return reward
    return VLMReward(VLMRewardConfig.from_dict({"mode": mode, "path": path, **kwargs}, f"vlm_{mode} reward"))


@register_reward("vlm_pointwise")
def _vlm_pointwise(path: str | None = None, **kwargs: Any) -> VLMReward:
    return load_vlm_reward("pointwise", path, **kwargs)


@register_reward("vlm_pointwise_cot")
def _vlm_pointwise_cot(path: str | None = None, **kwargs: Any) -> VLMReward:
    return load_vlm_reward("pointwise", path, **({"cot": True} | kwargs))


@register_reward("vlm_pairwise")
def _vlm_pairwise(path: str | None = None, **kwargs: Any) -> VLMReward:
    return load_vlm_reward("pairwise", path, **kwargs)
