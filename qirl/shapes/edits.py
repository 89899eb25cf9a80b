"""Edit instructions: six kinds of edit, as structured specs, paraphrased text, and applied to scenes.

An instruction refers to its object with the shortest description that is unique in the source scene
(sometimes a longer one, still unique), so the oracle can find it: "the circle" if there is one circle,
else "the red circle", else "the small red circle". Applying an edit changes exactly one thing and keeps
the scene valid (inside the frame, no overlap):

- recolour: the object's colour;           - move: its centre, by 0.15-0.35 along one axis;
- add: one new object (optionally in a region); - remove: one object (the scene keeps at least one);
- resize: its size class, centre kept;      - background: the background colour.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np

from qirl.errors import UserError
from qirl.shapes import words as W
from qirl.shapes.scene import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SIZES,
    Scene,
    ShapeObject,
    is_heldout,
    is_valid,
    place_objects,
    random_heldout_pair,
    random_pair,
    random_scene,
)

EDIT_KINDS: tuple[str, ...] = ("recolour", "move", "add", "remove", "resize", "background")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
DIRECTION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("to the left", "left", "leftwards", "further left"),
    "right": ("to the right", "right", "rightwards", "further right"),
    "up": ("up", "upwards", "higher", "towards the top"),
    "down": ("down", "downwards", "lower", "towards the bottom"),
}
_STEP = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}


@dataclass(frozen=True)
class ObjectRef:
    """How an instruction names an existing object; None attributes are not mentioned."""

    shape: str
    color: str | None = None
    size: str | None = None

    def matches(self, o: ShapeObject) -> bool:
        return o.shape == self.shape and self.color in (None, o.color) and self.size in (None, o.size)


@dataclass(frozen=True)
class EditSpec:
    """A parsed instruction. Fields unused by `kind` stay None.

    recolour: target, color. move: target, direction. add: shape, color, size?, position?.
    remove: target. resize: target and either change ("bigger" | "smaller") or size. background: background.
    """

    kind: str
    target: ObjectRef | None = None
    color: str | None = None
    direction: str | None = None
    size: str | None = None
    change: str | None = None
    shape: str | None = None
    position: str | None = None
    background: str | None = None


def find_target(scene: Scene, ref: ObjectRef) -> int:
    """Index of the one object `ref` names; `UserError` if none or several match."""
    hits = [i for i, o in enumerate(scene.objects) if ref.matches(o)]
    if len(hits) != 1:
        raise UserError(f"instruction names {len(hits)} objects matching {ref}, need exactly one")
    return hits[0]


def _refs(scene: Scene, i: int) -> list[ObjectRef]:
    """The unique descriptions of object i, shortest first (empty if it has an identical twin)."""
    o = scene.objects[i]
    levels = [ObjectRef(o.shape), ObjectRef(o.shape, o.color), ObjectRef(o.shape, o.color, o.size)]
    unique = [r for r in levels if sum(r.matches(p) for p in scene.objects) == 1]
    return unique


def apply_edit(scene: Scene, spec: EditSpec, rng: np.random.Generator) -> Scene | None:
    """The scene after `spec`, or None when it cannot be done validly (no room to move, grow or add).

    Random choices: the move distance (uniform in 0.15-0.35, up to 20 draws until one is valid), the
    added object's position, and its size when the instruction gives none.
    """
    objs = list(scene.objects)
    i = find_target(scene, spec.target) if spec.target is not None else -1
    if spec.kind == "recolour":
        objs[i] = replace(objs[i], color=spec.color)
    elif spec.kind == "move":
        sx, sy = _STEP[spec.direction]
        for _ in range(20):
            d = float(rng.uniform(0.15, 0.35))
            moved = replace(objs[i], x=objs[i].x + sx * d, y=objs[i].y + sy * d)
            if is_valid(Scene(tuple(objs[:i] + [moved] + objs[i + 1 :]), scene.background)):
                objs[i] = moved
                break
        else:
            return None
    elif spec.kind == "add":
        size = spec.size or W.pick(rng, list(SIZES))
        return place_objects(rng, [(spec.shape, spec.color, size)], scene.background, scene.objects,
                             [spec.position], shrink=False)
    elif spec.kind == "remove":
        del objs[i]
    elif spec.kind == "resize":
        names = list(SIZES)
        k = names.index(objs[i].size)
        k += 0 if spec.size else 1 if spec.change == "bigger" else -1
        new = spec.size or (names[k] if 0 <= k < len(names) else None)
        if new is None or new == objs[i].size:
            return None
        objs[i] = replace(objs[i], size=new)
    elif spec.kind == "background":
        return replace(scene, background=spec.background)
    else:
        raise UserError(f"unknown edit kind {spec.kind!r}; expected one of {', '.join(EDIT_KINDS)}")
    out = Scene(tuple(objs), scene.background)
    return out if is_valid(out) else None


# -------------------------------------------------------------------------------------- instruction text


def _ref_text(ref: ObjectRef, rng: np.random.Generator) -> str:
    parts = [W.pick(rng, W.SIZE_WORDS[ref.size]) if ref.size else None,
             W.pick(rng, W.COLOR_WORDS[ref.color]) if ref.color else None, W.pick(rng, W.SHAPE_WORDS[ref.shape])]
    return "the " + " ".join(p for p in parts if p)


def instruction_text(spec: EditSpec, rng: np.random.Generator) -> str:
    """A random paraphrase of `spec`; `parse_instruction` maps every paraphrase back to `spec`."""
    ref = _ref_text(spec.target, rng) if spec.target else ""
    k = spec.kind
    if k == "recolour":
        c = W.pick(rng, W.COLOR_WORDS[spec.color])
        forms = (f"make {ref} {c}", f"turn {ref} {c}", f"paint {ref} {c}", f"recolour {ref} {c}",
                 f"change the colour of {ref} to {c}", f"colour {ref} {c}")
    elif k == "move":
        d = W.pick(rng, DIRECTION_PHRASES[spec.direction])
        forms = (f"move {ref} {d}", f"shift {ref} {d}", f"slide {ref} {d}", f"push {ref} {d}")
    elif k == "add":
        size = W.pick(rng, W.SIZE_WORDS[spec.size]) + " " if spec.size else ""
        obj = f"a {size}{W.pick(rng, W.COLOR_WORDS[spec.color])} {W.pick(rng, W.SHAPE_WORDS[spec.shape])}"
        pos = " " + W.pick(rng, W.POSITION_PHRASES[spec.position]) if spec.position else ""
        forms = tuple(f"{v} {obj}{pos}" for v in ("add", "put", "place", "draw", "insert"))
    elif k == "remove":
        forms = tuple(f"{v} {ref}" for v in ("remove", "delete", "erase", "take away", "get rid of"))
    elif k == "resize" and spec.change == "bigger":
        forms = (f"make {ref} bigger", f"make {ref} larger", f"enlarge {ref}", f"increase the size of {ref}")
    elif k == "resize" and spec.change == "smaller":
        forms = (f"make {ref} smaller", f"shrink {ref}", f"reduce the size of {ref}")
    elif k == "resize":
        s = W.pick(rng, W.SIZE_WORDS[spec.size])
        forms = (f"make {ref} {s}", f"resize {ref} to {s}", f"change the size of {ref} to {s}")
    elif k == "background":
        b = W.pick(rng, W.BACKGROUND_WORDS[spec.background])
        forms = (f"change the background to {b}", f"make the background {b}", f"set the background to {b}",
                 f"replace the background with {b}", f"use a {b} background", f"turn the background {b}")
    else:
        raise UserError(f"unknown edit kind {k!r}; expected one of {', '.join(EDIT_KINDS)}")
    text = W.fix_articles(W.pick(rng, forms))
    return ("please " if rng.random() < 0.1 else "") + text + ("." if rng.random() < 0.3 else "")


# ------------------------------------------------------------------------------------------- random


def _random_spec(scene: Scene, kind: str, rng: np.random.Generator, split: str) -> EditSpec | None:
    """An edit of `kind` for `scene`, or None if the scene does not allow one."""
    if kind == "background":
        return EditSpec("background", background=W.pick(rng, [b for b in BACKGROUNDS if b != scene.background]))
    if kind == "add":
        if len(scene.objects) >= 4:
            return None
        shape, color = random_heldout_pair(rng) if split == "creative" else random_pair(rng, split)
        size = W.pick(rng, list(SIZES)) if rng.random() < 0.5 else None
        position = W.pick(rng, POSITIONS) if rng.random() < 0.5 else None
        return EditSpec("add", shape=shape, color=color, size=size, position=position)
    candidates = [i for i in range(len(scene.objects)) if _refs(scene, i)]
    if not candidates or (kind == "remove" and len(scene.objects) < 2):
        return None
    i = candidates[int(rng.integers(len(candidates)))]
    refs = _refs(scene, i)
    ref = refs[0] if rng.random() < 0.5 else refs[int(rng.integers(len(refs)))]
    o = scene.objects[i]
    if kind == "recolour":
        ok = [c for c in COLORS if c != o.color and is_heldout(o.shape, c) == (split == "creative")]
        return EditSpec("recolour", ref, color=W.pick(rng, ok)) if ok else None
    if kind == "move":
        return EditSpec("move", ref, direction=W.pick(rng, DIRECTIONS))
    if kind == "remove":
        return EditSpec("remove", ref)
    if kind == "resize":
        if rng.random() < 0.6:
            return EditSpec("resize", ref, change=W.pick(rng, ("bigger", "smaller")))
        return EditSpec("resize", ref, size=W.pick(rng, [s for s in SIZES if s != o.size]))
    raise UserError(f"unknown edit kind {kind!r}; expected one of {', '.join(EDIT_KINDS)}")


def random_edit_record(rng: np.random.Generator, split: str = "train", kind: str | None = None) -> dict:
    """{"prompt", "task": "edit", "category": "edit_<kind>", "source_scene", "target_scene"}.

    split="train": neither scene holds a held-out pair. split="creative": the source holds none and the
    edit (a recolour or an add) creates one, testing held-out combinations in editing.
    """
    if split not in ("train", "creative"):
        raise UserError(f"unknown split {split!r}; expected train or creative")
    kinds = ("recolour", "add") if split == "creative" else EDIT_KINDS
    if kind is not None and kind not in kinds:
        raise UserError(f"edit kind {kind!r} is not available for split {split!r}; expected one of {kinds}")
    k = kind or W.pick(rng, kinds)
    while True:  # a fresh source until the edit fits (moves and growth need free space)
        n = int(rng.integers(2 if k == "remove" else 1, 4 if k == "add" else 5))
        source = random_scene(rng, n, "train")
        spec = _random_spec(source, k, rng, split)
        target = apply_edit(source, spec, rng) if spec is not None else None
        if target is None:
            continue
        return {"prompt": instruction_text(spec, rng), "task": "edit", "category": f"edit_{k}",
                "source_scene": source.to_dict(), "target_scene": target.to_dict()}


# ------------------------------------------------------------------------------------------- parsing

_SHAPE, _COLOR, _SIZE = W.alternation(list(W.SHAPE_OF)), W.alternation(list(W.COLOR_OF)), W.alternation(list(W.SIZE_OF))
_BGW = W.alternation(list(W.BACKGROUND_OF))
_REF = rf"the (?:(?P<rsize>{_SIZE}) )?(?:(?P<rcolor>{_COLOR}) )?(?P<rshape>{_SHAPE})"
_DIR = W.alternation([p for ps in DIRECTION_PHRASES.values() for p in ps])
_POS = W.alternation([p for ps in W.POSITION_PHRASES.values() for p in ps])
_PATTERNS: tuple[tuple[str, str], ...] = (
    ("background", rf"(?:change|set|turn|make|switch) the background (?:to |into )?(?:an? )?(?P<bg>{_BGW})"),
    ("background", rf"replace the background with (?:an? )?(?P<bg>{_BGW})"),
    ("background", rf"use an? (?P<bg>{_BGW}) background"),
    ("recolour", rf"(?:make|turn|paint|recolour|colour) {_REF} (?P<color>{_COLOR})"),
    ("recolour", rf"change the colour of {_REF} to (?P<color>{_COLOR})"),
    ("move", rf"(?:move|shift|slide|push) {_REF} (?P<dir>{_DIR})"),
    ("add", rf"(?:add|put|place|draw|insert) (?:an?|one) (?:(?P<size>{_SIZE}) )?(?P<color>{_COLOR}) "
            rf"(?P<shape>{_SHAPE})(?: (?P<pos>{_POS}))?"),
    ("remove", rf"(?:remove|delete|erase|take away|get rid of) {_REF}"),
    ("resize", rf"make {_REF} (?P<change>bigger|larger|smaller)"),
    ("resize", rf"(?P<verb>enlarge|shrink) {_REF}"),
    ("resize", rf"(?P<verb>increase|reduce) the size of {_REF}"),
    ("resize", rf"(?:make|resize|change the size of) {_REF} (?:to )?(?P<size>{_SIZE})"),
)
_COMPILED = tuple((k, re.compile(rf"^(?:please )?{p}(?: [.!])?$")) for k, p in _PATTERNS)
_POSITION_OF = {p: k for k, ps in W.POSITION_PHRASES.items() for p in ps}
_DIRECTION_OF = {p: k for k, ps in DIRECTION_PHRASES.items() for p in ps}


def parse_instruction(text: str) -> EditSpec:
    """Parse any instruction `instruction_text` can produce into an `EditSpec`; `UserError` otherwise."""
    s = W.normalise(text) if isinstance(text, str) else ""
    for kind, pattern in _COMPILED:
        m = pattern.match(s)
        if m is None:
            continue
        g = {k: v for k, v in m.groupdict().items() if v is not None}
        target = ObjectRef(W.SHAPE_OF[g["rshape"]], W.COLOR_OF.get(g.get("rcolor", "")),
                           W.SIZE_OF.get(g.get("rsize", ""))) if "rshape" in g else None
        if kind == "background":
            return EditSpec("background", background=W.BACKGROUND_OF[g["bg"]])
        if kind == "recolour":
            return EditSpec("recolour", target, color=W.COLOR_OF[g["color"]])
        if kind == "move":
            return EditSpec("move", target, direction=_DIRECTION_OF[g["dir"]])
        if kind == "add":
            return EditSpec("add", shape=W.SHAPE_OF[g["shape"]], color=W.COLOR_OF[g["color"]],
                            size=W.SIZE_OF.get(g.get("size", "")), position=_POSITION_OF.get(g.get("pos", "")))
        if kind == "remove":
            return EditSpec("remove", target)
        change = g.get("change") or {"enlarge": "bigger", "increase": "bigger"}.get(g.get("verb", ""), "smaller")
        if "size" in g:
            return EditSpec("resize", target, size=W.SIZE_OF[g["size"]])
        return EditSpec("resize", target, change="bigger" if change in ("bigger", "larger") else "smaller")
    raise UserError(f"cannot parse edit instruction {text!r}: expected e.g. 'make the red circle blue', "
                    "'move the square to the left', 'remove the green triangle' or 'change the background to white'")
