"""Synthetic human-like annotations of Shapes images, to train reward models the way the report does.

The Qwen-Image-2.0-RL report trains its VLM reward models on human annotations of AIGC images: a
pointwise set (5-point Likert ratings of Quality and Fidelity) and a pairwise set (same-prompt pairs
judged by the strict priority order image-text consistency > structural distortion > texture quality >
aesthetic appeal, with auxiliary labels for sample validity, text distortion and human-figure
distortion), both drawn from ONE image pool so that the comparison isolates the training paradigm.
This module builds the Shapes analogue, with the oracle as the annotators' eyes and a stated noise
model as their hands.

Image pool (per prompt, `samples_per_prompt` images). The base model's own samples at every
(CFG scale, step count) of the config, cycled over the prompts so each prompt sees a spread (few steps
and no guidance give poor images, many steps and guidance good ones), plus perturbed renders of the
ground-truth scene: the clean render, Gaussian blur, pixel noise, a colour shift, a wrong / missing /
extra object, a distorted (warped or fragmented) shape, and for edits the unchanged source (an edit
that was not done). Edits use the instruction's target scene as the ground truth. Every image is
quantised to 8 bits before it is judged, so the labels describe exactly the PNG a trainer reads.
Cost: the model samples dominate. A sample at guidance g and n steps costs n forwards, 2n when g > 1
(one batched [cond; uncond] pass); the default grid averages 18.9 image-forwards per sample, so the
default pool (1200 samples + 1200 renders) is ~22,600 image-forwards of the tiny DiT.

Truth (`judge_t2i`, `judge_edit`): the oracle's pillars on 0-100, grouped into the report's four levels:
- consistency: T2I: the mean of the Alignment and (creative prompts only) Creative Generation pillars;
  edit: sqrt(success * preservation), the oracle's geometric mean without its quality factor, so an
  edit that was not done, or that wrecked the rest of the image, is inconsistent.
- distortion: the Real-world Fidelity pillar (well-formed, intact shapes; per requested object in T2I).
- texture: the Quality pillar (stray marks, palette colours, clean background, sharp edges).
- aesthetics: the Aesthetics pillar (inside the frame, contrast, spacing, object scale).
Per image also: `valid` (the oracle detects at least one object: a blank canvas or pure noise is not
a sample of anything), `figure_distortion` (some detected shape has regular_geometry 0 or is
fragmented / smeared: intact_objects < 2) and `reasons`, short phrases for every failed (0) or partial
(1) checklist item in level order, e.g. "the red circle is missing", "edges are blurry".

The annotator model. Pointwise labels: the latent score of a dimension (quality = mean of texture and
aesthetics; fidelity = distortion; alignment = consistency) is perceived with Gaussian noise,
s' = s + N(0, likert_noise^2) on the 0-100 scale, cut into 1..5 at LIKERT_CUTS

    1: s' < 25    2: 25 <= s' < 50    3: 50 <= s' < 75    4: 75 <= s' < 95    5: s' >= 95

(5 is reserved for a flawless image: one partial item out of four already gives 90), and with
probability `slip_rate` the annotator then slips one point up or down (inwards at 1 and 5). Pairwise
labels follow the priority order exactly (`prefer`): the first level, in order, whose difference
|a - b| reaches `tie_threshold` points decides (label 1.0 when a is better, 0.0 when b is) and is
recorded as the `reason`; if no level does, the pair is a tie (0.5, reason "tie"). With probability
`flip_rate` the annotator then flips a decided label; ties stay ties (identical images are always
ties). Pair-level auxiliary labels: `valid` = both images valid; `figure_distortion` = either image
has a distorted figure; `text_distortion` is always False, because Shapes images contain no text.

Dataset (`datasets.DatasetDict`, `save_to_disk(out_dir)`, schema `POINTWISE_FEATURES` and
`PAIRWISE_FEATURES`): splits `pointwise`, `pointwise_test`, `pairwise`, `pairwise_test`; the test
splits hold the images of a disjoint set of prompts (prompt strings are unique over the whole set).
`out_dir/annotations.json` summarises counts, label histograms, tie rate, noise settings, and the
agreement of the noisy labels with the noiseless ones. The folder is written under a temporary name
and renamed into place at the end, so an interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from itertools import combinations, product
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image

from qirl.data import publish_mode
from qirl.errors import UserError
from qirl.shapes import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    SIZES,
    Scene,
    random_edit_record,
    random_t2i_record,
    render,
    score_edit,
    score_t2i,
)
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
from qirl.shapes.edit_oracle import PRESERVATION, SUCCESS
from qirl.shapes.scene import CIRCUMRADIUS, RELATIONS, is_valid, place_objects

__all__ = [
    "LEVELS", "LIKERT_CUTS", "LIKERT_DIMS", "PAIRWISE_FEATURES", "PERTURBATIONS", "POINTWISE_FEATURES",
    "AnnotateConfig", "Truth", "annotate", "draw_prompts", "judge_edit", "judge_t2i", "likert",
    "noisy_likert", "perturb", "prefer", "rankdata", "reasons_from_items", "spearman",
]

LEVELS: tuple[str, ...] = ("consistency", "distortion", "texture", "aesthetics")
LIKERT_CUTS: tuple[float, float, float, float] = (25.0, 50.0, 75.0, 95.0)
PERTURBATIONS: tuple[str, ...] = (
    "clean", "blur", "noise", "colour_shift", "wrong_object", "missing_object", "extra_object",
    "distorted_shape", "unchanged",
)
_T2I_PERTURBATIONS = PERTURBATIONS[1:-1]  # "clean" comes first in every pool; "unchanged" is edit-only
_EDIT_PERTURBATIONS = PERTURBATIONS[1:]
_CREATIVE_SHARE = 1 / 6  # share of T2I prompts with a held-out (shape, colour) pair, as in builtin_prompts

POINTWISE_FEATURES = datasets.Features({
    "image": datasets.Image(),
    "prompt": datasets.Value("string"),
    "task": datasets.Value("string"),
    "category": datasets.Value("string"),
    "source_image": datasets.Image(),
    "quality": datasets.Value("int32"),
    "fidelity": datasets.Value("int32"),
    "alignment": datasets.Value("int32"),
    "oracle": datasets.Value("float32"),
    "reasons": datasets.List(datasets.Value("string")),
})
PAIRWISE_FEATURES = datasets.Features({
    "prompt": datasets.Value("string"),
    "task": datasets.Value("string"),
    "category": datasets.Value("string"),
    "image_a": datasets.Image(),
    "image_b": datasets.Image(),
    "source_image": datasets.Image(),
    "label": datasets.Value("float32"),
    "reason": datasets.Value("string"),
    "oracle_a": datasets.Value("float32"),
    "oracle_b": datasets.Value("float32"),
    "valid": datasets.Value("bool"),
    "text_distortion": datasets.Value("bool"),
    "figure_distortion": datasets.Value("bool"),
})
LIKERT_DIMS: tuple[str, ...] = ("quality", "fidelity", "alignment")


@dataclass
class AnnotateConfig:
    """What `annotate` builds; every field can be set from a recipe or `key=value` overrides."""

    model: str = "base"  # the policy whose samples fill the pool (see models.registry.load_policy)
    out_dir: str = "data/annotations"
    n_prompts: int = 200  # T2I prompts and edit instructions together, train and test
    samples_per_prompt: int = 12  # pool images per prompt: model samples + perturbed renders
    perturbed_fraction: float = 0.5  # share of the pool that is perturbed ground-truth renders
    guidance: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])  # CFG scales to sample at
    steps: list[int] = field(default_factory=lambda: [4, 10, 20])  # Euler step counts to sample at
    shift: float = 1.0
    edit_fraction: float = 0.25  # share of prompts that are edit instructions
    test_fraction: float = 0.1  # share of prompts held out for the *_test splits
    pairs_per_prompt: int = 16  # same-prompt pairs drawn from each pool (at most all of them)
    likert_noise: float = 8.0  # sd of the annotator's perception noise, in oracle points (0-100)
    slip_rate: float = 0.05  # probability of an off-by-one Likert slip
    flip_rate: float = 0.05  # probability of flipping a decided pairwise label
    tie_threshold: float = 5.0  # a level decides a pair when the scores differ by at least this
    batch_size: int = 64
    seed: int = 0

    def validate(self) -> None:
        """Raise `UserError` naming the first bad key."""
        if self.n_prompts < 2:
            raise UserError(f"n_prompts must be at least 2 (train and test), got {self.n_prompts}")
        if self.samples_per_prompt < 2:
            raise UserError(f"samples_per_prompt must be at least 2 (a pair needs two), "
                            f"got {self.samples_per_prompt}")
        for key in ("perturbed_fraction", "edit_fraction", "slip_rate", "flip_rate"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise UserError(f"{key} must be in [0, 1], got {getattr(self, key)}")
        if not 0.0 < self.test_fraction < 1.0:
            raise UserError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.likert_noise < 0 or self.tie_threshold < 0:
            raise UserError("likert_noise and tie_threshold must be non-negative")
        if self.pairs_per_prompt < 1 or self.batch_size < 1:
            raise UserError("pairs_per_prompt and batch_size must be at least 1")
        if self.n_model_samples > 0 and (not self.guidance or not self.steps):
            raise UserError("guidance and steps must each list a value when the pool has model samples")
        if any(s < 1 for s in self.steps):
            raise UserError(f"steps must all be at least 1, got {list(self.steps)}")

    @property
    def n_model_samples(self) -> int:
        return self.samples_per_prompt - round(self.samples_per_prompt * self.perturbed_fraction)


# ---------------------------------------------------------------------------------------- truth


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


# -------------------------------------------------------------------------------------- labels


def likert(score: float) -> int:
    """0-100 -> 1..5 at LIKERT_CUTS (see the module docstring)."""
    return 1 + sum(score >= c for c in LIKERT_CUTS)


def noisy_likert(score: float, rng: np.random.Generator, noise: float, slip_rate: float) -> int:
    """One annotator's rating: `likert(score + N(0, noise^2))`, then a +-1 slip with prob `slip_rate`.

    Both random draws are always made, so the stream of an rng does not depend on the settings.
    """
    label = likert(score + noise * float(rng.standard_normal()))
    slip, up = rng.random() < slip_rate, rng.random() < 0.5
    if slip:
        label += 1 if (up or label == 1) and label < 5 else -1
    return int(label)


def prefer(a: Truth, b: Truth, tie_threshold: float) -> tuple[float, str]:
    """Noiseless pairwise preference by the report's strict priority order.

    Levels in order consistency > distortion > texture > aesthetics; the first with
    |a - b| >= tie_threshold decides: (1.0, level) if a is better, (0.0, level) if b is; none -> (0.5, "tie").
    """
    for level in LEVELS:
        d = getattr(a, level) - getattr(b, level)
        if abs(d) >= tie_threshold and d != 0:
            return (1.0 if d > 0 else 0.0), level
    return 0.5, "tie"


def rankdata(x: Sequence[float] | np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (scipy.stats.rankdata's 'average')."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman's rank correlation: Pearson's r of the (tie-averaged) ranks; NaN if either is constant."""
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


# --------------------------------------------------------------------------------- perturbations


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (sigma in pixels), edges padded by replication."""
    r = max(1, int(math.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    p = np.pad(img, ((r, r), (r, r), (0, 0)), mode="edge")
    rows = sum(k[i] * p[i : i + img.shape[0], :, :] for i in range(2 * r + 1))  # [H, W + 2r, 3]
    return sum(k[i] * rows[:, i : i + img.shape[1], :] for i in range(2 * r + 1))  # [H, W, 3]


def _bilinear(img: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Sample img [H, W, 3] at fractional pixel coordinates (clamped to the image)."""
    h, w = img.shape[:2]
    ys, xs = np.clip(ys, 0, h - 1), np.clip(xs, 0, w - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[..., None], (xs - x0)[..., None]
    top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
    bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def _distort(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    """Render with one object warped by a smooth sinusoidal displacement (or, 1 time in 3, cut in two)."""
    img = render(scene, size)
    o = scene.objects[int(rng.integers(len(scene.objects)))]
    cx, cy, rad = o.x * size, o.y * size, o.radius * CIRCUMRADIUS[o.shape] * size  # pixels
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5  # pixel centres
    if rng.random() < 1 / 3:  # a background-coloured cut through the object: two fragments
        angle = rng.uniform(0, math.pi)
        dist = np.abs((xx - cx) * math.sin(angle) - (yy - cy) * math.cos(angle))
        cut = (dist < 0.06 * size) & (np.hypot(xx - cx, yy - cy) < rad + 1)
        img[cut] = BACKGROUNDS[scene.background]
        return img
    amp = rng.uniform(0.05, 0.09) * size
    wavelength = rng.uniform(0.8, 1.6) * rad
    window = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (1.3 * rad) ** 2))
    ph = rng.uniform(0, 2 * math.pi, size=2)
    dx = amp * np.sin(2 * math.pi * yy / wavelength + ph[0]) * window
    dy = amp * np.sin(2 * math.pi * xx / wavelength + ph[1]) * window
    return _bilinear(img, yy + dy - 0.5, xx + dx - 0.5)


def _wrong_object(scene: Scene, rng: np.random.Generator) -> Scene:
    """One object gets another colour, shape or size (whichever keeps the scene valid first)."""
    objs = list(scene.objects)
    j = int(rng.integers(len(objs)))
    o = objs[j]
    options = [("color", c) for c in COLORS if c != o.color] + [("shape", s) for s in SHAPES if s != o.shape]
    options += [("size", s) for s in SIZES if s != o.size]
    for k in rng.permutation(len(options)):
        key, value = options[k]
        objs[j] = replace(o, **{key: value})
        if is_valid(Scene(tuple(objs), scene.background)):
            return Scene(tuple(objs), scene.background)
    objs[j] = replace(o, color=next(c for c in COLORS if c != o.color))  # a recolour is always valid
    return Scene(tuple(objs), scene.background)


def perturb(
    scene: Scene, kind: str, size: int, rng: np.random.Generator, source: Scene | None = None
) -> np.ndarray:
    """A render of `scene` [size, size, 3] in [0, 1] damaged by `kind` (one of PERTURBATIONS).

    Strengths are drawn from `rng`: blur sigma 0.5-1.5 px (at 32 px), noise sd 0.03-0.15, a colour shift
    of up to +-0.25 per channel, a warp of 5-9 % of the side. `unchanged` renders `source` (an edit that
    was not done). A `missing_object` of a one-object scene is a blank canvas (an invalid sample).
    """
    px = size / 32
    if kind == "clean":
        return render(scene, size)
    if kind == "blur":
        return _blur(render(scene, size), rng.uniform(0.5, 1.5) * px)
    if kind == "noise":
        return render(scene, size) + rng.normal(0.0, rng.uniform(0.03, 0.15), (size, size, 3))
    if kind == "colour_shift":
        return render(scene, size) + rng.uniform(-0.25, 0.25, 3)
    if kind == "wrong_object":
        return render(_wrong_object(scene, rng), size)
    if kind == "missing_object":
        j = int(rng.integers(len(scene.objects)))
        return render(Scene(scene.objects[:j] + scene.objects[j + 1 :], scene.background), size)
    if kind == "extra_object":
        attrs = [(SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))],
                  list(SIZES)[rng.integers(len(SIZES))])]
        more = place_objects(rng, attrs, scene.background, scene.objects)
        return render(more if more is not None else _wrong_object(scene, rng), size)
    if kind == "distorted_shape":
        return _distort(scene, size, rng)
    if kind == "unchanged":
        if source is None:
            raise UserError("perturbation 'unchanged' needs the edit's source scene")
        return render(source, size)
    raise UserError(f"unknown perturbation {kind!r}; expected one of {', '.join(PERTURBATIONS)}")


# ------------------------------------------------------------------------------------------ pool


@dataclass
class _PoolImage:
    prompt: int  # index into the prompt list
    slot: int  # position in that prompt's pool
    origin: str  # "model g=<scale> steps=<n>" or "render:<perturbation>"
    pixels: np.ndarray  # uint8 [H, W, 3]: exactly what the PNG holds


def _quantise(img: np.ndarray) -> np.ndarray:
    """float [H, W, 3] -> uint8, as an 8-bit PNG stores it."""
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _as_float(px: np.ndarray) -> np.ndarray:
    return px.astype(np.float32) / 255.0


def _png(px: np.ndarray) -> dict[str, Any]:
    buf = io.BytesIO()
    Image.fromarray(px, mode="RGB").save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def draw_prompts(config: AnnotateConfig) -> tuple[list[dict[str, Any]], list[bool]]:
    """`n_prompts` Shapes records with unique prompt strings, and which of them are test prompts.

    T2I records carry their ground-truth `scene`, edits their `source_scene` and `target_scene`.
    """
    rng = np.random.default_rng([config.seed, 0xA11])
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    for _ in range(50 * config.n_prompts):
        if len(records) == config.n_prompts:
            break
        if rng.random() < config.edit_fraction:
            rec = random_edit_record(rng, split="train")
        else:
            rec = random_t2i_record(rng, split="creative" if rng.random() < _CREATIVE_SHARE else "train")
        if rec["prompt"] not in seen:
            seen.add(rec["prompt"])
            records.append(rec)
    if len(records) < config.n_prompts:
        raise UserError(f"n_prompts={config.n_prompts}: found only {len(records)} distinct prompts")
    n_test = min(config.n_prompts - 1, max(1, round(config.test_fraction * config.n_prompts)))
    test = np.zeros(config.n_prompts, dtype=bool)
    test[rng.permutation(config.n_prompts)[:n_test]] = True
    return records, test.tolist()


def _sample_pool(
    config: AnnotateConfig, policy: Any, records: list[dict[str, Any]], sources: list[np.ndarray | None]
) -> Iterator[list[_PoolImage]]:
    """The model's samples, one list per batch: sample k of prompt i uses the (guidance, steps) pair
    number (i * n_model + k) mod |grid| and the initial noise `image_noise(seed, i * pool + k)`, so the
    pool does not depend on the batch size."""
    from qirl.prompt_sets import image_noise
    from qirl.sampling import sample_ode

    n_model, pool = config.n_model_samples, config.samples_per_prompt
    grid = list(product(config.guidance, config.steps))
    jobs = [(i, k, (i * n_model + k) % len(grid)) for i in range(len(records)) for k in range(n_model)]
    shape = tuple(policy.latent_shape)
    for c, (g, steps) in enumerate(grid):
        mine = [(i, k) for i, k, cc in jobs if cc == c]
        for start in range(0, len(mine), config.batch_size):
            chunk = mine[start : start + config.batch_size]
            src = [None if sources[i] is None else torch.from_numpy(_as_float(sources[i])).permute(2, 0, 1)
                   for i, _ in chunk]
            with torch.no_grad():
                cond = policy.encode([records[i]["prompt"] for i, _ in chunk], src)
                noise = torch.stack([image_noise(config.seed, i * pool + k, shape) for i, k in chunk])
                latents = sample_ode(policy, cond, num_steps=int(steps), guidance=float(g),
                                     shift=config.shift, noise=noise)  # [b, C, H, W]
                images = policy.decode(latents).float().clamp(0, 1)  # [b, 3, H, W]
            pixels = images.permute(0, 2, 3, 1).cpu().numpy()  # [b, H, W, 3]
            yield [_PoolImage(i, k, f"model g={g:g} steps={steps}", _quantise(px))
                   for (i, k), px in zip(chunk, pixels, strict=True)]


def _render_pool(config: AnnotateConfig, records: list[dict[str, Any]], size: int) -> list[_PoolImage]:
    """The perturbed renders: per prompt the clean render, then perturbations in a shuffled cycle."""
    out = []
    for i, rec in enumerate(records):
        rng = np.random.default_rng([config.seed, i, 1])
        edit = rec["task"] == "edit"
        truth = Scene.from_dict(rec["target_scene"] if edit else rec["scene"])
        source = Scene.from_dict(rec["source_scene"]) if edit else None
        kinds = list(_EDIT_PERTURBATIONS if edit else _T2I_PERTURBATIONS)
        cycle = ["clean"] + [kinds[j] for j in rng.permutation(len(kinds))]
        for k in range(config.n_model_samples, config.samples_per_prompt):
            kind = cycle[(k - config.n_model_samples) % len(cycle)]
            img = perturb(truth, kind, size, rng, source)
            out.append(_PoolImage(i, k, f"render:{kind}", _quantise(img)))
    return out


# ------------------------------------------------------------------------------------------ main


def _hist(values: Sequence[Any], keys: Sequence[Any]) -> dict[str, int]:
    counts = Counter(values)
    return {str(k): int(counts.get(k, 0)) for k in keys}


def _r(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 4)


def annotate(config: AnnotateConfig) -> Iterator[dict[str, Any]]:
    """Build the pool, judge it, label it like human annotators, and save the DatasetDict.

    Yields progress dicts {"phase", "step", "total"} (step counts pool images made, then judged) and a
    final {"done": True, ...} summary; `out_dir` holds the dataset and `annotations.json` only at the end.
    """
    from qirl.models.registry import load_policy

    config.validate()
    t0 = time.perf_counter()
    out = Path(config.out_dir)
    if out.exists() and not (out / "annotations.json").is_file():
        raise UserError(f"{out}: exists and is not an annotation folder; choose another out_dir")
    policy = load_policy(config.model)
    size = int(policy.latent_shape[-1])
    records, test = draw_prompts(config)
    n, pool = len(records), config.samples_per_prompt
    total = 2 * n * pool
    sources = [_quantise(render(Scene.from_dict(r["source_scene"]), size)) if r["task"] == "edit" else None
               for r in records]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        images: list[_PoolImage] = []
        if config.n_model_samples > 0:
            for batch in _sample_pool(config, policy, records, sources):
                images += batch
                yield {"phase": "sample", "step": len(images), "total": total}
        images += _render_pool(config, records, size)
        images.sort(key=lambda im: (im.prompt, im.slot))
        t_pool = time.perf_counter()
        yield {"phase": "render", "step": len(images), "total": total}

        truths: list[Truth] = []
        for j, im in enumerate(images):
            rec = records[im.prompt]
            if rec["task"] == "edit":
                truths.append(judge_edit(_as_float(sources[im.prompt]), rec["prompt"], _as_float(im.pixels)))
            else:
                truths.append(judge_t2i(_as_float(im.pixels), rec["prompt"]))
            if (j + 1) % 64 == 0 or j + 1 == len(images):
                yield {"phase": "judge", "step": len(images) + j + 1, "total": total}
        t_judge = time.perf_counter()

        dd, stats = _build_splits(config, records, test, sources, images, truths)
        was_enabled = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # the library never prints; the CLI renders progress
        try:
            dd.save_to_disk(str(tmp))
        finally:
            if was_enabled:
                datasets.enable_progress_bars()
        t_write = time.perf_counter()
        by_origin: dict[str, list[Truth]] = {}
        for im, t in zip(images, truths, strict=True):
            by_origin.setdefault(im.origin, []).append(t)
        stats["pool"] = {
            "images": len(images), "image_size": size, "model": config.model,
            "by_origin": {o: {"n": len(ts), "oracle": _r(np.mean([t.overall for t in ts])),
                              "valid": _r(np.mean([t.valid for t in ts]))}
                          for o, ts in sorted(by_origin.items())},
        }
        stats["seconds"] = {"pool": _r(t_pool - t0), "judge": _r(t_judge - t_pool),
                            "write": _r(t_write - t_judge), "total": _r(t_write - t0)}
        stats["config"] = asdict(config)
        (tmp / "annotations.json").write_text(json.dumps(stats, indent=1) + "\n", encoding="utf-8")
        publish_mode(tmp)  # mkdtemp makes it private; the finished dataset is not
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    yield {
        "done": True, "out": str(out), "images": len(images), **stats["counts"],
        "tie_rate": stats["pairwise"]["tie_rate"], "pairwise_agreement": stats["agreement"]["pairwise"],
        "likert_exact_agreement": stats["agreement"]["likert_exact"]["mean"],
        "spearman_noiseless": stats["agreement"]["spearman_vs_oracle"]["noiseless"]["sum"],
        "spearman_noisy": stats["agreement"]["spearman_vs_oracle"]["noisy"]["sum"],
        "seconds": stats["seconds"]["total"],
    }


def _build_splits(
    config: AnnotateConfig,
    records: list[dict[str, Any]],
    test: list[bool],
    sources: list[np.ndarray | None],
    images: list[_PoolImage],
    truths: list[Truth],
) -> tuple[datasets.DatasetDict, dict[str, Any]]:
    """Label the judged pool (pointwise Likert, pairwise preferences) into the four splits + statistics."""
    pngs = [_png(im.pixels) for im in images]
    src_png = [None if s is None else _png(s) for s in sources]
    cols: dict[str, dict[str, list[Any]]] = {
        name: {k: [] for k in feats} for name, feats in (
            ("pointwise", POINTWISE_FEATURES), ("pointwise_test", POINTWISE_FEATURES),
            ("pairwise", PAIRWISE_FEATURES), ("pairwise_test", PAIRWISE_FEATURES))
    }
    noisy_l: dict[str, list[int]] = {d: [] for d in LIKERT_DIMS}
    clean_l: dict[str, list[int]] = {d: [] for d in LIKERT_DIMS}
    for j, (im, t) in enumerate(zip(images, truths, strict=True)):
        rec = records[im.prompt]
        rng = np.random.default_rng([config.seed, im.prompt, im.slot, 2])
        labels = {d: noisy_likert(t.latent(d), rng, config.likert_noise, config.slip_rate)
                  for d in LIKERT_DIMS}
        for d in LIKERT_DIMS:
            noisy_l[d].append(labels[d])
            clean_l[d].append(likert(t.latent(d)))
        row = {"image": pngs[j], "prompt": rec["prompt"], "task": rec["task"], "category": rec["category"],
               "source_image": src_png[im.prompt], **labels, "oracle": t.overall, "reasons": list(t.reasons)}
        split = cols["pointwise_test" if test[im.prompt] else "pointwise"]
        for k, v in row.items():
            split[k].append(v)

    first = {}  # prompt -> index of its first pool image (images are sorted by prompt, then slot)
    for j, im in enumerate(images):
        first.setdefault(im.prompt, j)
    pair_clean: list[float] = []
    pair_noisy: list[float] = []
    reasons: list[str] = []
    flags: list[tuple[bool, bool]] = []
    for i, rec in enumerate(records):
        rng = np.random.default_rng([config.seed, i, 3])
        pool = config.samples_per_prompt
        all_pairs = list(combinations(range(pool), 2))
        for p in rng.permutation(len(all_pairs))[: config.pairs_per_prompt]:
            a, b = all_pairs[p]
            if rng.random() < 0.5:
                a, b = b, a
            flip = rng.random() < config.flip_rate
            ja, jb = first[i] + a, first[i] + b
            ta, tb = truths[ja], truths[jb]
            label, reason = prefer(ta, tb, config.tie_threshold)
            noisy = 1.0 - label if flip and label != 0.5 else label
            pair_clean.append(label)
            pair_noisy.append(noisy)
            reasons.append(reason)
            valid, distorted = ta.valid and tb.valid, ta.figure_distortion or tb.figure_distortion
            flags.append((valid, distorted))
            row = {"prompt": rec["prompt"], "task": rec["task"], "category": rec["category"],
                   "image_a": pngs[ja], "image_b": pngs[jb], "source_image": src_png[i], "label": noisy,
                   "reason": reason, "oracle_a": ta.overall, "oracle_b": tb.overall, "valid": valid,
                   "text_distortion": False, "figure_distortion": distorted}
            split = cols["pairwise_test" if test[i] else "pairwise"]
            for k, v in row.items():
                split[k].append(v)

    feats = {"pointwise": POINTWISE_FEATURES, "pointwise_test": POINTWISE_FEATURES,
             "pairwise": PAIRWISE_FEATURES, "pairwise_test": PAIRWISE_FEATURES}
    dd = datasets.DatasetDict(
        {name: datasets.Dataset.from_dict(c, features=feats[name]) for name, c in cols.items()})

    oracle = np.array([t.overall for t in truths])
    noisy_sum = np.sum([noisy_l[d] for d in LIKERT_DIMS], axis=0)
    clean_sum = np.sum([clean_l[d] for d in LIKERT_DIMS], axis=0)
    exact = {d: float(np.mean(np.equal(noisy_l[d], clean_l[d]))) for d in LIKERT_DIMS}
    within = {d: float(np.mean(np.abs(np.subtract(noisy_l[d], clean_l[d])) <= 1)) for d in LIKERT_DIMS}
    n_pairs = max(1, len(pair_noisy))
    stats: dict[str, Any] = {
        "counts": {
            "prompts": len(records), "test_prompts": int(sum(test)),
            **{name: len(c["prompt"]) for name, c in cols.items()},
        },
        "likert": {
            "cuts": list(LIKERT_CUTS),
            "histogram": {d: _hist(noisy_l[d], range(1, 6)) for d in LIKERT_DIMS},
            "histogram_noiseless": {d: _hist(clean_l[d], range(1, 6)) for d in LIKERT_DIMS},
        },
        "pairwise": {
            "label_histogram": _hist(pair_noisy, (1.0, 0.5, 0.0)),
            "reason_histogram": _hist(reasons, (*LEVELS, "tie")),
            "tie_rate": _r(float(np.mean(np.equal(pair_noisy, 0.5))) if pair_noisy else 0.0),
            "valid_rate": _r(sum(v for v, _ in flags) / n_pairs),
            "figure_distortion_rate": _r(sum(f for _, f in flags) / n_pairs),
            "text_distortion_rate": 0.0,
        },
        "noise": {"likert_noise": config.likert_noise, "slip_rate": config.slip_rate,
                  "flip_rate": config.flip_rate, "tie_threshold": config.tie_threshold},
        "agreement": {
            "likert_exact": {**{d: _r(v) for d, v in exact.items()},
                             "mean": _r(float(np.mean(list(exact.values()))))},
            "likert_within_one": {d: _r(v) for d, v in within.items()},
            "pairwise": _r(float(np.mean(np.equal(pair_noisy, pair_clean))) if pair_noisy else 1.0),
            "spearman_vs_oracle": {
                "noiseless": {**{d: _r(spearman(clean_l[d], oracle)) for d in LIKERT_DIMS},
                              "sum": _r(spearman(clean_sum, oracle))},
                "noisy": {**{d: _r(spearman(noisy_l[d], oracle)) for d in LIKERT_DIMS},
                          "sum": _r(spearman(noisy_sum, oracle))},
            },
        },
    }
    return dd, stats
