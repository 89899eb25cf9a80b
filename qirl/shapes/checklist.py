"""Checklist items that judge an image on its own: the Quality, Aesthetics and Real-world Fidelity pillars.

Every item scores 0 (fails), 1 (partly) or 2 (passes), or None (N/A: cannot apply). Scores map to
0 / 60 / 100 and N/A items are left out of the averages: item -> pillar mean -> image mean of the
pillars that apply (Qwen-Image-Bench style). Thresholds are in image fractions or pixels at the
image's own size, so 32 px and 64 px images are judged alike. An image with no detected object fails
every item that inspects objects (an empty canvas is not a picture of anything), except `spacing`,
which needs two objects and is N/A with fewer.

Quality (a clean image):
- no_stray_marks: small blobs and unexplained marks away from objects: none 2, one or two 1, more 0.
- palette_colours: worst object's mean residual from its palette colour mix (detect.py): <= 0.05 2,
  <= 0.12 1, else 0.
- clean_background: mean distance of background pixels (away from objects) from the nearest palette
  background: <= 0.03 2, <= 0.08 1, else 0. Noise, gradients and off-palette backgrounds all fail it.
- sharp_edges: worst object's partially covered pixels per pixel of outline (a clean anti-aliased
  edge is at most ~1.4): <= 1.6 2, <= 2.4 1, else 0.
Aesthetics (composition):
- inside_frame: largest coverage any object puts on the outermost pixel ring: < 0.05 2 (not
  touching), < 0.5 1 (grazing), else 0 (clipped).
- contrast: smallest distance between an object's interior colour and the background: >= 0.35 2,
  >= 0.2 1, else 0.
- spacing: smallest distance between two objects' pixels: >= 0.05 * size 2 (a clear gap), > 1 px 1
  (touching at most diagonally), else 0; N/A with fewer than two objects.
- object_scale: every object's radius within [0.8 small, 1.25 large] 2, within [0.6 small, 1.5 large]
  1, else 0 (specks and giants).
Real-world Fidelity (well-formed shapes):
- regular_geometry: worst object's IoU with its ideal shape template: >= 0.85 2, >= 0.7 1, else 0.
- clear_shape: worst object's IoU lead over its second-best shape: >= 0.08 2, >= 0.04 1, else 0
  (clean renders lead by >= 0.13; a blob between a circle and a square leads by little).
  These two judge every detected object when the image is judged alone (edits, `geometry=True`). A
  text-to-image checklist asks them per *requested* object instead (oracle.py), as Qwen-Image-Bench's
  prompt-generated items do ("the circle is well formed"): a missing object fails them.
- intact_objects: fragments (small blobs within two pixels of an object) plus oversized (merged or
  smeared) objects: none 2, one 1, more 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

from qirl.shapes.detect import Analysis
from qirl.shapes.scene import SIZES

QUALITY, AESTHETICS, ALIGNMENT, FIDELITY, CREATIVE = (
    "Quality", "Aesthetics", "Alignment", "Real-world Fidelity", "Creative Generation",
)
PILLARS: tuple[str, ...] = (QUALITY, AESTHETICS, ALIGNMENT, FIDELITY, CREATIVE)
POINTS: dict[int, float] = {0: 0.0, 1: 60.0, 2: 100.0}


class Item(NamedTuple):
    """One checklist item: its pillar (or edit group), a readable name, and 0/1/2 or None for N/A."""

    pillar: str
    name: str
    value: int | None


def grade(x: float, full: float, part: float, higher_is_better: bool = True) -> int:
    """2 if x reaches `full`, 1 if it reaches `part`, else 0 (reversed when lower is better)."""
    if higher_is_better:
        return 2 if x >= full else 1 if x >= part else 0
    return 2 if x <= full else 1 if x <= part else 0


def mean_points(values: Iterable[int | None]) -> float | None:
    """Mean of 0/1/2 values mapped to 0/60/100, N/A left out; None if every value is N/A."""
    pts = [POINTS[v] for v in values if v is not None]
    return float(np.mean(pts)) if pts else None


def pillar_scores(items: list[Item], pillars: tuple[str, ...] = PILLARS) -> dict[str, float | None]:
    """Mean points per pillar (None when all its items are N/A or it has none)."""
    return {p: mean_points(i.value for i in items if i.pillar == p) for p in pillars}


def _min_gap(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest Euclidean distance between two sets of pixel coordinates [n, 2] and [m, 2]."""
    lo = np.maximum(a.min(0), b.min(0)) - np.minimum(a.max(0), b.max(0))  # per-axis box gap
    if np.hypot(*np.maximum(lo, 0)) > 8:  # far apart: the exact value does not change any grade
        return float(np.hypot(*np.maximum(lo, 0)))
    d = a[:, None, :].astype(np.float32) - b[None, :, :]  # [n, m, 2]
    return float(np.sqrt((d * d).sum(-1)).min())


def geometry_grades(iou: float, margin: float) -> tuple[int, int]:
    """(regular_geometry, clear_shape) grades of one object's template IoU and IoU lead."""
    return grade(iou, 0.85, 0.7), grade(margin, 0.08, 0.04)


def image_items(an: Analysis, geometry: bool = True) -> list[Item]:
    """The Quality, Aesthetics and Real-world Fidelity items of one analysed image.

    `geometry=False` leaves out the per-object geometry items, for callers that ask them per
    requested object (text-to-image).
    """
    objs, size = an.objects, an.size
    has = bool(objs)
    small, large = SIZES["small"], max(SIZES.values())
    items = [
        Item(QUALITY, "no_stray_marks", 2 if an.strays == 0 else 1 if an.strays <= 2 else 0),
        Item(QUALITY, "palette_colours", grade(max((o.color_error for o in objs), default=math.inf), 0.05, 0.12, False)),
        Item(QUALITY, "clean_background", grade(an.background_noise, 0.03, 0.08, False)),
        Item(QUALITY, "sharp_edges", grade(max((o.edge_width for o in objs), default=math.inf), 1.6, 2.4, False)),
        Item(AESTHETICS, "inside_frame", grade(max((o.border for o in objs), default=math.inf), 0.049, 0.499, False)),
        Item(AESTHETICS, "contrast", grade(min((o.contrast for o in objs), default=0.0), 0.35, 0.2)),
    ]
    if len(objs) >= 2:
        gap = min(_min_gap(a.pixels, b.pixels) for i, a in enumerate(objs) for b in objs[i + 1 :])
        items.append(Item(AESTHETICS, "spacing", 2 if gap >= 0.05 * size else 1 if gap > 1.01 else 0))
    else:
        items.append(Item(AESTHETICS, "spacing", None))
    radii = [o.radius for o in objs]
    scale = 0
    if has and all(0.8 * small <= r <= 1.25 * large for r in radii):
        scale = 2
    elif has and all(0.6 * small <= r <= 1.5 * large for r in radii):
        scale = 1
    items.append(Item(AESTHETICS, "object_scale", scale))
    broken = an.fragments + sum(o.oversized for o in objs)
    if geometry:
        worst = geometry_grades(min((o.iou for o in objs), default=0.0), min((o.margin for o in objs), default=0.0))
        items += [Item(FIDELITY, "regular_geometry", worst[0]), Item(FIDELITY, "clear_shape", worst[1])]
    items.append(Item(FIDELITY, "intact_objects", (2 if broken == 0 else 1 if broken == 1 else 0) if has else 0))
    return items


def assign(sim: np.ndarray) -> list[int]:
    """One-to-one matching of rows to columns maximising the total of positive `sim` [n, m].

    Returns, per row, its column or -1. Exact (search over rows with a bitmask of used columns, each
    row trying its 6 best columns) for up to 5 rows, which covers every caption and clean scene;
    greedy (best remaining pair first) beyond, for cluttered images where exactness no longer matters.
    """
    n, m = sim.shape
    if n > 5:
        out, free = [-1] * n, sim.copy()
        while free.size and free.max() > 0:
            i, j = np.unravel_index(int(free.argmax()), free.shape)
            out[i] = int(j)
            free[i, :], free[:, j] = 0.0, 0.0
        return out
    options = [sorted((j for j in range(m) if sim[i, j] > 0), key=lambda j: -sim[i, j])[:6] for i in range(n)]
    memo: dict[tuple[int, int], tuple[float, tuple[int, ...]]] = {}

    def best(i: int, used: int) -> tuple[float, tuple[int, ...]]:
        if i == n:
            return 0.0, ()
        key = (i, used)
        if key not in memo:
            score, rest = best(i + 1, used)
            choice = (score, (-1,) + rest)
            for j in options[i]:
                if not used >> j & 1:
                    s, r = best(i + 1, used | 1 << j)
                    if s + sim[i, j] > choice[0]:
                        choice = (s + float(sim[i, j]), (j,) + r)
            memo[key] = choice
        return memo[key]

    return list(best(0, 0)[1])
