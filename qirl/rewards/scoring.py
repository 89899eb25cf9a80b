"""`qirl score images`: score a folder written by `qirl sample`, or any JSONL of images, in one pass.

A manifest row needs `image` (a path relative to the manifest) and `prompt`; an edit row (`task: edit`)
also needs `source_image`. Every image gets the Shapes oracle's checklist (the truth, cheap) and, when
a composite is given, the value of each of its reward models. Results go to `scores.jsonl` (each row as
read, plus `oracle` and `rewards`), written atomically; the summary gives per-task means: the oracle's
pillars (T2I) or success / preservation / quality (edit), and each reward.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qirl.data import load_image, read_json_lines, write_jsonl
from qirl.errors import UserError
from qirl.rewards.base import RewardRecord
from qirl.rewards.composite import CompositeReward
from qirl.shapes import aggregate, aggregate_edits, score_edit, score_t2i

CHUNK = 64  # images scored per reward call


def read_manifest(path: str | Path) -> tuple[Path, list[tuple[int, dict[str, Any]]]]:
    """(manifest path, validated rows) of a sample folder or a JSONL file."""
    path = Path(path)
    manifest = path / "samples.jsonl" if path.is_dir() else path
    if not manifest.is_file():
        raise UserError(f"{path}: no samples.jsonl (not a folder written by `qirl sample`) and not a JSONL file")
    rows = read_json_lines(manifest, "sample manifest")
    if not rows:
        raise UserError(f"{manifest}: no images listed")
    for lineno, row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not isinstance(row.get("prompt"), str):
            raise UserError(f"{manifest}:{lineno}: needs string 'image' and 'prompt'")
        if row.get("task", "t2i") == "edit" and not isinstance(row.get("source_image"), str):
            raise UserError(f"{manifest}:{lineno}: edit row needs 'source_image'")
    return manifest, rows


def score_images(
    path: str | Path, composite: CompositeReward | None = None, out: str | Path | None = None
) -> Iterator[dict[str, Any]]:
    """Score every listed image; yield progress, then the summary (`done`)."""
    manifest, rows = read_manifest(path)
    root = manifest.parent
    out = Path(out) if out is not None else root / "scores.jsonl"
    t2i_scores, edit_scores, out_rows = [], [], []
    names = composite.names if composite is not None else []
    totals: dict[tuple[str, str], list[float]] = {}
    for start in range(0, len(rows), CHUNK):
        chunk = rows[start : start + CHUNK]
        images = [load_image(root / row["image"]) for _, row in chunk]  # each [3, H, W]
        sources = [load_image(root / row["source_image"]) if row.get("task") == "edit" else None for _, row in chunk]
        for (_, row), image, source in zip(chunk, images, sources, strict=True):
            arr = image.permute(1, 2, 0).numpy()  # [H, W, 3]
            if source is not None:
                s = score_edit(source.permute(1, 2, 0).numpy(), row["prompt"], arr)
                edit_scores.append(s)
            else:
                s = score_t2i(arr, row["prompt"])
                t2i_scores.append(s)
            out_rows.append({**row, "oracle": _as_dict(s)})
        if composite is not None:
            values = _score_chunk(composite, chunk, images, sources)  # [b, K]
            for j, (_, row) in enumerate(chunk):
                rewards = {n: _finite(values[j, k]) for k, n in enumerate(names)}
                out_rows[start + j]["rewards"] = rewards
                for n, v in rewards.items():
                    if v is not None:
                        totals.setdefault((row.get("task", "t2i"), n), []).append(v)
        yield {"step": min(start + CHUNK, len(rows)), "total": len(rows)}
    write_jsonl(out, out_rows)
    summary: dict[str, Any] = {"done": True, "scores": str(out)}
    if t2i_scores:
        agg = aggregate(t2i_scores)
        summary["t2i_images"] = agg.pop("n")
        summary["t2i_overall"] = _round(agg.pop("overall"))
        summary["t2i_pillars"] = {k: _round(v) for k, v in agg.items()}
    if edit_scores:
        agg = aggregate_edits(edit_scores)
        summary["edit_images"] = agg.pop("n")
        summary.update({f"edit_{k}": _round(v) for k, v in agg.items()})
    for task in ("t2i", "edit"):
        means = {n: round(float(np.mean(totals[(task, n)])), 4) for n in names if (task, n) in totals}
        if means:
            summary[f"{task}_rewards"] = means
    yield summary


def _score_chunk(composite: CompositeReward, chunk, images, sources) -> torch.Tensor:
    """Rewards [b, K] of one chunk; images of different sizes are scored one by one."""
    prompts = [row["prompt"] for _, row in chunk]
    records = [
        RewardRecord(task=row.get("task", "t2i"), category=row.get("category", "default"), source=src)
        for (_, row), src in zip(chunk, sources, strict=True)
    ]
    if len({tuple(im.shape) for im in images}) == 1:
        return composite.score_all(torch.stack(images), prompts, records)
    return torch.cat(
        [composite.score_all(im[None], [p], [r]) for im, p, r in zip(images, prompts, records, strict=True)]
    )


def _finite(value: torch.Tensor) -> float | None:
    v = float(value)
    return None if v != v else round(v, 6)  # NaN -> null in JSON


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 2)


def _as_dict(score: Any) -> dict[str, Any]:
    """Scores and pillars of one image, with its checklist items as [pillar, name, value]."""
    d = asdict(score)
    d["items"] = [list(item) for item in score.items]
    return d
