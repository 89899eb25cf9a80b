"""Noiseless judgements of Shapes images at the report's four preference levels, with reasons.

The Qwen-Image-2.0-RL report's annotators judge pairs by a strict priority order: image-text
consistency > structural distortion > texture quality > aesthetic appeal. `judge_t2i` and
`judge_edit` read the oracle's checklist into those four levels on 0-100:

- consistency: T2I: the mean of the Alignment and (creative prompts only) Creative Generation pillars;
  edit: sqrt(success * preservation), the oracle's geometric mean without its quality factor, so an
  edit that was not done, or that wrecked the rest of the image, is inconsistent.
- distortion: the Real-world Fidelity pillar (well-formed, intact shapes; per requested object in T2I).
- texture: the Quality pillar (stray marks, palette colours, clean background, sharp edges).
- aesthetics: the Aesthetics pillar (inside the frame, contrast, spacing, object scale).

Per image also: `valid` (the oracle detects at least one object: a blank canvas or pure noise is not
a sample of anything), `figure_distortion` (some detected shape has regular_geometry 0 or is
fragmented / smeared: intact_objects < 2) and `reasons`, short phrases for every failed (0) or partial
(1) checklist item in level order, e.g. "the red circle is missing", "edges are blurry" (what a
chain-of-thought reward model learns to write). The annotator noise model on top of these lives in
`qirl.rewards.annotate`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qirl.shapes.checklist import (
    AESTHETICS,
    ALIGNMENT,
    CREATIVE,
    FIDELITY,
    QUALITY,
    Item,
    image_items,
    pillar_scores,
)
from qirl.shapes.detect import Analysis, analyse
from qirl.shapes.edit_oracle import PRESERVATION, SUCCESS, score_edit
from qirl.shapes.oracle import score_t2i
from qirl.shapes.scene import RELATIONS

LEVELS: tuple[str, ...] = ("consistency", "distortion", "texture", "aesthetics")


@dataclass(frozen=True)
class Truth:
    """The noiseless judgement of one image: the four levels on 0-100 and the auxiliary attributes."""

    consistency: float
    distortion: float
    texture: float
    aesthetics: float
    overall: float  # the oracle's own overall score
    valid: bool
    figure_distortion: bool
    reasons: tuple[str, ...] = ()

    @property
    def quality(self) -> float:
        """Latent of the Likert `quality` label: mean of the texture and aesthetics levels."""
        return 0.5 * (self.texture + self.aesthetics)

    def latent(self, dim: str) -> float:
        """Latent 0-100 score of a Likert dimension (quality, fidelity, alignment)."""
        return {"quality": self.quality, "fidelity": self.distortion, "alignment": self.consistency}[dim]


def _pillar(items: Sequence[Item], pillar: str, default: float = 100.0) -> float:
    value = pillar_scores(list(items), (pillar,))[pillar]
    return default if value is None else value


def _aux(an: Analysis) -> tuple[bool, bool, list[Item]]:
    """(valid, figure_distortion, image-level items) of one analysed image."""
    items = image_items(an, geometry=True)
    values = {i.name: i.value for i in items}
    valid = bool(an.objects)
    distorted = valid and (values["regular_geometry"] == 0 or values["intact_objects"] < 2)
    return valid, bool(distorted), items


def judge_t2i(image: np.ndarray, prompt: str) -> Truth:
    """Noiseless judgement of a text-to-image sample [S, S, 3] in [0, 1] (see the module docstring)."""
    score = score_t2i(image, prompt)
    valid, distorted, _ = _aux(analyse(image))
    consistency = [v for p, v in score.pillars.items() if p in (ALIGNMENT, CREATIVE) and v is not None]
    return Truth(
        consistency=float(np.mean(consistency)),
        distortion=_pillar(score.items, FIDELITY),
        texture=_pillar(score.items, QUALITY),
        aesthetics=_pillar(score.items, AESTHETICS),
        overall=float(score.overall),
        valid=valid,
        figure_distortion=distorted,
        reasons=tuple(reasons_from_items(score.items)),
    )


def judge_edit(source: np.ndarray, instruction: str, image: np.ndarray) -> Truth:
    """Noiseless judgement of an edit output [S, S, 3] against its source and instruction."""
    score = score_edit(source, instruction, image)
    valid, distorted, own = _aux(analyse(image))
    aesthetic = [i for i in own if i.pillar == AESTHETICS]
    return Truth(
        consistency=math.sqrt(score.success * score.preservation),
        distortion=_pillar(score.items, FIDELITY),
        texture=_pillar(score.items, QUALITY),
        aesthetics=_pillar(aesthetic, AESTHETICS),
        overall=float(score.overall),
        valid=valid,
        figure_distortion=distorted,
        reasons=tuple(reasons_from_items(score.items + aesthetic)),
    )


# -------------------------------------------------------------------------------------- reasons

_NUMBERS = {"2": "two", "3": "three", "4": "four", "5": "five", "6": "six"}
_IMAGE_REASONS: dict[str, tuple[str, str]] = {  # item name -> (phrase at 0, phrase at 1)
    "no_stray_marks": ("there are many stray marks", "there are a few stray marks"),
    "palette_colours": ("the colours are off", "the colours are slightly off"),
    "clean_background": ("the background is noisy or uneven", "the background is slightly noisy"),
    "sharp_edges": ("edges are blurry", "edges are slightly soft"),
    "inside_frame": ("an object is cut off by the frame", "an object touches the frame"),
    "contrast": ("an object barely stands out from the background", "the contrast is weak"),
    "spacing": ("objects touch or overlap", "objects are crowded together"),
    "object_scale": ("an object is far too small or too large", "an object is a bit too small or too large"),
    "regular_geometry": ("a shape is badly distorted", "a shape is slightly distorted"),
    "clear_shape": ("a shape is ambiguous", "a shape is slightly ambiguous"),
    "intact_objects": ("objects are broken into fragments", "an object is fragmented or smeared"),
}
_EDIT_REASONS: dict[str, tuple[str, str]] = {  # success item (the edit kind) -> (at 0, at 1)
    "recolour": ("the object was not recoloured", "the object got the wrong new colour"),
    "move": ("the object was not moved", "the object moved too little"),
    "add": ("the requested object was not added", "the added object has the wrong size or place"),
    "remove": ("the object was not removed", "the object was only partly removed"),
    "resize": ("the object was not resized", "the object was resized too little"),
    "background": ("the background was not changed", "the new background colour is off"),
}
_LEVEL_OF = {ALIGNMENT: 0, CREATIVE: 0, SUCCESS: 0, PRESERVATION: 0, FIDELITY: 1, QUALITY: 2, AESTHETICS: 3}
_RELATION = re.compile(rf"^(?P<a>.+) (?P<rel>{'|'.join(RELATIONS)}) (?P<b>.+)$")


def _words(desc: str) -> tuple[str, bool]:
    """An oracle object description in words, and whether it is plural ('2 blue squares' -> 'two ...')."""
    count, _, rest = desc.partition(" ")
    if count.isdigit():
        return f"{_NUMBERS.get(count, count)} {rest}", True
    return desc, False


def _the(desc: str) -> str:
    """'red circle' -> 'the red circle'; '2 blue squares' -> 'one of the two blue squares'."""
    words, plural = _words(desc)
    return f"one of the {words}" if plural else f"the {words}"


def _instance_reasons(name: str, attrs: dict[str, int | None]) -> tuple[list[str], list[str]]:
    """(consistency, distortion) phrases for one requested object instance ('<desc>#k') from its
    Alignment and Fidelity items; a missing object is one reason, not six."""
    who = _the(name.rsplit("#", 1)[0])
    shape, colour = attrs.get("shape"), attrs.get("colour")
    if shape == 0 and colour in (0, None):
        return [f"{who} is missing"], []
    align = []
    if shape == 0:
        align.append(f"{who} has the wrong shape")
    if colour == 0:
        align.append(f"{who} has the wrong colour")
    align += {0: [f"{who} is the wrong size"], 1: [f"{who} is slightly the wrong size"]}.get(
        attrs.get("size"), [])
    align += {0: [f"{who} is in the wrong place"], 1: [f"{who} is only just in the requested place"]}.get(
        attrs.get("position"), [])
    form = {0: [f"{who} is malformed"], 1: [f"{who} is slightly malformed"]}.get(attrs.get("geometry"), [])
    form += {0: [f"{who} does not clearly read as its shape"], 1: [f"{who} is a little ambiguous"]}.get(
        attrs.get("clear shape"), [])
    return align, form


def reasons_from_items(items: Sequence[Item]) -> list[str]:
    """Short phrases for every failed (0) or partial (1) checklist item, in the priority order of
    LEVELS (consistency, distortion, texture, aesthetics), without repeats."""
    by_level: list[list[str]] = [[] for _ in LEVELS]
    instances: dict[str, dict[str, int | None]] = {}
    for it in items:  # gather per-instance attributes first: a missing object is one reason, not six
        if "#" in it.name and ": " in it.name and it.pillar in (ALIGNMENT, FIDELITY):
            inst, attr = it.name.rsplit(": ", 1)
            instances.setdefault(inst, {})[attr] = it.value
    done: set[str] = set()
    for it in items:
        level = _LEVEL_OF.get(it.pillar)
        if level is None:
            continue
        name, value = it.name, it.value
        if "#" in name and ": " in name and it.pillar in (ALIGNMENT, FIDELITY):
            inst = name.rsplit(": ", 1)[0]
            if inst not in done:
                done.add(inst)
                align, form = _instance_reasons(inst, instances[inst])
                by_level[0] += align
                by_level[1] += form
            continue
        if value is None or value == 2:
            continue
        phrase: str | None = None
        if it.pillar == SUCCESS:
            phrase = _EDIT_REASONS.get(name, ("the edit was not done", "the edit was partly done"))[value]
        elif it.pillar == PRESERVATION:
            if name.startswith("keep "):
                what = name[len("keep "):].rsplit("#", 1)[0]
                phrase = (f"the {what} was not preserved", f"the {what} shifted or resized slightly")[value]
            elif name.endswith(": rest kept"):  # "<recoloured|moved|resized> <colour> <shape>: rest kept"
                what = name[: -len(": rest kept")].split(" ", 1)[-1]
                phrase = (f"the edited {what} changed beyond the edit",
                          f"the edited {what} drifted slightly beyond the edit")[value]
            elif name == "background":
                phrase = ("the background changed", "the background shifted slightly")[value]
            elif name.startswith("new object"):
                phrase = "an unrequested object appeared"
        elif name in _IMAGE_REASONS:
            phrase = _IMAGE_REASONS[name][value]
        elif name.startswith("extra object: "):
            phrase = f"there is an extra {name[len('extra object: '):]}"
        elif name == "background":
            phrase = ("the background is the wrong colour", "the background colour is slightly off")[value]
        elif name.endswith(": count"):
            desc = _words(name[: -len(": count")])[0]
            counts = (f"the count is wrong: expected {desc}", f"the count is off by one: expected {desc}")
            phrase = counts[value]
        elif name.endswith("novel combination"):
            desc = _words(name[: -len(": novel combination")])[0] or "object"
            phrase = (f"the novel {desc} is missing", f"the novel {desc} is poorly formed")[value]
        elif (m := _RELATION.match(name)) is not None:
            (a, plural), (b, _) = _words(m["a"]), _words(m["b"])
            rel, verb = m["rel"], "are" if plural else "is"
            phrase = (f"the {a} {verb} not {rel} the {b}", f"the {a} {verb} only barely {rel} the {b}")[value]
        if phrase is not None:
            by_level[level].append(phrase)
    return list(dict.fromkeys(p for level in by_level for p in level))
