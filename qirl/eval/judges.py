"""Judges: who scores bench images and who votes in arenas.

Bench judges turn images into `ImageScore`s:
- `oracle`: the Shapes oracle's checklist, regrouped item -> sub-dimension -> pillar (checklist.py).
- any reward model or several (`name` or `name:key=value,...`, as `qirl score images --reward`): each
  reward is one "pillar" (its value x 100), overall = the composite's weighted mean of the rewards
  that can score the image.

Arena judges compare the two images of a pair by the judge's native score (the oracle's own overall,
whose edit overall includes preservation, since people comparing two edits see over-editing; or the
reward composite x 100) and vote:
- `annotators` (default): simulated people. Each annotator perceives each image's oracle score with
  Gaussian noise of sd `noise` points, and calls a tie when the perceived scores are within
  `tie_margin`; the same perception model as `qirl score annotate` (docs/rewards.md). Seeded per vote,
  so a vote is reproducible and independent of which other votes are cast.
- `oracle`: the same without noise (a perfect annotator; ties only within `tie_margin`).
- a reward spec: as `oracle`, with the reward composite's score.
- `human`: no automatic votes; qirl writes a voting page (vote_page.py) whose downloaded JSONL is
  read back with `--votes`.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from qirl.data import PromptRecord
from qirl.errors import UserError
from qirl.eval.checklist import EDIT_PILLARS, T2I_PILLARS, ImageScore, edit_image_score, t2i_image_score


class OracleJudge:
    """The Shapes oracle, with the bench's sub-dimension level (checklist.py)."""

    name = "oracle"

    def pillars(self, task: str) -> tuple[str, ...]:
        return T2I_PILLARS if task == "t2i" else EDIT_PILLARS

    def score(
        self, images: torch.Tensor, records: Sequence[PromptRecord], sources: Sequence[torch.Tensor | None]
    ) -> list[ImageScore]:
        from qirl.shapes import score_edit, score_t2i

        arrays = images.float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()  # [N, H, W, 3]
        out = []
        for arr, rec, src in zip(arrays, records, sources, strict=True):
            if rec.task == "edit":
                assert src is not None
                out.append(edit_image_score(score_edit(src.permute(1, 2, 0).numpy(), rec.prompt, arr)))
            else:
                out.append(t2i_image_score(score_t2i(arr, rec.prompt)))
        return out


class RewardJudge:
    """Reward models as a judge: one pillar per reward (x 100), overall = weighted mean of the valid ones."""

    def __init__(self, specs: Sequence[str]) -> None:
        from qirl.rewards.composite import CompositeConfig, CompositeReward, parse_reward_spec

        self.composite = CompositeReward.from_config(CompositeConfig(models=[parse_reward_spec(s, "judge") for s in specs]))
        self.name = "+".join(specs)

    def pillars(self, task: str) -> tuple[str, ...]:
        return tuple(self.composite.names)

    def score(
        self, images: torch.Tensor, records: Sequence[PromptRecord], sources: Sequence[torch.Tensor | None]
    ) -> list[ImageScore]:
        from qirl.rewards.base import RewardRecord

        recs = [RewardRecord(task=r.task, category=r.category, source=s) for r, s in zip(records, sources, strict=True)]
        values = self.composite.score_all(images, [r.prompt for r in records], recs)  # [N, K]
        overall = self.composite.combined(values, [r.category for r in records]) * 100.0  # [N]
        out = []
        for row, o in zip(values.tolist(), overall.tolist(), strict=True):
            pillars = {n: (None if math.isnan(v) else 100.0 * v) for n, v in zip(self.composite.names, row, strict=True)}
            out.append(ImageScore(o, pillars, o))
        return out


def make_judge(judge: str | Sequence[str] = "oracle") -> OracleJudge | RewardJudge:
    """`oracle` alone (or `annotators`, the arena's noisy oracle): the checklist judge; else reward specs,
    where `oracle` beside other rewards is the oracle's overall as a reward (qirl/rewards/oracle.py)."""
    specs = [judge] if isinstance(judge, str) else list(judge)
    if not specs:
        raise UserError("no judge given")
    if specs in (["oracle"], ["annotators"]):
        return OracleJudge()
    if "human" in specs:
        raise UserError("judge 'human' votes in arenas only, alone (qirl eval arena --judge human)")
    if "annotators" in specs:
        raise UserError(f"judge {', '.join(specs)}: 'annotators' cannot be combined with reward models")
    return RewardJudge(specs)


@dataclass(frozen=True)
class VotePolicy:
    """How a score difference becomes a vote: annotator noise sd and the tie margin, in score points."""

    noise: float = 8.0
    tie_margin: float = 2.0
    seed: int = 0


def vote_rng(policy: VotePolicy, *key: object) -> np.random.Generator:
    """A generator for one vote, seeded by the judge seed and a stable hash of the vote's identity."""
    h = zlib.crc32("\x1f".join(map(str, key)).encode())
    return np.random.default_rng([policy.seed, h])


def cast_vote(score_a: float, score_b: float, policy: VotePolicy, rng: np.random.Generator | None) -> str:
    """'a', 'b' or 'tie': each score perceived with N(0, noise^2) error (when rng is given); a tie when
    the perceived scores are within `tie_margin`. A NaN score (judge could not score) loses to a number;
    two NaN scores tie."""
    if math.isnan(score_a) or math.isnan(score_b):
        return "tie" if math.isnan(score_a) and math.isnan(score_b) else ("b" if math.isnan(score_a) else "a")
    if rng is not None and policy.noise > 0:
        score_a += float(rng.normal(0.0, policy.noise))
        score_b += float(rng.normal(0.0, policy.noise))
    diff = score_a - score_b
    if abs(diff) < policy.tie_margin:
        return "tie"
    return "a" if diff > 0 else "b"
