"""Edit scoring: did the instructed change happen, was everything else kept, is the result clean.

Both images are analysed (detect.py). Source objects are matched one to one with output objects
(checklist.assign) maximising, for untouched objects, 6 [same shape and colour] + [same size]
- 10 * centre distance (2 - 10 * distance when only one of shape and colour agrees); the edited object
is matched by what the edit keeps: recolour by shape (+3 if it has the new colour), move by shape and
colour (+10 * distance travelled in the instructed direction, -10 * sideways drift), resize by shape
and colour and position. Items score 0/1/2 (-> 0/60/100) or None (N/A) as in the T2I checklist.

Success (the instructed change):
- recolour: the edited object has the new colour 2, another new colour 1, unchanged or gone 0.
- move: it travelled >= 0.08 in the instructed direction 2, >= 0.03 1, else 0.
- add: an output object matched to no source object has the requested shape and colour, and size and
  region if named, 2; right shape and colour but wrong size or region 1; none 0.
- remove: the named object has no match in the output 2, else 0.
- resize: radius ratio output / source >= 1.15 (bigger) or <= 1 / 1.15 (smaller) 2, beyond 1.05 1,
  else 0; to a named class: that class 2, changed in the right direction 1, else 0.
- background: the output background is the requested one within 0.1 2, within 0.25 1, else 0.
Preservation (everything the instruction did not touch; the identity-preservation analogue):
- per untouched source object: matched with the same shape, colour and size within 0.03 of its place
  2, same shape and colour within 0.08 and at most one size class off 1, else 0.
- the edited object's other attributes: recolour and resize keep its centre, move keeps its
  perpendicular coordinate, each within 0.03 2 (and the same size class, except for resize),
  within 0.08 1, else 0.
- background (not for background edits): same palette background within 0.05 of the source's 2,
  within 0.15 1, else 0.
- "new object #k": one item scoring 0 per output object matched to nothing (besides the one added),
  so clutter cannot dilute the rest; "no_new_objects" 2 when there is none.
Quality: the mean of the output's Quality and Real-world Fidelity pillars (checklist.py).

overall = (success * preservation * quality) ** (1/3): GEdit-Bench's sqrt(success * quality) extended
by preservation as a geometric mean, so an edit that is not done, destroys the rest of the image, or
is not clean cannot score well by excelling at the other two.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from qirl.errors import UserError
from qirl.shapes.checklist import (
    FIDELITY,
    QUALITY,
    Item,
    assign,
    grade,
    image_items,
    mean_points,
    pillar_scores,
)
from qirl.shapes.detect import Analysis, Detection, analyse, as_images
from qirl.shapes.edits import EditSpec, parse_instruction
from qirl.shapes.scene import BACKGROUNDS, OK_MARGIN, SIZES, position_margin

SUCCESS, PRESERVATION = "Success", "Preservation"
_RANK = {s: i for i, s in enumerate(SIZES)}
_DIR = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}


@dataclass(frozen=True)
class EditScore:
    """One edit: overall, success, preservation and quality on 0-100, and every item."""

    overall: float
    success: float
    preservation: float
    quality: float
    items: list[Item]
    graded_success: float = float("nan")  # 0-100, `graded_success` (a training signal; not in overall)


def _dist(a: Detection, b: Detection) -> float:
    return math.hypot(a.x - b.x, a.y - b.y)


def _along(spec: EditSpec, a: Detection, b: Detection) -> tuple[float, float]:
    """Displacement a -> b along the instructed direction and across it."""
    ux, uy = _DIR[spec.direction]
    dx, dy = b.x - a.x, b.y - a.y
    return dx * ux + dy * uy, abs(dx * uy - dy * ux)


def _sim(spec: EditSpec, s: Detection, o: Detection, is_target: bool) -> float:
    same = s.shape == o.shape and s.color == o.color
    if is_target and spec.kind == "recolour":
        return 3.0 + 3.0 * (o.color == spec.color) + (o.size == s.size) - 10 * _dist(s, o) if s.shape == o.shape else 0.0
    if is_target and spec.kind == "move":
        along, across = _along(spec, s, o)
        return 6.0 + (o.size == s.size) + 10 * min(max(along, 0.0), 0.35) - 10 * across if same else 0.0
    if is_target and spec.kind == "resize":
        return 6.0 - 10 * _dist(s, o) if same else 0.0
    if same:
        return 6.0 + (o.size == s.size) - 10 * _dist(s, o)
    if s.shape == o.shape or s.color == o.color:
        return 2.0 - 10 * _dist(s, o)
    return 0.0


def _success(spec: EditSpec, src: Analysis, out: Analysis, t: int | None, match: list[int]) -> tuple[int | None, int]:
    """(success value, number of new output objects credited to an 'add')."""
    s_objs, o_objs = src.objects, out.objects
    d = o_objs[match[t]] if t is not None and match[t] >= 0 else None
    k = spec.kind
    if k == "background":
        return (grade(out.background_dist, 0.1, 0.25, False) if out.background == spec.background else 0), 0
    if k == "add":
        new = [o_objs[j] for j in range(len(o_objs)) if j not in match]
        hits = [o for o in new if o.shape == spec.shape and o.color == spec.color]
        full = [o for o in hits if spec.size in (None, o.size)
                and (spec.position is None or position_margin(spec.position, o.x, o.y) >= OK_MARGIN)]
        return (2 if full else 1 if hits else 0), (1 if hits else 0)
    if t is None:  # the source shows no unique object fitting the instruction
        ref = spec.target
        present = [o for o in o_objs if ref is not None and ref.matches(o)]
        if k == "remove":
            return (0 if present else 2), 0
        if k == "recolour":
            return (2 if any(o.shape == ref.shape and o.color == spec.color for o in o_objs) else 0), 0
        return None, 0
    if k == "remove":
        return (2 if d is None else 0), 0
    if d is None:
        return 0, 0
    if k == "recolour":
        return (2 if d.color == spec.color else 1 if d.color != s_objs[t].color else 0), 0
    if k == "move":
        return grade(_along(spec, s_objs[t], d)[0], 0.08, 0.03), 0
    ratio = d.radius / max(s_objs[t].radius, 1e-6)  # resize
    if spec.size is not None:
        grew = _RANK[spec.size] > _RANK[s_objs[t].size]
        return (2 if d.size == spec.size else 1 if (ratio > 1.05 if grew else ratio < 1 / 1.05) else 0), 0
    if spec.change == "bigger":
        return grade(ratio, 1.15, 1.05), 0
    return grade(1.0 / max(ratio, 1e-6), 1.15, 1.05), 0


def _correspondence(src: Analysis, spec: EditSpec, out: Analysis) -> tuple[int | None, list[int]]:
    """(index of the instruction's unique target in the source or None, source -> output object match)."""
    s_objs, o_objs = src.objects, out.objects
    t = None
    if spec.target is not None:
        hits = [i for i, s in enumerate(s_objs) if spec.target.matches(s)]
        t = hits[0] if len(hits) == 1 else None
    sim = np.array([[_sim(spec, s, o, i == t) for o in o_objs] for i, s in enumerate(s_objs)], dtype=np.float64)
    return t, assign(sim.reshape(len(s_objs), len(o_objs)))


def graded_success(
    src: Analysis, spec: EditSpec, out: Analysis, t: int | None, match: list[int], value: int | None
) -> float:
    """How far the instructed change went, in [0, 1]: a continuous version of the Success item.

    The Success item is a step function (0 / 60 / 100 at fixed thresholds), so an output just short of
    a threshold scores like one that did nothing. Where the oracle measures a continuous quantity this
    is the fraction of the way to the full-credit threshold, clipped to [0, 1]:
    - move: displacement along the instructed direction / 0.08;
    - resize bigger / smaller: log(r_out / r_src) / log(1.15) (negated for smaller); to a named size
      class: log(r_out / r_src) / log(R_class / r_src), with the class's nominal radius R_class;
    - background: 1 - |c_out - c_target| / |c_src - c_target| over the estimated background colours.
    Recolour, add and remove detect classes (a colour, an object), not amounts, so they keep the
    item's value / 2. The graded value is never below the item's value / 2, so full credit on the item
    gives 1 here too. `t`, `match` and `value` are the edit's `_correspondence` and Success item value,
    which `score_edit` has already computed.
    """
    discrete = 0.0 if value is None else value / 2.0
    k = spec.kind
    if k == "background":
        target = np.asarray(BACKGROUNDS[spec.background])
        span = float(np.linalg.norm(np.subtract(src.background_rgb, target)))
        if span < 1e-6:
            return discrete
        left = float(np.linalg.norm(np.subtract(out.background_rgb, target)))
        return max(discrete, float(np.clip(1.0 - left / span, 0.0, 1.0)))
    d = out.objects[match[t]] if t is not None and match[t] >= 0 else None
    if d is None or k not in ("move", "resize"):
        return discrete
    s = src.objects[t]
    if k == "move":
        return max(discrete, float(np.clip(_along(spec, s, d)[0] / 0.08, 0.0, 1.0)))
    growth = math.log(max(d.radius, 1e-6) / max(s.radius, 1e-6))
    if spec.size is not None:
        full = math.log(SIZES[spec.size] / max(s.radius, 1e-6))
        return discrete if abs(full) < 1e-6 else max(discrete, float(np.clip(growth / full, 0.0, 1.0)))
    sign = 1.0 if spec.change == "bigger" else -1.0
    return max(discrete, float(np.clip(sign * growth / math.log(1.15), 0.0, 1.0)))


def edit_items(src: Analysis, spec: EditSpec, out: Analysis) -> tuple[list[Item], float]:
    """Success and Preservation items for one edit (see the module docstring), and its graded success."""
    s_objs, o_objs = src.objects, out.objects
    t, match = _correspondence(src, spec, out)
    value, credited = _success(spec, src, out, t, match)
    graded = graded_success(src, spec, out, t, match, value)
    items = [Item(SUCCESS, spec.kind, value)]
    for i, s in enumerate(s_objs):
        d = o_objs[match[i]] if match[i] >= 0 else None
        if i == t and spec.kind == "remove":
            continue
        if i == t and spec.kind in ("recolour", "move", "resize"):
            drift = 9.0 if d is None else _along(spec, s, d)[1] if spec.kind == "move" else _dist(s, d)
            same = d is not None and (spec.kind == "resize" or d.size == s.size)
            done = {"recolour": "recoloured", "move": "moved", "resize": "resized"}[spec.kind]
            items.append(Item(PRESERVATION, f"{done} {s.color} {s.shape}: rest kept",
                              2 if drift <= 0.03 and same else 1 if drift <= 0.08 else 0))
            continue
        value = 0
        if d is not None and d.shape == s.shape and d.color == s.color:
            gap = abs(_RANK[d.size] - _RANK[s.size])
            value = 2 if _dist(s, d) <= 0.03 and gap == 0 else 1 if _dist(s, d) <= 0.08 and gap <= 1 else 0
        items.append(Item(PRESERVATION, f"keep {s.color} {s.shape}#{i + 1}", value))
    if spec.kind != "background":
        moved = float(np.linalg.norm(np.subtract(out.background_rgb, src.background_rgb)))
        items.append(Item(PRESERVATION, "background", grade(moved, 0.05, 0.15, False)
                          if out.background == src.background else 0))
    extra = len(o_objs) - sum(j >= 0 for j in match) - credited
    items += [Item(PRESERVATION, f"new object #{k + 1}", 0) for k in range(extra)]
    if extra == 0:
        items.append(Item(PRESERVATION, "no_new_objects", 2))
    return items, graded


def score_edit(
    source_image: np.ndarray | torch.Tensor, instruction: str | EditSpec, output_image: np.ndarray | torch.Tensor
) -> EditScore:
    """Score an edit output against its source image and instruction (see the module docstring)."""
    spec = parse_instruction(instruction) if isinstance(instruction, str) else instruction
    src, out = analyse(source_image), analyse(output_image)
    if src.size != out.size:
        raise UserError(f"source is {src.size} px but output is {out.size} px; they must match")
    quality_items = [i for i in image_items(out) if i.pillar in (QUALITY, FIDELITY)]
    edit, graded = edit_items(src, spec, out)
    items = edit + quality_items
    success = mean_points(i.value for i in items if i.pillar == SUCCESS) or 0.0
    preservation = mean_points(i.value for i in items if i.pillar == PRESERVATION)
    preservation = 100.0 if preservation is None else preservation
    pillars = [p for p in pillar_scores(quality_items, (QUALITY, FIDELITY)).values() if p is not None]
    quality = float(np.mean(pillars)) if pillars else 0.0
    overall = round((success * preservation * quality) ** (1.0 / 3.0), 9)  # 100.0, not 99.99999999999999
    return EditScore(float(overall), float(success), float(preservation), quality, items, 100.0 * graded)


def score_edit_batch(
    sources: torch.Tensor | Sequence[np.ndarray],
    instructions: Sequence[str | EditSpec],
    outputs: torch.Tensor | Sequence[np.ndarray],
) -> list[EditScore]:
    """`score_edit` over a batch (tensors [B, 3, H, W] or sequences of [H, W, 3] arrays)."""
    srcs, outs = as_images(sources), as_images(outputs)
    if not len(srcs) == len(outs) == len(instructions):
        raise UserError(f"got {len(srcs)} sources, {len(instructions)} instructions and {len(outs)} outputs")
    return [score_edit(s, i, o) for s, i, o in zip(srcs, instructions, outs, strict=True)]


def aggregate_edits(scores: Sequence[EditScore]) -> dict[str, float | int | None]:
    """Set means of overall, success, preservation and quality, plus "n"."""
    keys = ("overall", "success", "preservation", "quality")
    out: dict[str, float | int | None] = {
        k: (float(np.mean([getattr(s, k) for s in scores])) if scores else None) for k in keys
    }
    out["n"] = len(scores)
    return out
