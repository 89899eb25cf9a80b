"""Rewards read from the Shapes oracle: the known truth, as reward models.

The report's composite T2I reward covers alignment, aesthetics and portrait (structural) fidelity; its
edit reward covers instruction following and face-identity preservation. On the Shapes world each has an
exact analogue in the oracle's checklist (qirl/shapes/oracle.py), scaled from 0-100 to [0, 1]:

| reward                    | task | oracle quantity                                           |
| ------------------------- | ---- | --------------------------------------------------------- |
| oracle                    | both | T2I overall (mean of pillars) / edit overall              |
| oracle_alignment          | t2i  | Alignment pillar                                          |
| oracle_aesthetics         | t2i  | mean of the Quality and Aesthetics pillars                |
| oracle_fidelity           | t2i  | Real-world Fidelity pillar (the structural-fidelity one)  |
| oracle_instruction        | edit | edit success (did the instructed change happen)           |
| oracle_identity           | edit | edit preservation (untouched content kept: identity)      |
| oracle_instruction_graded | edit | how far the instructed change went (`graded_success`)     |

Rows of a task a reward does not judge get NaN, which GRPO's advantage drops from that reward's group
statistics. The oracle is cheap (~2 ms an image) and runs in-process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from qirl.rewards.base import RewardModel, RewardRecord, register_reward
from qirl.shapes import EditScore, OracleScore, score_edit, score_t2i


def _pillar(score: OracleScore, *names: str) -> float:
    vals = [score.pillars.get(n) for n in names]
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else float("nan")


T2I_QUANTITIES: dict[str, Callable[[OracleScore], float]] = {
    "oracle": lambda s: s.overall,
    "oracle_alignment": lambda s: _pillar(s, "Alignment"),
    "oracle_aesthetics": lambda s: _pillar(s, "Quality", "Aesthetics"),
    "oracle_fidelity": lambda s: _pillar(s, "Real-world Fidelity"),
}
EDIT_QUANTITIES: dict[str, Callable[[EditScore], float]] = {
    "oracle": lambda s: s.overall,
    "oracle_instruction": lambda s: s.success,
    "oracle_identity": lambda s: s.preservation,
    "oracle_instruction_graded": lambda s: s.graded_success,
    "oracle_edit": lambda s: s.overall,  # = "oracle" on edits, but NaN on T2I (for mixed-task composites)
}


class OracleReward(RewardModel):
    """One oracle quantity as a reward in [0, 1] (see the module table)."""

    def __init__(self, name: str = "oracle") -> None:
        if name not in T2I_QUANTITIES and name not in EDIT_QUANTITIES:
            raise ValueError(f"unknown oracle reward {name!r}")
        self.name = name
        self.tasks = tuple(t for t, table in (("t2i", T2I_QUANTITIES), ("edit", EDIT_QUANTITIES)) if name in table)

    def score(self, images: Tensor, prompts: Sequence[str], records: Sequence[RewardRecord]) -> Tensor:
        arrays = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()  # [B, H, W, 3]
        out = torch.full((len(prompts),), float("nan"))
        for i, (image, prompt, rec) in enumerate(zip(arrays, prompts, records, strict=True)):
            if rec.task not in self.tasks:
                continue
            if rec.task == "edit":
                if rec.source is None:
                    continue  # nothing to compare against: cannot score
                source = rec.source.detach().float().permute(1, 2, 0).cpu().numpy()  # [H, W, 3]
                out[i] = EDIT_QUANTITIES[self.name](score_edit(source, prompt, image)) / 100.0
            else:
                out[i] = T2I_QUANTITIES[self.name](score_t2i(image, prompt)) / 100.0
        return out


for _name in sorted(set(T2I_QUANTITIES) | set(EDIT_QUANTITIES)):
    register_reward(_name)(lambda name=_name, **kw: OracleReward(name, **kw))
