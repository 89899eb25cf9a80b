"""Object detection for the oracle: colour segmentation, connected components, shape-template fitting.

1. Background: the per-channel median of the outermost pixel ring (objects keep off the frame).
2. Every pixel p is explained as a mix of the background b and one palette colour c_k:
   alpha_k = clip((p - b).(c_k - b) / |c_k - b|^2, 0, 1), residual_k = |p - b - alpha_k (c_k - b)|.
   The pixel takes the colour k with the smallest residual; it is an object ("core") pixel if that
   residual is <= RESIDUAL_MAX and alpha_k >= 0.5, an unexplained mark if the residual is larger, and
   background otherwise. Anti-aliased edge pixels are exact mixes, so they are explained at residual 0
   and carry their coverage alpha_k.
3. Core pixels of one colour are grouped into 8-connected components.
4. Each component's soft coverage (alpha of its colour over its core dilated by one pixel) is fitted by
   every shape: radius r from the area (area = AREA_FACTOR * r^2), centre from the centroid (a
   triangle's centroid sits r/3 below its box centre), one refinement of r so the template's area
   matches, then the soft IoU sum(min(A, T)) / sum(max(A, T)) against the template T drawn by the
   renderer's own `coverage`. The best IoU names the shape; IoU and its lead over the runner-up measure
   how well formed and how unambiguous it is. The size class is the nearest on a log scale.
Components smaller than MIN_AREA_FRACTION of a small diamond are blobs, not objects: "fragments" if
within two pixels of an object, "strays" otherwise. Unexplained marks are always blobs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from qirl.errors import UserError
from qirl.shapes.render import coverage
from qirl.shapes.scene import AREA_FACTOR, BACKGROUNDS, COLORS, SHAPES, SIZES

RESIDUAL_MAX = 0.25
MIN_AREA_FRACTION = 0.35
_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)  # [K, 3]
_COLOR_NAMES = list(COLORS)
_BG_PALETTE = np.array(list(BACKGROUNDS.values()), dtype=np.float32)  # [3, 3]
_PERIMETER = {"circle": 2 * math.pi, "square": 8.0, "triangle": 2 + 2 * math.sqrt(5), "diamond": 4 * math.sqrt(2)}
_SIZE_NAMES = list(SIZES)
_SIZE_CUTS = [math.sqrt(a * b) for a, b in zip(list(SIZES.values())[:-1], list(SIZES.values())[1:], strict=True)]


@dataclass(frozen=True)
class Detection:
    """One detected object. Positions and radius are image fractions (x right, y down)."""

    shape: str
    color: str
    size: str
    x: float
    y: float
    radius: float
    area: float  # soft area in pixels
    iou: float  # soft IoU with the best shape template: how well formed (1 = ideal)
    margin: float  # IoU lead of the best shape over the second best: how unambiguous
    border: float  # largest coverage on the outermost pixel ring: > 0 means it touches the frame
    edge_width: float  # partially covered pixels per pixel of outline: ~1 sharp, >2 blurred
    color_error: float  # mean residual of its core pixels from the palette mix: 0 = exact colour
    contrast: float  # distance between its mean interior colour and the background
    oversized: bool  # larger than any object can be: merged objects or a smear
    pixels: np.ndarray = field(repr=False, compare=False)  # [n, 2] (row, col) of its core pixels

    @property
    def confidence(self) -> float:
        """Classification confidence in [0, 1]: the template IoU."""
        return self.iou


@dataclass(frozen=True)
class Analysis:
    """Everything the checklists need from one image."""

    size: int
    background_rgb: tuple[float, float, float]  # estimated background colour
    background: str  # nearest palette background
    background_dist: float  # distance from the estimate to that palette background
    background_noise: float  # mean distance of background pixels (away from objects) from it
    objects: tuple[Detection, ...]
    strays: int  # small blobs and unexplained marks away from objects
    fragments: int  # small blobs within two pixels of an object


def as_image(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """Validate one image and return it as float32 [S, S, 3] in [0, 1] (torch [3, S, S] is accepted)."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().float().numpy()
        if image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
            image = image.transpose(1, 2, 0)
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3 or a.shape[0] != a.shape[1] or a.shape[0] < 16:
        raise UserError(f"image must be a square RGB array [S, S, 3] with S >= 16, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        raise UserError(f"image must be float in [0, 1], got dtype {a.dtype}")
    if not np.isfinite(a).all():
        raise UserError("image contains NaN or infinite values")
    return np.clip(a.astype(np.float32, copy=False), 0.0, 1.0)


def as_images(images: torch.Tensor | Sequence[np.ndarray]) -> list[np.ndarray]:
    """A batch as a list of [S, S, 3] arrays: a tensor [B, 3, H, W] or a sequence of single images."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise UserError(f"image batch must be a tensor [B, 3, H, W], got shape {tuple(images.shape)}")
        return list(images.detach().cpu().float().permute(0, 2, 3, 1).numpy())  # B x [H, W, 3]
    return [as_image(im) for im in images]


def _dilate(mask: np.ndarray, k: int = 1) -> np.ndarray:
    """Binary dilation by a (2k+1) x (2k+1) square."""
    out = mask.copy()
    for _ in range(k):
        p = np.pad(out, 1)
        out = p[:-2, :-2] | p[:-2, 1:-1] | p[:-2, 2:] | p[1:-1, :-2] | p[1:-1, 1:-1] | p[1:-1, 2:] \
            | p[2:, :-2] | p[2:, 1:-1] | p[2:, 2:]
    return out


def components(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of equal non-negative labels: (ids [H, W] with -1 elsewhere, count).

    Run-length union-find: runs of one label in a row join runs of the same label in the row above
    that overlap them or touch them diagonally.
    """
    h, w = labels.shape
    runs: list[tuple[int, int, int, int]] = []  # (row, start, end, label)
    row_runs: list[list[int]] = []
    for y in range(h):
        row = labels[y]
        cuts = np.flatnonzero(row[1:] != row[:-1]) + 1
        starts, ends = np.concatenate(([0], cuts)), np.concatenate((cuts, [w]))
        idx = []
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            if row[s] >= 0:
                idx.append(len(runs))
                runs.append((y, s, e, int(row[s])))
        row_runs.append(idx)
    parent = list(range(len(runs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for y in range(1, h):
        for i in row_runs[y]:
            _, s, e, lab = runs[i]
            for j in row_runs[y - 1]:
                _, s2, e2, lab2 = runs[j]
                if lab2 == lab and s2 <= e and s <= e2:  # overlap or diagonal touch ([s, e) ranges)
                    parent[find(i)] = find(j)
    ids = np.full((h, w), -1, dtype=np.int64)  # [H, W]
    roots: dict[int, int] = {}
    for i, (y, s, e, _) in enumerate(runs):
        ids[y, s:e] = roots.setdefault(find(i), len(roots))
    return ids, len(roots)


def _fit(a: np.ndarray, y0: int, x0: int, size: int) -> tuple[str, float, float, float, float, float]:
    """Fit every shape template to the soft coverage window `a` whose top-left pixel is (y0, x0).

    Returns (shape, x, y, r, iou, margin) with positions and r in image fractions.
    """
    h, w = a.shape
    m0 = float(a.sum())
    ys = (np.arange(h, dtype=np.float32) + y0 + 0.5)[:, None]  # [h, 1] pixel-centre rows
    xs = (np.arange(w, dtype=np.float32) + x0 + 0.5)[None, :]  # [1, w] pixel-centre cols
    cy, cx = float((a * ys).sum()) / m0, float((a * xs).sum()) / m0
    fits = []
    for s in SHAPES:
        r = math.sqrt(m0 / AREA_FACTOR[s])
        for _ in range(2):  # second pass: rescale r so the template's area matches the blob's
            yc = cy - (r / 3.0 if s == "triangle" else 0.0)
            t = coverage(s, (xs - cx) / size, (ys - yc) / size, r / size, size)  # [h, w]
            r *= math.sqrt(m0 / max(float(t.sum()), 1e-6))
        yc = cy - (r / 3.0 if s == "triangle" else 0.0)
        t = coverage(s, (xs - cx) / size, (ys - yc) / size, r / size, size)  # [h, w]
        iou = float(np.minimum(a, t).sum() / max(np.maximum(a, t).sum(), 1e-6))
        fits.append((iou, s, cx / size, yc / size, r / size))
    fits.sort(key=lambda f: -f[0])
    iou, s, x, y, r = fits[0]
    return s, x, y, r, iou, iou - fits[1][0]


def size_class(radius: float) -> str:
    """Nearest size class on a log scale (cuts at the geometric means of neighbouring radii)."""
    return _SIZE_NAMES[sum(radius >= c for c in _SIZE_CUTS)]


def analyse(image: np.ndarray | torch.Tensor) -> Analysis:
    """Detect objects, blobs and background statistics in one image (see the module docstring)."""
    img = as_image(image)  # [S, S, 3]
    size = img.shape[0]
    ring = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])  # [4S-4, 3]
    bg = np.median(ring, axis=0).astype(np.float32)  # [3]
    d = img - bg  # [S, S, 3]
    v = _PALETTE - bg  # [K, 3]
    alpha = np.clip(d @ v.T / np.maximum((v * v).sum(1), 1e-3), 0.0, 1.0)  # [S, S, K]
    resid = np.linalg.norm(d[:, :, None, :] - alpha[..., None] * v, axis=-1)  # [S, S, K]
    best = resid.argmin(-1)  # [S, S]
    best_res = np.take_along_axis(resid, best[..., None], -1)[..., 0]  # [S, S]
    best_alpha = np.take_along_axis(alpha, best[..., None], -1)[..., 0]  # [S, S]
    k = len(_PALETTE)
    labels = np.where(best_res > RESIDUAL_MAX, k, np.where(best_alpha >= 0.5, best, -1))  # [S, S]
    ids, n = components(labels)

    min_area = MIN_AREA_FRACTION * AREA_FACTOR["diamond"] * (SIZES["small"] * size) ** 2
    max_area = 1.3 * AREA_FACTOR["square"] * (max(SIZES.values()) * size) ** 2
    ring_mask = np.zeros((size, size), dtype=bool)  # [S, S] the outermost pixels
    ring_mask[[0, -1], :] = True
    ring_mask[:, [0, -1]] = True
    detections: list[Detection] = []
    blobs: list[np.ndarray] = []
    for c in range(n):
        mask = ids == c  # [S, S]
        rows, cols = np.nonzero(mask)
        lab = int(labels[rows[0], cols[0]])
        if lab == k or len(rows) < min_area:
            blobs.append(mask)
            continue
        y0, y1 = max(rows.min() - 2, 0), min(rows.max() + 3, size)
        x0, x1 = max(cols.min() - 2, 0), min(cols.max() + 3, size)
        own = _dilate(mask[y0:y1, x0:x1]) & ((ids[y0:y1, x0:x1] == c) | (ids[y0:y1, x0:x1] < 0))
        a = np.where(own & (resid[y0:y1, x0:x1, lab] <= RESIDUAL_MAX), alpha[y0:y1, x0:x1, lab], 0.0)  # [h, w]
        shape, x, y, r, iou, margin = _fit(a, int(y0), int(x0), size)
        partial = ((a > 0.05) & (a < 0.95)).sum()
        solid = alpha[rows, cols, lab] >= 0.9  # [n] interior pixels, free of edge mixing
        core = img[rows[solid], cols[solid]] if solid.any() else img[rows, cols]  # [m, 3]
        detections.append(Detection(
            shape=shape, color=_COLOR_NAMES[lab], size=size_class(r), x=x, y=y, radius=r,
            area=float(a.sum()), iou=iou, margin=margin,
            border=float((a * ring_mask[y0:y1, x0:x1]).max()),
            edge_width=float(partial) / max(_PERIMETER[shape] * r * size, 1e-6),
            color_error=float(resid[rows, cols, lab].mean()),
            contrast=float(np.linalg.norm(core.mean(0) - bg)),
            oversized=float(a.sum()) > max_area,
            pixels=np.stack([rows, cols], 1),
        ))
    near = _dilate(ids >= 0, 1) if n else np.zeros((size, size), dtype=bool)
    objects_zone = np.zeros((size, size), dtype=bool)
    for det in detections:
        objects_zone[det.pixels[:, 0], det.pixels[:, 1]] = True
    objects_zone = _dilate(objects_zone, 2)
    fragments = sum(bool((b & objects_zone).any()) for b in blobs)
    j = int(np.linalg.norm(_BG_PALETTE - bg, axis=1).argmin())
    quiet = ~near  # background pixels at least one pixel away from anything detected
    noise = float(np.linalg.norm(img[quiet] - _BG_PALETTE[j], axis=-1).mean()) if quiet.any() else 1.0
    return Analysis(
        size=size, background_rgb=tuple(float(c) for c in bg), background=list(BACKGROUNDS)[j],
        background_dist=float(np.linalg.norm(_BG_PALETTE[j] - bg)), background_noise=noise,
        objects=tuple(detections), strays=len(blobs) - fragments, fragments=fragments,
    )


def detect(image: np.ndarray | torch.Tensor) -> list[Detection]:
    """The objects in one image [S, S, 3] (float in [0, 1]), largest first."""
    return sorted(analyse(image).objects, key=lambda d: -d.area)
