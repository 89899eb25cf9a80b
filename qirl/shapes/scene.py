"""Scenes of the Shapes world: the vocabulary, the scene dataclasses, geometry and random sampling.

Everything the renderer draws, the captions describe and the oracle checks is defined here once, so the
three agree by construction. Coordinates are fractions of the image side: x grows to the right, y grows
downwards, (0.5, 0.5) is the centre. An object's (x, y) is the centre of its bounding box and its
"radius" r is half the side of that box, so every shape fits in the same 2r x 2r square:

- circle:   the disc of radius r;
- square:   the axis-aligned square of half-side r;
- triangle: apex up, vertices (0, -r), (r, r), (-r, r) around the centre (base 2r, height 2r);
- diamond:  vertices (0, +-r), (+-r, 0): a square of side r*sqrt(2) turned by 45 degrees.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from qirl.errors import UserError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")

# Seven hues far apart in RGB and far (>= 0.45) from every background, so colour segmentation can
# tell each object colour from the background and from the other colours even on anti-aliased edges.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.12),
    "orange": (1.00, 0.50, 0.00),
    "yellow": (0.95, 0.90, 0.10),
    "green": (0.15, 0.75, 0.20),
    "cyan": (0.10, 0.85, 0.90),
    "blue": (0.15, 0.30, 0.95),
    "purple": (0.60, 0.20, 0.85),
}

BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.0, 0.0, 0.0),
    "white": (1.0, 1.0, 1.0),
    "gray": (0.5, 0.5, 0.5),
}

# Radius as a fraction of the image side. At 32 px a small object is 4 px in radius (8 px across),
# large enough for the oracle to classify its shape; neighbouring classes differ by a factor ~1.35 in
# radius so the size class survives the oracle's area estimate with a wide margin.
SIZES: dict[str, float] = {"small": 0.125, "medium": 0.17, "large": 0.225}

# Area of each shape in units of r^2, and the circumradius (largest distance from the centre to the
# shape) in units of r, used for the non-overlap test.
AREA_FACTOR: dict[str, float] = {"circle": math.pi, "square": 4.0, "triangle": 2.0, "diamond": 2.0}
CIRCUMRADIUS: dict[str, float] = {"circle": 1.0, "square": math.sqrt(2.0), "triangle": math.sqrt(2.0), "diamond": 1.0}

EDGE_MARGIN = 0.05  # every bounding box keeps this distance from the frame (1.6 px at 32 px)
OBJECT_GAP = 0.08  # two objects are at least this far apart (2.6 px at 32 px): detection separates them

# (shape, colour) pairs never seen in split="train" and present in every split="creative" scene:
# 5 of the 28 pairs (~1/6), one per shape plus one more, never the same colour twice, so every shape
# and every colour still appears in training in other combinations.
HELDOUT: frozenset[tuple[str, str]] = frozenset(
    {("circle", "purple"), ("square", "orange"), ("triangle", "cyan"), ("diamond", "red"), ("triangle", "blue")}
)

SPLITS: tuple[str, ...] = ("train", "creative")

# Absolute positions and relations. Each has a signed margin (how far inside its region a point is,
# in image fractions). Captions and edits only state a position or relation whose margin is at least
# GEN_MARGIN; the oracle gives full credit from OK_MARGIN and partial credit above 0.
POSITIONS: tuple[str, ...] = (
    "left", "right", "top", "bottom", "centre", "top left", "top right", "bottom left", "bottom right",
)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
GEN_MARGIN = 0.15
OK_MARGIN = 0.05


def is_heldout(shape: str, color: str) -> bool:
    """True for the (shape, colour) pairs reserved for the creative split (see `HELDOUT`)."""
    return (shape, color) in HELDOUT


def position_margin(position: str, x: float, y: float) -> float:
    """Signed distance of (x, y) inside an absolute region.

    left: 0.5 - x; right: x - 0.5; top: 0.5 - y; bottom: y - 0.5; centre: 0.25 - max(|x-0.5|, |y-0.5|);
    a corner ("top left") is the smaller of its two sides' margins. So "on the left" as generated means
    x <= 0.35 and "in the centre" means within 0.1 of the middle on both axes.
    """
    side = {"left": 0.5 - x, "right": x - 0.5, "top": 0.5 - y, "bottom": y - 0.5}
    if position == "centre":
        return 0.25 - max(abs(x - 0.5), abs(y - 0.5))
    parts = position.split()
    if not parts or any(p not in side for p in parts):
        raise UserError(f"unknown position {position!r}; expected one of {', '.join(POSITIONS)}")
    return min(side[p] for p in parts)


def relation_margin(relation: str, a: tuple[float, float], b: tuple[float, float]) -> float:
    """Signed separation for "a <relation> b" along one axis (y grows downwards).

    left of: b.x - a.x; right of: a.x - b.x; above: b.y - a.y; below: a.y - b.y.
    """
    if relation == "left of":
        return b[0] - a[0]
    if relation == "right of":
        return a[0] - b[0]
    if relation == "above":
        return b[1] - a[1]
    if relation == "below":
        return a[1] - b[1]
    raise UserError(f"unknown relation {relation!r}; expected one of {', '.join(RELATIONS)}")


@dataclass(frozen=True)
class ShapeObject:
    """One filled shape; (x, y) is its bounding-box centre in image fractions."""

    shape: str
    color: str
    size: str
    x: float
    y: float

    @property
    def radius(self) -> float:
        """Half the side of the bounding box, as a fraction of the image side."""
        return SIZES[self.size]


@dataclass(frozen=True)
class Scene:
    """Objects on a plain background; the objects never overlap and stay inside the frame."""

    objects: tuple[ShapeObject, ...]
    background: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; `Scene.from_dict` inverts it exactly."""
        return {"background": self.background, "objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        """Rebuild a scene from `to_dict` output, checking every name against the vocabulary."""
        try:
            objects = tuple(
                ShapeObject(str(o["shape"]), str(o["color"]), str(o["size"]), float(o["x"]), float(o["y"]))
                for o in data["objects"]
            )
            scene = cls(objects, str(data["background"]))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"malformed scene dict ({type(e).__name__}: {e}): {data!r}") from None
        check_vocabulary(scene)
        return scene


def check_vocabulary(scene: Scene) -> None:
    """Raise `UserError` if a scene names a shape, colour, size or background qirl does not know."""
    if scene.background not in BACKGROUNDS:
        raise UserError(f"unknown background {scene.background!r}; expected one of {', '.join(BACKGROUNDS)}")
    for o in scene.objects:
        if o.shape not in SHAPES:
            raise UserError(f"unknown shape {o.shape!r}; expected one of {', '.join(SHAPES)}")
        if o.color not in COLORS:
            raise UserError(f"unknown colour {o.color!r}; expected one of {', '.join(COLORS)}")
        if o.size not in SIZES:
            raise UserError(f"unknown size {o.size!r}; expected one of {', '.join(SIZES)}")


def inside_frame(obj: ShapeObject, margin: float = EDGE_MARGIN) -> bool:
    """True if the object's bounding box keeps `margin` from every edge of the frame."""
    r = obj.radius
    return margin + r <= obj.x <= 1.0 - margin - r and margin + r <= obj.y <= 1.0 - margin - r


def separated(a: ShapeObject, b: ShapeObject, gap: float = OBJECT_GAP) -> bool:
    """True if the two shapes are at least `gap` apart.

    Two sufficient tests, either is enough: the bounding boxes are `gap` apart along one axis, or the
    circumscribed circles are (centre distance >= R_a + R_b + gap with R the circumradius).
    """
    ra, rb = a.radius, b.radius
    if abs(a.x - b.x) >= ra + rb + gap or abs(a.y - b.y) >= ra + rb + gap:
        return True
    dist = math.hypot(a.x - b.x, a.y - b.y)
    return dist >= CIRCUMRADIUS[a.shape] * ra + CIRCUMRADIUS[b.shape] * rb + gap


def is_valid(scene: Scene) -> bool:
    """Every object inside the frame and every pair separated: what detection needs to see them all."""
    objs = scene.objects
    if not all(inside_frame(o) for o in objs):
        return False
    return all(separated(objs[i], objs[j]) for i in range(len(objs)) for j in range(i + 1, len(objs)))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def random_pair(rng: np.random.Generator, split: str = "train") -> tuple[str, str]:
    """A (shape, colour) pair allowed in `split`: never held out for "train", any pair for "creative"."""
    _check_split(split)
    while True:
        pair = (SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))])
        if split == "creative" or pair not in HELDOUT:
            return pair


def random_heldout_pair(rng: np.random.Generator) -> tuple[str, str]:
    """One of the held-out pairs, uniformly."""
    pairs = sorted(HELDOUT)
    return pairs[rng.integers(len(pairs))]


def region_box(position: str | None, radius: float, margin: float = GEN_MARGIN) -> tuple[float, float, float, float]:
    """(x_lo, x_hi, y_lo, y_hi) of centres keeping the box in the frame and inside `position` by `margin`.

    Every region is an axis-aligned box (see `position_margin`), so sampling in it needs no rejection.
    The box is empty (lo > hi) when the object cannot fit there.
    """
    lo, hi = EDGE_MARGIN + radius, 1.0 - EDGE_MARGIN - radius
    box = [lo, hi, lo, hi]
    if position is None:
        return box[0], box[1], box[2], box[3]
    if position == "centre":
        c = 0.25 - margin
        return max(lo, 0.5 - c), min(hi, 0.5 + c), max(lo, 0.5 - c), min(hi, 0.5 + c)
    for part in position.split():
        if part == "left":
            box[1] = min(box[1], 0.5 - margin)
        elif part == "right":
            box[0] = max(box[0], 0.5 + margin)
        elif part == "top":
            box[3] = min(box[3], 0.5 - margin)
        elif part == "bottom":
            box[2] = max(box[2], 0.5 + margin)
        else:
            raise UserError(f"unknown position {position!r}; expected one of {', '.join(POSITIONS)}")
    return box[0], box[1], box[2], box[3]


def _free(xy: np.ndarray, shape: str, radius: float, placed: list[ShapeObject]) -> np.ndarray:
    """Vectorised `separated` of candidate centres xy [M, 2] against every placed object -> bool [M]."""
    ok = np.ones(len(xy), dtype=bool)  # [M]
    for o in placed:
        dx, dy = np.abs(xy[:, 0] - o.x), np.abs(xy[:, 1] - o.y)  # [M], [M]
        box = np.maximum(dx, dy) >= radius + o.radius + OBJECT_GAP
        circ = np.hypot(dx, dy) >= CIRCUMRADIUS[shape] * radius + CIRCUMRADIUS[o.shape] * o.radius + OBJECT_GAP
        ok &= box | circ
    return ok


def place_objects(
    rng: np.random.Generator,
    attrs: list[tuple[str, str, str]],
    background: str,
    fixed: tuple[ShapeObject, ...] = (),
    regions: list[str | None] | None = None,
    shrink: bool = True,
) -> Scene | None:
    """Rejection-sample positions for (shape, colour, size) triples around the `fixed` objects.

    Largest objects go first; each draws 256 candidate centres at once (inside the frame and inside its
    region, if any) and takes the first that clears every placed object. Ten attempts; if all fail and
    `shrink` is set, the largest new object drops one size class and sampling starts again. Returns the
    scene (fixed objects first, new ones in `attrs` order) or None if nothing fits.
    """
    attrs = list(attrs)
    regions = list(regions) if regions is not None else [None] * len(attrs)
    size_names = list(SIZES)
    while True:
        order = sorted(range(len(attrs)), key=lambda i: -SIZES[attrs[i][2]])
        for _ in range(10):
            placed = list(fixed)
            new: dict[int, ShapeObject] = {}
            for i in order:
                shape, color, size = attrs[i]
                r = SIZES[size]
                x_lo, x_hi, y_lo, y_hi = region_box(regions[i], r)
                if x_lo > x_hi or y_lo > y_hi:
                    break
                xy = rng.uniform((x_lo, y_lo), (x_hi, y_hi), size=(256, 2))  # [256, 2]
                hits = np.flatnonzero(_free(xy, shape, r, placed))
                if len(hits) == 0:
                    break
                new[i] = ShapeObject(shape, color, size, float(xy[hits[0], 0]), float(xy[hits[0], 1]))
                placed.append(new[i])
            else:
                return Scene(tuple(fixed) + tuple(new[i] for i in range(len(attrs))), background)
        if not shrink:
            return None
        big = next((i for i in order if attrs[i][2] != size_names[0]), None)
        if big is None:
            return None
        shape, color, size = attrs[big]
        attrs[big] = (shape, color, size_names[size_names.index(size) - 1])


def random_scene(
    rng: np.random.Generator,
    n_objects: int | None = None,
    split: str = "train",
    background: str | None = None,
) -> Scene:
    """A valid scene of 1-4 objects with random shapes, colours, sizes and positions.

    split="train" never uses a held-out (shape, colour) pair; split="creative" forces at least one
    (the first object) and lets the others be any pair.
    """
    _check_split(split)
    n = int(rng.integers(1, 5)) if n_objects is None else n_objects
    if not 1 <= n <= 4:
        raise UserError(f"n_objects must be 1-4, got {n}")
    attrs: list[tuple[str, str, str]] = []
    for i in range(n):
        shape, color = random_heldout_pair(rng) if split == "creative" and i == 0 else random_pair(rng, split)
        attrs.append((shape, color, list(SIZES)[rng.integers(len(SIZES))]))
    bg = background if background is not None else list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    scene = place_objects(rng, attrs, bg)
    assert scene is not None  # shrinking to all-small always fits four objects
    order = rng.permutation(len(scene.objects))
    return replace(scene, objects=tuple(scene.objects[i] for i in order))
