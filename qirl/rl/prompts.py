"""Training prompts for the RL loops: generated from the Shapes grammar, or drawn from a JSONL.

Generated sources (never the held-out sets): ``shapes-t2i`` (`random_t2i_record`, train split),
``shapes-edit`` (`random_edit_record`) and ``shapes-mix`` (edits with probability ``edit_fraction``).
A JSONL pool (e.g. the output of `qirl curate`) is sampled uniformly, with replacement only when it
is smaller than the draw.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

from qirl.data import PromptRecord, record_from_dict
from qirl.errors import UserError
from qirl.prompt_sets import BUILTIN_SETS, resolve_prompts
from qirl.shapes import random_edit_record, random_t2i_record

GENERATED = ("shapes-t2i", "shapes-edit", "shapes-mix")


class PromptSource:
    """Draws training prompt records; checks categories against the reward weights' table."""

    def __init__(self, spec: str, edit_fraction: float = 0.5, known_categories: Collection[str] = ()) -> None:
        if spec in BUILTIN_SETS:
            raise UserError(
                f"data.prompts={spec!r} is a built-in evaluation set; use one of {', '.join(GENERATED)} or a JSONL"
            )
        if not 0.0 <= edit_fraction <= 1.0:
            raise UserError(f"data.edit_fraction must be in [0, 1], got {edit_fraction}")
        self.spec = spec
        self.edit_fraction = {"shapes-t2i": 0.0, "shapes-edit": 1.0}.get(spec, edit_fraction)
        self.known = set(known_categories)
        self.pool: list[PromptRecord] | None = None
        if spec not in GENERATED:
            self.pool = resolve_prompts(spec)
            if not self.pool:
                raise UserError(f"data.prompts={spec!r}: no prompts")
            for record in self.pool:
                self._check(record)

    @property
    def tasks(self) -> set[str]:
        if self.pool is not None:
            return {r.task for r in self.pool}
        return {t for t, share in (("t2i", 1 - self.edit_fraction), ("edit", self.edit_fraction)) if share > 0}

    @property
    def edit_share(self) -> float:
        """The share of edits among the records drawn (the pool's, or the generator's fraction)."""
        if self.pool is not None:
            return sum(r.task == "edit" for r in self.pool) / len(self.pool)
        return self.edit_fraction

    def _check(self, record: PromptRecord) -> None:
        """A category the calibrated weights do not know would silently fall back to the defaults."""
        if self.known and record.category not in self.known:
            raise UserError(
                f"data.prompts={self.spec!r}: prompt {record.id or record.prompt!r} has category "
                f"{record.category!r}, which rewards.category_weights does not list ({', '.join(sorted(self.known))})"
            )

    def draw(self, rng: np.random.Generator, n: int) -> list[PromptRecord]:
        if self.pool is not None:
            idx = rng.choice(len(self.pool), size=n, replace=n > len(self.pool))
            return [self.pool[int(i)] for i in idx]
        records = []
        for _ in range(n):
            edit = self.edit_fraction > 0 and (self.edit_fraction >= 1 or rng.random() < self.edit_fraction)
            row = random_edit_record(rng, split="train") if edit else random_t2i_record(rng, split="train")
            record = record_from_dict(row, self.spec)
            self._check(record)
            records.append(record)
        return records
