"""Mismatched-caption rows for an annotation set: the same images, judged against another prompt.

Why: in a pool from `qirl.rewards.annotate`, every image is rated only against the prompt it was made
for, and a clean picture nearly always earns a high rating. A reward model can then fit the labels
from the image alone and never learn to read the prompt; the #15 reward model did exactly that (it
scores a clean render of another prompt's scene as high as the right one: docs/rewards.md). Rating
the same image against a different prompt breaks the shortcut: the pixels are unchanged, only the
prompt explains why the rating drops. This is the hard-negative idea of image-text matching (for
example ALBEF, Li et al. 2021, "Align before Fuse", arXiv:2107.07651, Sec. 3.2), applied to Likert
ratings.

`mismatch(src, out, fraction, seed)`: for `fraction` of the T2I rows of each pointwise split of
`src`, another prompt of the same split is drawn (a different string, uniformly), the image is judged
against it by the oracle (`qirl.shapes.judge.judge_t2i`), and the simulated annotators of `annotate`
rate it (`noisy_likert` with the same noise settings). The result is a DatasetDict with `pointwise`
and `pointwise_test` only, in the annotation schema, to be used as one more round:
`qirl score train ... data.path=<src>,<out>`. Test rows use test prompts only, so held-out prompts stay
held out. Written under a temporary name and renamed into place, like `annotate`.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image

from qirl.errors import UserError
from qirl.rewards.annotate import LIKERT_DIMS, POINTWISE_FEATURES, noisy_likert, publish_annotations
from qirl.shapes.judge import judge_t2i

SPLITS = ("pointwise", "pointwise_test")


def _mismatched_split(ds: Any, fraction: float, rng: np.random.Generator, noise: float, slip: float) -> dict:
    raw = ds.cast_column("image", datasets.Image(decode=False)).cast_column(
        "source_image", datasets.Image(decode=False))
    asked, cats = raw["prompt"], raw["category"]
    t2i = [i for i, task in enumerate(raw["task"]) if task == "t2i"]
    prompts = sorted({asked[i] for i in t2i})
    category = {asked[i]: cats[i] for i in t2i}
    cols: dict[str, list[Any]] = {k: [] for k in POINTWISE_FEATURES}
    if len(prompts) < 2:
        return cols
    chosen = rng.permutation(t2i)[: round(fraction * len(t2i))]
    for i in sorted(int(c) for c in chosen):
        row = raw[i]
        other = row["prompt"]
        while other == row["prompt"]:
            other = prompts[int(rng.integers(len(prompts)))]
        pixels = np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB"), np.float32) / 255.0
        truth = judge_t2i(pixels, other)
        labels = {d: noisy_likert(truth.latent(d), rng, noise, slip) for d in LIKERT_DIMS}
        new = {"image": row["image"], "prompt": other, "task": "t2i", "category": category[other],
               "source_image": None, **labels, "oracle": truth.overall, "reasons": list(truth.reasons)}
        for k, v in new.items():
            cols[k].append(v)
    return cols


def mismatch(src: str | Path, out: str | Path, fraction: float = 0.5, seed: int = 0,
             likert_noise: float = 8.0, slip_rate: float = 0.05) -> dict[str, Any]:
    """Write the mismatched-caption round of `src` to `out` (module docstring); returns its summary."""
    from qirl.rewards.vlm.data import load_annotations

    if not 0.0 < fraction <= 1.0:
        raise UserError(f"fraction must be in (0, 1], got {fraction}")
    if likert_noise < 0 or not 0.0 <= slip_rate <= 1.0:
        raise UserError("likert_noise must be >= 0 and slip_rate in [0, 1]")
    src, out = Path(src), Path(out)
    if out.exists() and not (out / "annotations.json").is_file():
        raise UserError(f"{out}: exists and is not an annotation folder; choose another out")
    data = load_annotations(str(src))
    if "pointwise" not in data:
        raise UserError(f"{src}: no 'pointwise' split to mismatch")
    t0 = time.perf_counter()
    rng = np.random.default_rng([seed, 41])
    splits = {name: _mismatched_split(data[name], fraction, rng, likert_noise, slip_rate)
              for name in SPLITS if name in data}
    # A split with fewer than two prompts has nothing to swap; an empty split would not load back.
    dd = datasets.DatasetDict({name: datasets.Dataset.from_dict(cols, features=POINTWISE_FEATURES)
                               for name, cols in splits.items() if cols["prompt"]})
    if "pointwise" not in dd:
        raise UserError(f"{src}: the 'pointwise' split needs T2I rows of at least two prompts")
    summary = {"source": str(src), "out": str(out), "fraction": fraction, "seed": seed,
               "likert_noise": likert_noise, "slip_rate": slip_rate,
               "counts": {name: len(ds) for name, ds in dd.items()},
               "oracle_mean": {name: float(np.mean(ds["oracle"])) if len(ds) else None for name, ds in dd.items()},
               "seconds": round(time.perf_counter() - t0, 1)}
    publish_annotations(dd, out, lambda: summary)
    return summary
