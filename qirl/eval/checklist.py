"""Benchmark scoring of one image: checklist items -> sub-dimensions -> pillars -> image overall.

Qwen-Image-Bench (Qwen-Image-2.0 report, evaluation section) scores each image by a checklist of
items graded 0 / 1 / 2 (or N/A), mapped to 0 / 60 / 100, N/A left out, and averages
item -> sub-dimension -> pillar -> image -> set. The Shapes oracle (qirl/shapes/oracle.py) averages
item -> pillar directly; its item names carry the sub-dimension, so the bench regroups them here
(`subdimension`) without changing the oracle. What the extra level changes: an Alignment pillar with
four objects and one relation no longer weighs the relation 1 / 17 (one item of 17) but 1 / 6 (one
sub-dimension of shape, colour, size, position, relation, extra objects, ...), and any number of extra
objects costs one sub-dimension, not one item each.

T2I image overall: the mean of the pillars that apply (Quality, Aesthetics, Alignment, Real-world
Fidelity, Creative Generation). Edit image: Success (the instruction's item), Preservation (its
sub-dimensions; 100 when nothing is to be kept, as the oracle does), Quality (mean of the output's
Quality and Real-world Fidelity pillars), and

    overall = sqrt(Success x Quality)

as GEdit-Bench (Liu et al. 2025, "Step1X-Edit") and VIEScore (Ku et al. 2024) combine semantic
consistency and perceptual quality. Preservation is reported beside it, not folded in: the oracle's
own `EditScore.overall` is the geometric mean of all three (see docs/eval.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qirl.shapes.checklist import ALIGNMENT, FIDELITY, PILLARS, QUALITY, Item, mean_points
from qirl.shapes.edit_oracle import PRESERVATION, SUCCESS, EditScore
from qirl.shapes.oracle import OracleScore

EDIT_PILLARS: tuple[str, ...] = ("Success", "Preservation", "Quality")
T2I_PILLARS: tuple[str, ...] = PILLARS


@dataclass(frozen=True)
class ImageScore:
    """One image as the bench sees it: overall and pillars on 0-100 (None = N/A), plus the judge's
    native overall (the oracle's own, or the reward composite's) that arenas compare."""

    overall: float
    pillars: dict[str, float | None]
    native: float = float("nan")
    subdims: dict[str, dict[str, float | None]] = field(default_factory=dict)


def subdimension(item: Item) -> str:
    """The sub-dimension an oracle item belongs to, read from its name (oracle.py, edit_oracle.py).

    "<object>#k: shape" -> "shape" (likewise colour, size, position, geometry, clear shape),
    "<group>: count" -> "count", "<group>: novel combination" -> "novel combination",
    "<a> left of <b>" -> "relation", "extra object: ..." / "no_extra_objects" -> "extra objects",
    edit "keep ..." -> "untouched objects", "...: rest kept" -> "edited object",
    "new object #k" / "no_new_objects" -> "new objects"; image-level items are their own
    sub-dimension ("no_stray_marks" -> "no stray marks").
    """
    name = item.name
    if name.startswith("extra object: ") or name == "no_extra_objects":
        return "extra objects"
    if name.startswith("new object #") or name == "no_new_objects":
        return "new objects"
    if name.startswith("keep "):
        return "untouched objects"
    if name.endswith(": rest kept"):
        return "edited object"
    if ": " in name:
        return name.rsplit(": ", 1)[1]
    if item.pillar == ALIGNMENT and name != "background":
        return "relation"  # relation items are "<a> <relation> <b>", the only Alignment names without ':'
    return name.replace("_", " ")


def subdim_scores(items: list[Item], pillar: str) -> dict[str, float | None]:
    """Mean points per sub-dimension of one pillar (None when all its items are N/A)."""
    groups: dict[str, list[int | None]] = {}
    for it in items:
        if it.pillar == pillar:
            groups.setdefault(subdimension(it), []).append(it.value)
    return {name: mean_points(values) for name, values in groups.items()}


def pillar_score(items: list[Item], pillar: str) -> tuple[float | None, dict[str, float | None]]:
    """(mean of the sub-dimensions that apply or None, the sub-dimension scores)."""
    subs = subdim_scores(items, pillar)
    present = [v for v in subs.values() if v is not None]
    return (float(np.mean(present)) if present else None), subs


def t2i_image_score(score: OracleScore) -> ImageScore:
    """Bench score of one T2I image from the oracle's items (sub-dimension level added)."""
    pillars, subdims = {}, {}
    for p in T2I_PILLARS:
        pillars[p], subdims[p] = pillar_score(score.items, p)
    present = [v for v in pillars.values() if v is not None]
    return ImageScore(float(np.mean(present)) if present else 0.0, pillars, score.overall, subdims)


def edit_image_score(score: EditScore) -> ImageScore:
    """Bench score of one edit: Success, Preservation, Quality and overall = sqrt(Success x Quality)."""
    success, s_subs = pillar_score(score.items, SUCCESS)
    preservation, p_subs = pillar_score(score.items, PRESERVATION)
    parts = [pillar_score(score.items, p)[0] for p in (QUALITY, FIDELITY)]
    parts = [v for v in parts if v is not None]
    # The oracle's conventions: an N/A instruction scores 0, nothing to preserve scores 100.
    success = 0.0 if success is None else success
    preservation = 100.0 if preservation is None else preservation
    quality = float(np.mean(parts)) if parts else 0.0
    overall = round(float(np.sqrt(success * quality)), 9)  # 100.0, not 99.99999999999999
    pillars: dict[str, float | None] = {"Success": success, "Preservation": preservation, "Quality": quality}
    return ImageScore(overall, pillars, score.overall, {"Success": s_subs, "Preservation": p_subs})
