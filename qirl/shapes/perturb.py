"""Damaged renders of Shapes scenes: the perturbations of the annotation image pool.

Each perturbation hurts a known level of the report's priority order (`qirl.shapes.judge`): blur, pixel
noise and a colour shift hurt texture; a wrong, missing or extra object hurts consistency; a warped or
fragmented shape hurts structural fidelity; for edits, the unchanged source is an edit that was not
done. Reward-model annotations (`qirl.rewards.annotate`) mix them with model samples.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from qirl.errors import UserError
from qirl.shapes.render import render
from qirl.shapes.scene import BACKGROUNDS, CIRCUMRADIUS, COLORS, SHAPES, SIZES, Scene, is_valid, place_objects

PERTURBATIONS: tuple[str, ...] = (
    "clean", "blur", "noise", "colour_shift", "wrong_object", "missing_object", "extra_object",
    "distorted_shape", "unchanged",
)
# Opt-in kinds that a default annotation pool does not draw: `blank` (background only, the degenerate
# sample of a model that draws nothing) gives reward-model tests a signal a few steps can learn.
EXTRA_PERTURBATIONS: tuple[str, ...] = ("blank",)


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
    was not done), `blank` the background alone. A `missing_object` of a one-object scene is a blank
    canvas (an invalid sample).
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
    if kind == "blank":
        return render(Scene((), scene.background), size)
    if kind == "unchanged":
        if source is None:
            raise UserError("perturbation 'unchanged' needs the edit's source scene")
        return render(source, size)
    raise UserError(f"unknown perturbation {kind!r}; expected one of {', '.join(PERTURBATIONS + EXTRA_PERTURBATIONS)}")
