"""Shared inputs of the VLM reward tests."""

from __future__ import annotations

import numpy as np
import torch

from qirl.rewards.base import RewardRecord
from qirl.shapes import random_edit_record, random_t2i_record, render_batch
from qirl.shapes.scene import Scene


def shapes_batch(n: int, seed: int = 0) -> tuple[torch.Tensor, list[str], list[RewardRecord]]:
    """Renders of n captions (odd rows are edits, with their source) of different prompt lengths."""
    rng = np.random.default_rng(seed)
    scenes, prompts, records = [], [], []
    for i in range(n):
        if i % 2:
            rec = random_edit_record(rng)
            src = render_batch([Scene.from_dict(rec["source_scene"])], 32)[0]
            scenes.append(Scene.from_dict(rec["target_scene"]))
            records.append(RewardRecord(task="edit", category=rec["category"], source=src))
        else:
            rec = random_t2i_record(rng)
            scenes.append(Scene.from_dict(rec["scene"]))
            records.append(RewardRecord(category=rec["category"]))
        prompts.append(rec["prompt"])
    return render_batch(scenes, 32), prompts, records
