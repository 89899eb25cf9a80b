"""The Shapes oracle: text-to-image checklists in the style of Qwen-Image-Bench (and edit scoring).

This is the ground truth every RL gain in qirl is measured against. `score_t2i` parses the prompt,
detects the objects (detect.py), and scores checklist items 0/1/2 or N/A in five pillars. Quality,
Aesthetics and Real-world Fidelity judge the image alone (checklist.py); Alignment and Creative
Generation judge it against the prompt:

Alignment. Requested objects are expanded to instances ("two blue squares" -> two) and matched one to
one with detections maximising sim = 4 [shape right] + 4 [colour right] (+2 when the prompt gives no
colour) + [size right] + [position right], pairs needing the shape or a named colour right. Per
instance, named "<group>#<k>":
- shape: the matched detection has the requested shape 2, else (or unmatched) 0.
- colour: the requested colour 2, else 0; N/A if the prompt names no colour.
- size: the requested size class 2, the neighbouring class 1, else 0; N/A if no size is named.
- position: inside the region by >= OK_MARGIN 2, inside 1, else 0 (scene.position_margin); N/A if none.
Per group of count n > 1, "<group>: count": detections with its shape (and colour and size, if named):
exactly n 2, off by one 1, else 0. Per relation "<a> <relation> <b>": signed separation of the two
matched instances (scene.relation_margin) >= OK_MARGIN 2, > 0 1, else or unmatched 0.
"extra object: <detection>": one item scoring 0 per detection matched to no request (so clutter
cannot buy Alignment by offering every shape in every colour); "no_extra_objects" 2 when there is none.
"background": the nearest palette background is the requested one and within 0.1 of it 2, within
0.25 1, else 0; N/A if the prompt names no background.

Real-world Fidelity is asked per requested instance too, "<group>#<k>: geometry" and
"<group>#<k>: clear shape" (checklist.geometry_grades of the matched detection; 0 when unmatched), plus
the image-level "intact_objects"; so a clean picture of the wrong thing does not pass Fidelity.

Creative Generation (only prompts with a held-out (shape, colour) pair, else N/A): per held-out group,
"<group>: novel combination": a detection with exactly that shape and colour and template IoU >= 0.85
2, one with IoU below that 1, none 0.

Scores: 0/1/2 -> 0/60/100, N/A excluded; item -> pillar mean -> image overall = mean of the pillars
that apply; a set's score is the mean over images (per pillar over the images where it applies).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from qirl.errors import UserError
from qirl.shapes.captions import CaptionSpec, ObjectSpec, parse_caption
from qirl.shapes.checklist import (
    ALIGNMENT,
    CREATIVE,
    FIDELITY,
    PILLARS,
    Item,
    assign,
    geometry_grades,
    grade,
    image_items,
    pillar_scores,
)
from qirl.shapes.detect import Analysis, Detection, analyse, as_images, detect
from qirl.shapes.edit_oracle import EditScore, aggregate_edits, score_edit, score_edit_batch
from qirl.shapes.scene import OK_MARGIN, SIZES, position_margin, relation_margin

__all__ = [
    "PILLARS", "Detection", "EditScore", "Item", "OracleScore", "aggregate", "aggregate_edits", "detect",
    "score_edit", "score_edit_batch", "score_t2i", "score_t2i_batch", "t2i_items",
]

_SIZE_RANK = {s: i for i, s in enumerate(SIZES)}


@dataclass(frozen=True)
class OracleScore:
    """One image's checklist: overall 0-100, per-pillar means (None = N/A), and every item."""

    overall: float
    pillars: dict[str, float | None]
    items: list[Item]


def _describe(o: ObjectSpec) -> str:
    words = [str(o.count) if o.count > 1 else None, o.size, o.color, o.shape + ("s" if o.count > 1 else "")]
    return " ".join(w for w in words if w)


def _sim(o: ObjectSpec, d: Detection) -> float:
    shape, color = d.shape == o.shape, o.color is not None and d.color == o.color
    if not (shape or color):
        return 0.0
    s = 4.0 * shape + (4.0 * color if o.color is not None else 2.0)
    s += float(o.size == d.size) + float(o.position is not None and position_margin(o.position, d.x, d.y) > 0)
    return s


def t2i_items(an: Analysis, spec: CaptionSpec) -> list[Item]:
    """Alignment and Creative Generation items for an analysed image (see the module docstring)."""
    dets = an.objects
    slots = [(g, k) for g, o in enumerate(spec.objects) for k in range(o.count)]
    sim = np.array([[_sim(spec.objects[g], d) for d in dets] for g, _ in slots], dtype=np.float64)
    match = assign(sim.reshape(len(slots), len(dets)))
    items: list[Item] = []
    first: dict[int, Detection | None] = {}
    for (g, k), j in zip(slots, match, strict=True):
        o, d = spec.objects[g], dets[j] if j >= 0 else None
        first.setdefault(g, d)
        name = f"{_describe(o)}#{k + 1}"
        items.append(Item(ALIGNMENT, f"{name}: shape", 2 if d is not None and d.shape == o.shape else 0))
        items.append(Item(ALIGNMENT, f"{name}: colour",
                          None if o.color is None else 2 if d is not None and d.color == o.color else 0))
        if o.size is None:
            items.append(Item(ALIGNMENT, f"{name}: size", None))
        else:
            gap = abs(_SIZE_RANK[o.size] - _SIZE_RANK[d.size]) if d is not None else 9
            items.append(Item(ALIGNMENT, f"{name}: size", 2 if gap == 0 else 1 if gap == 1 else 0))
        pos = None
        if o.position is not None:
            pos = grade(position_margin(o.position, d.x, d.y), OK_MARGIN, 1e-9) if d is not None else 0
        items.append(Item(ALIGNMENT, f"{name}: position", pos))
        geo = geometry_grades(d.iou, d.margin) if d is not None else (0, 0)
        items.append(Item(FIDELITY, f"{name}: geometry", geo[0]))
        items.append(Item(FIDELITY, f"{name}: clear shape", geo[1]))
    for o in spec.objects:
        if o.count > 1:
            m = sum(d.shape == o.shape and o.color in (None, d.color) and o.size in (None, d.size) for d in dets)
            items.append(Item(ALIGNMENT, f"{_describe(o)}: count", 2 if m == o.count else 1 if abs(m - o.count) == 1 else 0))
    for r in spec.relations:
        a, b = first.get(r.subject), first.get(r.object)
        value = 0
        if a is not None and b is not None:
            value = grade(relation_margin(r.relation, (a.x, a.y), (b.x, b.y)), OK_MARGIN, 1e-9)
        items.append(Item(ALIGNMENT, f"{_describe(spec.objects[r.subject])} {r.relation} "
                                     f"{_describe(spec.objects[r.object])}", value))
    extra = [d for j, d in enumerate(dets) if j not in match]
    items += [Item(ALIGNMENT, f"extra object: {d.size} {d.color} {d.shape}", 0) for d in extra]
    if not extra:
        items.append(Item(ALIGNMENT, "no_extra_objects", 2))
    bg = None
    if spec.background is not None:
        bg = grade(an.background_dist, 0.1, 0.25, False) if an.background == spec.background else 0
    items.append(Item(ALIGNMENT, "background", bg))
    for g in spec.heldout:
        o = spec.objects[g]
        ious = [d.iou for d in dets if d.shape == o.shape and d.color == o.color]
        value = 0 if not ious else 2 if max(ious) >= 0.85 else 1
        items.append(Item(CREATIVE, f"{_describe(o)}: novel combination", value))
    if not spec.heldout:
        items.append(Item(CREATIVE, "novel combination", None))
    return items


def _score(items: list[Item]) -> OracleScore:
    pillars = pillar_scores(items)
    present = [v for v in pillars.values() if v is not None]
    return OracleScore(float(np.mean(present)) if present else 0.0, pillars, items)


def score_t2i(image: np.ndarray | torch.Tensor, prompt: str | CaptionSpec) -> OracleScore:
    """Checklist score of one image [S, S, 3] in [0, 1] against a caption (or a parsed spec)."""
    spec = parse_caption(prompt) if isinstance(prompt, str) else prompt
    an = analyse(image)
    return _score(image_items(an, geometry=False) + t2i_items(an, spec))


def score_t2i_batch(
    images: torch.Tensor | Sequence[np.ndarray], prompts: Sequence[str | CaptionSpec]
) -> list[OracleScore]:
    """`score_t2i` over a batch; parses each distinct prompt once."""
    imgs = as_images(images)
    if len(imgs) != len(prompts):
        raise UserError(f"got {len(imgs)} images but {len(prompts)} prompts")
    specs: dict[str, CaptionSpec] = {}
    out = []
    for im, p in zip(imgs, prompts, strict=True):
        if not isinstance(p, CaptionSpec) and p not in specs:
            specs[p] = parse_caption(p)
        out.append(score_t2i(im, p if isinstance(p, CaptionSpec) else specs[p]))
    return out


def aggregate(scores: Sequence[OracleScore]) -> dict[str, float | int | None]:
    """Set scores: {"overall": mean image overall, <pillar>: mean over images where it applies, "n"}."""
    out: dict[str, float | int | None] = {"overall": float(np.mean([s.overall for s in scores])) if scores else None}
    for p in PILLARS:
        vals = [s.pillars[p] for s in scores if s.pillars.get(p) is not None]
        out[p] = float(np.mean(vals)) if vals else None
    out["n"] = len(scores)
    return out
