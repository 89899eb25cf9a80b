"""The words of the Shapes world: synonyms for every concept, shared by captions, edits and parsers.

Generators draw a random synonym; parsers map every synonym back. Keeping both directions in one table
is what makes "parse(make_caption(scene))" hold for every paraphrase.
"""

from __future__ import annotations

import re

import numpy as np

from qirl.shapes.scene import BACKGROUNDS, COLORS, POSITIONS, RELATIONS, SHAPES, SIZES

SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc"),
    "square": ("square",),
    "triangle": ("triangle",),
    "diamond": ("diamond", "rhombus"),
}
PLURALS: dict[str, str] = {
    "circle": "circles", "disc": "discs", "square": "squares", "triangle": "triangles",
    "diamond": "diamonds", "rhombus": "rhombuses",
}
COLOR_WORDS: dict[str, tuple[str, ...]] = {c: (c,) for c in COLORS} | {
    "purple": ("purple", "violet"),
    "cyan": ("cyan", "turquoise"),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little"),
    "medium": ("medium", "medium-sized"),
    "large": ("large", "big"),
}
BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {b: (b,) for b in BACKGROUNDS} | {"gray": ("gray", "grey")}
NUMBER_WORDS: dict[str, int] = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}
COUNT_WORDS: dict[int, tuple[str, ...]] = {1: ("a", "one"), 2: ("two",), 3: ("three",), 4: ("four",)}

POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "on the left side", "at the left"),
    "right": ("on the right", "on the right side", "at the right"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "centre": ("in the centre", "in the middle", "at the centre"),
    "top left": ("in the top left corner", "at the top left", "in the upper left"),
    "top right": ("in the top right corner", "at the top right", "in the upper right"),
    "bottom left": ("in the bottom left corner", "at the bottom left", "in the lower left"),
    "bottom right": ("in the bottom right corner", "at the bottom right", "in the lower right"),
}
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("to the left of", "left of", "on the left side of"),
    "right of": ("to the right of", "right of", "on the right side of"),
    "above": ("above", "over", "higher than"),
    "below": ("below", "under", "beneath", "lower than"),
}
assert set(SHAPE_WORDS) == set(SHAPES) and set(SIZE_WORDS) == set(SIZES)
assert set(POSITION_PHRASES) == set(POSITIONS) and set(RELATION_PHRASES) == set(RELATIONS)


def _invert(table: dict[str, tuple[str, ...]]) -> dict[str, str]:
    return {w: k for k, words in table.items() for w in words}


SHAPE_OF: dict[str, str] = _invert(SHAPE_WORDS) | {PLURALS[w]: k for k, ws in SHAPE_WORDS.items() for w in ws}
COLOR_OF: dict[str, str] = _invert(COLOR_WORDS)
SIZE_OF: dict[str, str] = _invert(SIZE_WORDS)
BACKGROUND_OF: dict[str, str] = _invert(BACKGROUND_WORDS)


def pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    """One option, uniformly."""
    return options[int(rng.integers(len(options)))]


def normalise(text: str) -> str:
    """Lower-case, American spellings to British ones, punctuation split off, single spaces."""
    s = text.lower().strip()
    for a, b in (("center", "centre"), ("grey", "gray"), ("colored", "coloured"), ("color", "colour")):
        s = s.replace(a, b)
    s = re.sub(r"([,;.!])", r" \1 ", s)
    return re.sub(r"\s+", " ", s).strip()


def alternation(words: list[str] | tuple[str, ...]) -> str:
    """A regex group matching any of the words or phrases, longest first, on word boundaries."""
    return r"(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + r")"


def fix_articles(text: str) -> str:
    """'a orange' -> 'an orange', 'a image' -> 'an image' (the article follows the next word's sound)."""
    return re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", r"\1n ", text)


def join_list(items: list[str], rng: np.random.Generator) -> str:
    """'A', 'A and B', 'A, B and C' (Oxford comma at random)."""
    if len(items) == 1:
        return items[0]
    tail = ", and " if len(items) > 2 and rng.random() < 0.3 else " and "
    return ", ".join(items[:-1]) + tail + items[-1]
