"""Parsing captions back into structured specs: what the oracle checks an image against.

`parse_caption` accepts every paraphrase that captions.py generates (grammar in its docstring) and
raises `UserError` for anything else. Multi-word phrases (positions, relations) become single marker
tokens first, the background phrase is cut out, and a token walker reads noun phrases, positions and
relations; "the <object>" refers back to an earlier object and must be unambiguous.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from qirl.errors import UserError
from qirl.shapes import words as W
from qirl.shapes.scene import GEN_MARGIN, Scene, is_heldout, position_margin, relation_margin


@dataclass(frozen=True)
class ObjectSpec:
    """A group of `count` identical requested objects; None means the caption does not say."""

    shape: str
    color: str | None = None
    size: str | None = None
    count: int = 1
    position: str | None = None


@dataclass(frozen=True)
class RelationSpec:
    """`objects[subject]` <relation> `objects[object]`; both groups have count 1."""

    subject: int
    relation: str
    object: int


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption asks for."""

    objects: tuple[ObjectSpec, ...]
    relations: tuple[RelationSpec, ...] = ()
    background: str | None = None

    @property
    def n_instances(self) -> int:
        return sum(o.count for o in self.objects)

    @property
    def heldout(self) -> tuple[int, ...]:
        """Indices of groups asking for a held-out (shape, colour) pair: the creative items."""
        return tuple(i for i, o in enumerate(self.objects) if o.color is not None and is_heldout(o.shape, o.color))


_BG = W.alternation(list(W.BACKGROUND_OF))
_BG_PATTERNS = (
    rf"(?:[.;,] )?the background is (?P<bg>{_BG})",
    rf"(?:, )?(?:on|against|over|with|in front of) (?:an? )?(?:plain )?(?P<bg>{_BG})(?: background| backdrop)?",
    rf"(?:, )?(?:an? )?(?P<bg>{_BG}) (?:background|backdrop)",
)
_OPENER = r"^(?:an? (?:image|picture|drawing|render|illustration) (?:of|showing|with) |there (?:is|are) )"
_PHRASES = {p: "@pos:" + k.replace(" ", "_") for k, ps in W.POSITION_PHRASES.items() for p in ps} | {
    p: "@rel:" + k.replace(" ", "_") for k, ps in W.RELATION_PHRASES.items() for p in ps
}
_PHRASE_RE = re.compile(r"\b" + W.alternation(list(_PHRASES)) + r"\b")
_FILLERS = {"is", "are", "sits", "sit", "lies", "lie", "located", "placed", "also", "there"}
_SEPARATORS = {",", ";", ".", "!", "and"}


def _extract_background(s: str) -> tuple[str, str | None]:
    for pattern in _BG_PATTERNS:
        m = re.search(pattern, s)
        if m:
            s = (s[: m.start()] + " " + s[m.end() :]).strip()
            if re.search(rf"\b{_BG}\b", s):
                raise UserError(f"caption names more than one background: {s!r}")
            return s, W.BACKGROUND_OF[m.group("bg")]
    return s, None


class _Parser:
    """Token walker; see the grammar in the module docstring."""

    def __init__(self, text: str, tokens: list[str]) -> None:
        self.text, self.toks, self.i = text, tokens, 0
        self.groups: list[dict] = []
        self.relations: list[RelationSpec] = []

    def fail(self, why: str) -> UserError:
        return UserError(f"cannot parse caption {self.text!r}: {why}")

    def peek(self, k: int = 0) -> str | None:
        return self.toks[self.i + k] if self.i + k < len(self.toks) else None

    def noun_phrase(self) -> int:
        """Parse one noun phrase at the cursor; return the index of its (new or referenced) group."""
        g: dict = {"count": 1, "definite": False, "color": None, "size": None}
        t = self.peek()
        if t in W.NUMBER_WORDS or t == "the":
            g["count"], g["definite"] = W.NUMBER_WORDS.get(t, 1), t == "the"
            self.i += 1
        while (t := self.peek()) is not None and (t in W.SIZE_OF or t in W.COLOR_OF):
            self._set(g, "size" if t in W.SIZE_OF else "color", W.SIZE_OF.get(t) or W.COLOR_OF[t])
            self.i += 1
        if t not in W.SHAPE_OF:
            raise self.fail(f"expected a shape ({', '.join(W.SHAPE_OF)}) but found {t!r}")
        g["shape"] = W.SHAPE_OF[t]
        self.i += 1
        t, t1, t2 = self.peek(), self.peek(1), self.peek(2)
        if t in ("that", "which") and t1 in ("is", "are") and t2 is not None:
            self._attribute(g, t2, 3)
        elif t in ("in", "coloured") and t1 in W.COLOR_OF:
            self._attribute(g, t1, 2)
        return self._resolve(g)

    def _attribute(self, g: dict, word: str, n_tokens: int) -> None:
        if word in W.COLOR_OF:
            self._set(g, "color", W.COLOR_OF[word])
        elif word in W.SIZE_OF:
            self._set(g, "size", W.SIZE_OF[word])
        else:
            raise self.fail(f"expected a colour or size after 'that is', found {word!r}")
        self.i += n_tokens

    def _set(self, g: dict, key: str, value: str) -> None:
        if g[key] is not None and g[key] != value:
            raise self.fail(f"one object with two {key}s ({g[key]}, {value})")
        g[key] = value

    def _resolve(self, g: dict) -> int:
        spec = ObjectSpec(g["shape"], g["color"], g["size"], g["count"])
        if g["definite"]:
            hits = [
                i for i, h in enumerate(self.groups)
                if h["spec"].shape == spec.shape
                and spec.color in (None, h["spec"].color)
                and spec.size in (None, h["spec"].size)
            ]
            if len(hits) > 1:
                raise self.fail(f"'the {spec.shape}' could mean {len(hits)} different objects")
            if hits:
                return hits[0]
        self.groups.append({"spec": spec, "position": None})
        return len(self.groups) - 1

    def position(self, idx: int, pos: str) -> None:
        old = self.groups[idx]["position"]
        if old is not None and old != pos:
            raise self.fail(f"two positions ({old}, {pos}) for one object")
        self.groups[idx]["position"] = pos

    def parse(self) -> CaptionSpec:
        last: int | None = None
        pending: tuple[int, str] | None = None
        while (t := self.peek()) is not None:
            if t in _SEPARATORS or t in _FILLERS:
                if t in _SEPARATORS and pending is not None:
                    raise self.fail(f"relation '{pending[1]}' has no second object")
                last = None if t in _SEPARATORS else last
                self.i += 1
            elif t.startswith("@pos:"):
                if last is None:
                    raise self.fail(f"position '{t[5:]}' does not follow an object")
                self.position(last, t[5:].replace("_", " "))
                self.i += 1
            elif t.startswith("@rel:"):
                if last is None or pending is not None:
                    raise self.fail(f"relation '{t[5:]}' does not follow an object")
                pending, last = (last, t[5:].replace("_", " ")), None
                self.i += 1
            elif t in W.NUMBER_WORDS or t == "the" or t in W.SIZE_OF or t in W.COLOR_OF or t in W.SHAPE_OF:
                if last is not None:
                    raise self.fail(f"two objects without 'and' between them near {t!r}")
                last = self.noun_phrase()
                if pending is not None:
                    self.relations.append(RelationSpec(pending[0], pending[1], last))
                    pending = None
            else:
                raise self.fail(f"unknown word {t!r}")
        if pending is not None:
            raise self.fail(f"relation '{pending[1]}' has no second object")
        if not self.groups:
            raise self.fail("no object (a shape such as 'circle') found")
        objects = tuple(
            ObjectSpec(g["spec"].shape, g["spec"].color, g["spec"].size, g["spec"].count, g["position"])
            for g in self.groups
        )
        for r in self.relations:
            if objects[r.subject].count != 1 or objects[r.object].count != 1 or r.subject == r.object:
                raise self.fail("a relation needs one single object on each side")
        return CaptionSpec(objects, tuple(self.relations))


def parse_caption(text: str) -> CaptionSpec:
    """Parse any caption of the grammar (every paraphrase) into a `CaptionSpec`; `UserError` otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"cannot parse caption {text!r}: empty")
    s, background = _extract_background(W.normalise(text))
    s = re.sub(_OPENER, "", s)
    s = _PHRASE_RE.sub(lambda m: " " + _PHRASES[m.group(0)] + " ", s)
    spec = _Parser(text, s.split()).parse()
    return CaptionSpec(spec.objects, spec.relations, background)


def spec_matches_scene(spec: CaptionSpec, scene: Scene, margin: float = GEN_MARGIN) -> bool:
    """True if some one-to-one assignment of scene objects to requested instances satisfies everything.

    Checks counts, shape, colour and size where given, positions and relations with `margin`, and
    the background where given. Brute force over permutations: scenes have at most four objects.
    """
    if spec.background not in (None, scene.background) or spec.n_instances != len(scene.objects):
        return False
    slots = [i for i, o in enumerate(spec.objects) for _ in range(o.count)]
    for perm in itertools.permutations(scene.objects):
        ok = all(
            o.shape == spec.objects[g].shape
            and spec.objects[g].color in (None, o.color)
            and spec.objects[g].size in (None, o.size)
            and (spec.objects[g].position is None or position_margin(spec.objects[g].position, o.x, o.y) >= margin)
            for o, g in zip(perm, slots, strict=True)
        )
        first = {g: perm[slots.index(g)] for g in set(slots)}
        if ok and all(
            relation_margin(r.relation, (first[r.subject].x, first[r.subject].y),
                            (first[r.object].x, first[r.object].y)) >= margin
            for r in spec.relations
        ):
            return True
    return False
