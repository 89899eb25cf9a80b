"""Anti-aliased rendering of scenes by signed distance, vectorised over a whole batch.

Coverage of a pixel by a shape is `alpha = clip(0.5 - d * size, 0, 1)`, with d the exact signed
distance (negative inside) from the pixel centre to the shape's outline in image fractions: a pixel
whose centre sits on the outline is half covered, and coverage ramps linearly over one pixel across
the edge (the standard distance-field approximation of box-filtered area coverage). Compositing is
`img = img * (1 - alpha) + colour * alpha`, object by object over the background. The oracle fits the
same `coverage` function as its shape templates, so a clean render matches its template exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from qirl.errors import UserError
from qirl.shapes.scene import BACKGROUNDS, COLORS, SHAPES, SIZES, Scene

_SQRT_HALF = math.sqrt(0.5)


def _box_sdf(dx: np.ndarray, dy: np.ndarray, half: np.ndarray | float) -> np.ndarray:
    """Exact signed distance to an axis-aligned square of half-side `half` centred at the origin."""
    qx, qy = np.abs(dx) - half, np.abs(dy) - half
    outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    return outside + np.minimum(np.maximum(qx, qy), 0.0)


def _segment_dist(px: np.ndarray, py: np.ndarray, ax: np.ndarray, ay: np.ndarray, bx: np.ndarray, by: np.ndarray):
    """Distance from points to the segments a-b and the side of the line they lie on (cross product)."""
    ex, ey = bx - ax, by - ay
    wx, wy = px - ax, py - ay
    t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
    return np.hypot(wx - t * ex, wy - t * ey), ex * wy - ey * wx


def sdf(shape: str, dx: np.ndarray, dy: np.ndarray, r: np.ndarray | float) -> np.ndarray:
    """Signed distance from offsets (dx, dy) to the outline of `shape` with radius r (see scene.py)."""
    if shape == "circle":
        return np.hypot(dx, dy) - r
    if shape == "square":
        return _box_sdf(dx, dy, r)
    if shape == "diamond":  # rotate by 45 degrees: a square of half-side r / sqrt(2)
        return _box_sdf((dx + dy) * _SQRT_HALF, (dx - dy) * _SQRT_HALF, r * _SQRT_HALF)
    if shape == "triangle":  # fold on the vertical axis: the right edge and the right half of the base
        ax = np.abs(dx)
        zero = np.zeros_like(r) if isinstance(r, np.ndarray) else 0.0
        d1, c1 = _segment_dist(ax, dy, zero, -r, r, r)  # apex (0, -r) -> corner (r, r)
        d2, _ = _segment_dist(ax, dy, zero, r, r, r)  # base centre (0, r) -> corner (r, r)
        inside = (c1 > 0) & (dy < r)  # left of the right edge (y down) and above the base
        return np.where(inside, -np.minimum(d1, d2), np.minimum(d1, d2))
    raise UserError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


def coverage(shape: str, dx: np.ndarray, dy: np.ndarray, r: np.ndarray | float, size: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1]: clip(0.5 - sdf * size, 0, 1), offsets in image fractions."""
    return np.clip(0.5 - sdf(shape, dx, dy, r) * size, 0.0, 1.0)


def _check_size(size: int) -> None:
    if not isinstance(size, int | np.integer) or size < 16:
        raise UserError(f"image size must be an integer >= 16, got {size!r}")


def _coverages(scenes: Sequence[Scene], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-object coverage alpha [B, N, H, W] and colour [B, N, 3] (N = most objects in a scene)."""
    b = len(scenes)
    n_max = max((len(s.objects) for s in scenes), default=0)
    centres = (np.arange(size, dtype=np.float32) + 0.5) / size  # [W] pixel centres in image fractions
    # Objects are grouped by shape so each distance function runs once over all objects of that shape.
    alpha = np.zeros((b, n_max, size, size), dtype=np.float32)  # [B, N, H, W]
    color = np.zeros((b, n_max, 3), dtype=np.float32)  # [B, N, 3]
    by_shape: dict[str, list[tuple[int, int, float, float, float]]] = {}
    for i, s in enumerate(scenes):
        for j, o in enumerate(s.objects):
            if o.color not in COLORS or o.size not in SIZES:
                raise UserError(f"unknown colour or size in object {o!r}")
            by_shape.setdefault(o.shape, []).append((i, j, o.x, o.y, SIZES[o.size]))
            color[i, j] = COLORS[o.color]
    for shape, rows in by_shape.items():
        arr = np.asarray(rows, dtype=np.float32)  # [M, 5]
        bi, nj = arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64)
        dx = centres[None, None, :] - arr[:, 2, None, None]  # [M, 1, W]
        dy = centres[None, :, None] - arr[:, 3, None, None]  # [M, H, 1]
        dx, dy = np.broadcast_arrays(dx, dy)  # [M, H, W] each
        r = np.broadcast_to(arr[:, 4, None, None], dx.shape)  # [M, H, W]
        alpha[bi, nj] = coverage(shape, dx, dy, r, size)
    return alpha, color


def render_numpy(scenes: Sequence[Scene], size: int = 32) -> np.ndarray:
    """Render scenes into a float32 array [B, size, size, 3] in [0, 1] (numpy, channels last)."""
    _check_size(size)
    img = np.empty((len(scenes), size, size, 3), dtype=np.float32)  # [B, H, W, 3]
    for i, s in enumerate(scenes):
        if s.background not in BACKGROUNDS:
            raise UserError(f"unknown background {s.background!r}; expected one of {', '.join(BACKGROUNDS)}")
        img[i] = BACKGROUNDS[s.background]
    alpha, color = _coverages(scenes, size)  # [B, N, H, W], [B, N, 3]
    for j in range(alpha.shape[1]):  # composite in object order (objects never overlap in valid scenes)
        a = alpha[:, j, :, :, None]  # [B, H, W, 1]
        img = img * (1.0 - a) + color[:, j, None, None, :] * a
    return img.astype(np.float32, copy=False)


def render_shape_labels(scenes: Sequence[Scene], size: int = 32) -> torch.Tensor:
    """Per-pixel shape class [B, size, size] (int64): 0 = background, 1 + SHAPES.index(shape) where an
    object covers at least half the pixel (the later object wins, as in compositing). The segmentation
    map of what `render_batch` draws, for pretraining's auxiliary shape objective."""
    _check_size(size)
    alpha, _ = _coverages(scenes, size)  # [B, N, H, W]
    labels = np.zeros((len(scenes), size, size), dtype=np.int64)  # [B, H, W]
    for i, s in enumerate(scenes):
        for j, o in enumerate(s.objects):
            labels[i][alpha[i, j] >= 0.5] = 1 + SHAPES.index(o.shape)
    return torch.from_numpy(labels)


def render(scene: Scene, size: int = 32) -> np.ndarray:
    """Render one scene: float32 [size, size, 3] in [0, 1]."""
    return render_numpy([scene], size)[0]


def render_batch(scenes: Sequence[Scene], size: int = 32) -> torch.Tensor:
    """Render scenes into a float32 tensor [B, 3, size, size] in [0, 1]; what training uses."""
    img = render_numpy(scenes, size)  # [B, H, W, 3]
    return torch.from_numpy(np.ascontiguousarray(img.transpose(0, 3, 1, 2)))  # [B, 3, H, W]
