"""Shared inputs of the VLM reward tests."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from qirl.rewards.base import RewardRecord
from qirl.shapes import random_edit_record, random_t2i_record, render_batch
from qirl.shapes.scene import Scene


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: as fast for models this small, and immune to OpenMP spin-waiting when the
    shared CPU is oversubscribed (two threads on a busy 2-core machine made a forward 70x slower).
    Autouse in every test module that imports it (`from vlm_cases import one_thread`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
