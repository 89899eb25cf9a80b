"""Report figures as PNG bytes: per-pillar bars, ratings with intervals, win-rate heat map.

matplotlib's object API (`Figure` + the Agg canvas), never pyplot: no global state, no display backend,
safe to call from any thread or test.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def pillar_bars(models: Sequence[str], results: dict[str, dict[str, Any]], title: str) -> bytes:
    """Grouped bars: overall and each pillar (x) per model (colour), 95% intervals as error bars.

    `results[model]` is a bench summary (`overall`, `overall_ci`, `pillars`, `pillars_ci`).
    """
    first = results[models[0]]
    names = ["Overall", *first["pillars"]]
    fig = _figure(max(6.0, 1.3 * len(names) + 0.4 * len(models)), 3.6)
    ax = fig.add_subplot()
    width = 0.8 / len(models)
    x = np.arange(len(names))
    for k, m in enumerate(models):
        r = results[m]
        means = [r["overall"], *(r["pillars"].get(p) for p in names[1:])]
        cis = [r["overall_ci"], *(r["pillars_ci"].get(p) for p in names[1:])]
        y = np.array([np.nan if v is None else v for v in means], dtype=float)
        lo = np.array([0.0 if c is None or v is None else max(v - c[0], 0.0) for v, c in zip(means, cis, strict=True)])
        hi = np.array([0.0 if c is None or v is None else max(c[1] - v, 0.0) for v, c in zip(means, cis, strict=True)])
        ax.bar(x + (k - (len(models) - 1) / 2) * width, np.nan_to_num(y), width, yerr=[lo, hi], capsize=3, label=m)
    ax.set_xticks(x, [n.replace(" ", "\n", 1) for n in names], fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("score (0-100)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, ncols=min(len(models), 4))
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def ratings_plot(rows: Sequence[dict[str, Any]], title: str) -> bytes:
    """Bradley-Terry and online-Elo ratings per model (best on top) with their 95% intervals."""
    fig = _figure(6.0, 0.5 * len(rows) + 1.4)
    ax = fig.add_subplot()
    y = np.arange(len(rows))[::-1]
    for key, dy, marker in (("bt", 0.12, "o"), ("elo", -0.12, "s")):
        v = np.array([r[key] for r in rows])
        # Online Elo is order-dependent: its point estimate can lie outside its own (order-shuffled)
        # bootstrap interval, so the bar lengths are clipped at 0 rather than drawn negative.
        lo = np.clip(v - np.array([r[f"{key}_ci"][0] for r in rows]), 0.0, None)
        hi = np.clip(np.array([r[f"{key}_ci"][1] for r in rows]) - v, 0.0, None)
        label = "Bradley-Terry (MLE)" if key == "bt" else "online Elo"
        ax.errorbar(v, y + dy, xerr=[lo, hi], fmt=marker, capsize=3, label=label)
    ax.set_yticks(y, [f"#{r['rank']} {r['model']}" for r in rows], fontsize=8)
    ax.set_xlabel("rating (Elo scale, 95% bootstrap interval)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def winrate_heatmap(models: Sequence[str], rate: Sequence[Sequence[float | None]], title: str) -> bytes:
    """Win rate of each row model over each column model (ties as 1/2); blank where no votes."""
    m = np.array([[np.nan if v is None else v for v in row] for row in rate], dtype=float)  # [M, M]
    n = len(models)
    fig = _figure(1.0 + 0.8 * n, 0.8 + 0.7 * n)
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(m), cmap="RdBu", vmin=0.0, vmax=1.0)
    for i in range(n):
        for j in range(n):
            if not math.isnan(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(n), models, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(n), models, fontsize=8)
    ax.set_xlabel("opponent")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return _png(fig)
