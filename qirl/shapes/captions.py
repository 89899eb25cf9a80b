"""Captions: a small grammar with paraphrases, generated from scenes and parsed back into specs.

A caption names every object of its scene (so "no extra objects" is checkable), in groups of identical
(shape, colour) objects with a count ("two blue squares"); colour, size and background may be left out,
and the oracle then marks those checks N/A. Spatial captions add absolute positions ("on the left") and
relations ("to the left of"), stated only when they hold with margin `GEN_MARGIN` (see scene.py for the
geometry). Grammar, informally:

    caption  := [opener] clause ((',' | 'and' | ';' | '.') clause)* [background]
    clause   := np [position] [verb] [relation np | position]
    np       := det [size] [colour] shape [('that is' | 'which is' | 'in' | 'coloured') (colour | size)]
    det      := a | an | one | two | three | four | the      ('the' refers back to an earlier object)

Categories map onto the bench pillars: single (one object), multi (several objects, counting), spatial
(positions and relations), attribute (colour and size bound to each object), creative (a held-out
(shape, colour) pair, see `scene.HELDOUT`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from qirl.errors import UserError
from qirl.shapes import words as W
from qirl.shapes.caption_parse import (
    CaptionSpec,
    ObjectSpec,
    RelationSpec,
    parse_caption,
    spec_matches_scene,
)
from qirl.shapes.scene import (
    GEN_MARGIN,
    POSITIONS,
    SIZES,
    Scene,
    ShapeObject,
    is_heldout,
    place_objects,
    position_margin,
    random_pair,
    random_scene,
    relation_margin,
)

__all__ = [
    "CATEGORIES", "CaptionSpec", "ObjectSpec", "RelationSpec", "make_caption", "parse_caption",
    "random_t2i_record", "spec_matches_scene",
]

CATEGORIES: tuple[str, ...] = ("single", "multi", "spatial", "attribute", "creative")
_STYLES = ("multi", "spatial", "attribute")


# ----------------------------------------------------------------------------------------- generation


@dataclass
class _Group:
    objects: list[ShapeObject]
    color: bool = True  # mention the colour
    size: bool = False  # mention the size (all objects share it)
    position: str | None = None
    text: str = field(default="")

    @property
    def head(self) -> ShapeObject:
        return self.objects[0]


def _np(g: _Group, rng: np.random.Generator, definite: bool = False) -> str:
    """Noun phrase for a group, e.g. 'two small blue squares', 'a circle that is red', 'the red circle'."""
    o, n = g.head, len(g.objects)
    noun = W.pick(rng, W.SHAPE_WORDS[o.shape])
    noun = W.PLURALS[noun] if n > 1 else noun
    det = "the" if definite else W.pick(rng, W.COUNT_WORDS[n]) if rng.random() < 0.2 else W.COUNT_WORDS[n][0]
    size = W.pick(rng, W.SIZE_WORDS[o.size]) if g.size else None
    color = W.pick(rng, W.COLOR_WORDS[o.color]) if g.color else None
    form = 0 if definite else int(rng.integers(4))
    be = "are" if n > 1 else "is"
    if form == 1 and color:  # colour after the noun
        post = W.pick(rng, (f"that {be} {color}", f"which {be} {color}", f"in {color}", f"coloured {color}"))
        words = [det, size, noun, post]
    elif form == 2 and size and color:  # size after the noun
        words = [det, color, noun, f"that {be} {size}"]
    else:
        words = [det, size, color, noun]
    return " ".join(w for w in words if w)


def _position_phrase(g: _Group, rng: np.random.Generator) -> str:
    return f"{g.text} {W.pick(rng, W.POSITION_PHRASES[g.position])}" if g.position else g.text


def _clear_position(objs: list[ShapeObject], rng: np.random.Generator) -> str | None:
    """A region that every object of the group lies in with margin GEN_MARGIN, or None."""
    ok = [p for p in POSITIONS if all(position_margin(p, o.x, o.y) >= GEN_MARGIN for o in objs)]
    return W.pick(rng, ok) if ok else None


def _clear_relation(a: ShapeObject, b: ShapeObject, rng: np.random.Generator) -> str:
    ok = [r for r in W.RELATION_PHRASES if relation_margin(r, (a.x, a.y), (b.x, b.y)) >= GEN_MARGIN]
    if not ok:  # cannot happen for separated objects: some axis separates them by >= 0.25
        raise RuntimeError(f"no clear relation between {a} and {b}")
    return W.pick(rng, ok)


def _groups(scene: Scene, by_size: bool) -> list[_Group]:
    """Objects grouped by (shape, colour), or by (shape, colour, size); first-seen order."""
    out: dict[tuple[str, ...], _Group] = {}
    for o in scene.objects:
        key = (o.shape, o.color, o.size) if by_size else (o.shape, o.color)
        out.setdefault(key, _Group([])).objects.append(o)
    return list(out.values())


def _background(scene: Scene, rng: np.random.Generator, p: float) -> tuple[str, str]:
    """A background phrase for the end of the caption (or a final sentence), present with probability p."""
    if rng.random() >= p:
        return "", ""
    bg = W.pick(rng, W.BACKGROUND_WORDS[scene.background])
    forms = (f" on a {bg} background", f" against a {bg} background", f" against {bg}",
             f" with a {bg} background", f", on {bg}", f" on a plain {bg} backdrop")
    return W.pick(rng, forms), f". the background is {bg}"


def _opener(rng: np.random.Generator, plural: bool) -> str:
    there = "there are " if plural else "there is "
    return W.pick(rng, ("", "", "", "an image of ", "a picture of ", "a drawing of ", there))


def _spatial_body(groups: list[_Group], rng: np.random.Generator) -> str:
    """Positions for some groups, relations chaining the single objects; every group is mentioned."""
    singles = [g for g in groups if len(g.objects) == 1]
    absolute = len(singles) < 2 or rng.random() < 0.4
    if absolute:
        for g in groups:
            g.position = _clear_position(g.objects, rng)
    if len(singles) < 2 or (absolute and all(g.position or len(g.objects) > 1 for g in groups)):
        return W.join_list([_position_phrase(g, rng) for g in groups], rng)
    for g in groups:  # relations: chain the singles in random order
        g.position = None
    order = [singles[i] for i in rng.permutation(len(singles))]
    others = [g for g in groups if len(g.objects) > 1]
    rels = [(a, _clear_relation(a.head, b.head, rng), b) for a, b in itertools.pairwise(order)]
    if rng.random() < 0.5:  # inline: "X left of Y, and Z above the Y"
        parts = [f"{order[0].text} {W.pick(rng, W.RELATION_PHRASES[rels[0][1]])} {order[1].text}"]
        for a, rel, b in rels[1:]:  # a is already mentioned: describe b relative to it
            inverse = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[rel]
            parts.append(f"{b.text} {W.pick(rng, W.RELATION_PHRASES[inverse])} {_np(a, rng, definite=True)}")
        return W.join_list(parts + [g.text for g in others], rng)
    # sentences: "X, Y and Z. the X is left of the Y; the Y is above the Z"
    intro = W.join_list([g.text for g in groups], rng)
    facts = [
        f"{_np(a, rng, True)} {W.pick(rng, ('is ', ''))}{W.pick(rng, W.RELATION_PHRASES[rel])} {_np(b, rng, True)}"
        for a, rel, b in rels
    ]
    return intro + W.pick(rng, (". ", "; ")) + W.pick(rng, ("; ", ", and ", ". ")).join(facts)


def make_caption(scene: Scene, rng: np.random.Generator, category: str | None = None) -> str:
    """A random paraphrase describing every object of `scene` in the style of `category`.

    category=None picks one that fits: creative if the scene has a held-out pair, single for one
    object, else multi, spatial or attribute at random.
    """
    n = len(scene.objects)
    creative = any(is_heldout(o.shape, o.color) for o in scene.objects)
    if category is None:
        category = "creative" if creative else "single" if n == 1 else W.pick(rng, _STYLES)
    if category not in CATEGORIES:
        raise UserError(f"unknown caption category {category!r}; expected one of {', '.join(CATEGORIES)}")
    if n == 0:
        raise UserError("cannot caption a scene with no objects")
    if category == "single" and n != 1:
        raise UserError(f"category 'single' needs a one-object scene, got {n} objects")
    if category == "creative" and not creative:
        raise UserError("category 'creative' needs a scene with a held-out (shape, colour) pair")
    style = category if category != "creative" else "single" if n == 1 else W.pick(rng, _STYLES)
    if style == "single" and n > 1:
        style = "multi"
    groups = _groups(scene, by_size=style in ("attribute", "spatial"))
    for g in groups:
        same_size = len({o.size for o in g.objects}) == 1
        twins = sum(h.head.shape == g.head.shape and h.head.color == g.head.color for h in groups) > 1
        g.size = twins or (same_size and rng.random() < {"attribute": 1.0, "single": 0.5}.get(style, 0.3))
        g.color = not (style == "single" and category != "creative" and rng.random() < 0.15)
        g.text = _np(g, rng)
    order = [groups[i] for i in rng.permutation(len(groups))]
    body = _spatial_body(order, rng) if style == "spatial" else W.join_list([g.text for g in order], rng)
    bg_inline, bg_sentence = _background(scene, rng, 0.6)
    sentence_form = ". " in body or "; " in body
    caption = _opener(rng, len(order[0].objects) > 1) + body
    caption += bg_sentence if bg_inline and (sentence_form or rng.random() < 0.15) else bg_inline
    return W.fix_articles(caption)


# ------------------------------------------------------------------------------------ random records


def _scene_for(category: str, rng: np.random.Generator, split: str) -> Scene:
    """A scene suited to the category: duplicates for counting, shared shapes/colours for binding."""
    if category == "single":
        return random_scene(rng, 1, split)
    if category == "creative":
        return random_scene(rng, None, "creative")
    n = int(rng.integers(2, 5 if category == "multi" else 4))
    sizes = list(SIZES)
    attrs: list[tuple[str, str, str]] = []
    if category == "multi":  # one or two groups repeated, so counts matter
        while len(attrs) < n:
            shape, color = random_pair(rng, split)
            if any(a[:2] == (shape, color) for a in attrs):
                continue
            size = W.pick(rng, sizes)
            k = min(n - len(attrs), int(rng.integers(1, n + 1)))
            attrs += [(shape, color, size if rng.random() < 0.7 else W.pick(rng, sizes)) for _ in range(k)]
    else:  # spatial / attribute: distinct (shape, colour) pairs; attribute shares a shape or a colour
        shared = int(rng.integers(3)) if category == "attribute" else 2
        base = random_pair(rng, split)
        while len(attrs) < n:
            shape, color = random_pair(rng, split)
            shape = base[0] if shared == 0 else shape
            color = base[1] if shared == 1 else color
            if (shape, color) in [a[:2] for a in attrs] or is_heldout(shape, color):
                continue
            attrs.append((shape, color, W.pick(rng, sizes)))
    bg = W.pick(rng, ("black", "white", "gray"))
    scene = place_objects(rng, attrs, bg)
    assert scene is not None
    return scene


def random_t2i_record(rng: np.random.Generator, split: str = "train", category: str | None = None) -> dict:
    """{"prompt", "task": "t2i", "category", "scene"}: a caption and one valid scene it describes.

    split="train" draws single/multi/spatial/attribute (never a held-out pair); split="creative" draws
    category "creative" (at least one held-out pair).
    """
    if split not in ("train", "creative"):
        raise UserError(f"unknown split {split!r}; expected train or creative")
    if category is None:
        category = "creative" if split == "creative" else W.pick(rng, CATEGORIES[:4])
    if category not in CATEGORIES:
        raise UserError(f"unknown caption category {category!r}; expected one of {', '.join(CATEGORIES)}")
    if (category == "creative") != (split == "creative"):
        raise UserError(f"category {category!r} does not belong to split {split!r} (creative <-> creative)")
    scene = _scene_for(category, rng, split)
    return {"prompt": make_caption(scene, rng, category), "task": "t2i", "category": category,
            "scene": scene.to_dict()}
