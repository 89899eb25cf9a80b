"""A small annotation set in the `qirl.rewards.annotate` schema, from Shapes renders and the oracle.

For tests and smoke runs of reward-model training only; the real synthetic annotations (noisy
human-like raters, the report's preference priorities) come from `qirl.rewards.annotate`. Each prompt
gets variants whose oracle scores differ for known reasons:

    clean    the caption's own scene                    (oracle ~100)
    partial  one object removed, or recoloured if alone (alignment drops)
    other    a different scene                          (alignment drops)
    blurred  clean, 3x3 box blur                        (quality, fidelity drop)
    noisy    clean + N(0, 0.15^2) pixel noise           (quality, fidelity drop)
    blank    background only                            (everything drops)

Likert labels are the oracle's pillars binned, 1 + round(v / 25), and moved by one point with
probability `label_noise`; pairs (same prompt) prefer the higher oracle score unless the two are within
`tie_margin` points, which is a tie (label 0.5).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from qirl.data import to_pil
from qirl.rewards.vlm.data import quiet_progress
from qirl.shapes import COLORS, random_t2i_record, render_batch, score_t2i
from qirl.shapes.scene import Scene

VARIANTS = ("clean", "partial", "other", "blurred", "noisy", "blank")
REASONS = {
    "clean": [],
    "partial": ["an object is missing or has the wrong colour"],
    "other": ["the objects do not match the prompt"],
    "blurred": ["edges are blurry"],
    "noisy": ["the image is noisy", "the background is not clean"],
    "blank": ["the image is blank", "all objects are missing"],
}
PILLAR_OF = {"quality": "Quality", "fidelity": "Real-world Fidelity", "alignment": "Alignment"}


def _variant(name: str, scene: Scene, rng: np.random.Generator, size: int) -> torch.Tensor:
    if name == "partial":
        objs = list(scene.objects)
        if len(objs) > 1:
            objs.pop(int(rng.integers(len(objs))))
        else:
            other = [c for c in COLORS if c != objs[0].color]
            objs[0] = dataclasses.replace(objs[0], color=other[int(rng.integers(len(other)))])
        scene = Scene(tuple(objs), scene.background)
    elif name == "other":
        scene = Scene.from_dict(random_t2i_record(rng)["scene"])
    elif name == "blank":
        scene = Scene((), scene.background)
    img = render_batch([scene], size)[0]  # [3, H, W]
    if name == "blurred":
        kernel = torch.ones(3, 1, 3, 3) / 9.0
        img = F.conv2d(F.pad(img[None], (1, 1, 1, 1), mode="replicate"), kernel, groups=3)[0]
    elif name == "noisy":
        noise = torch.from_numpy(rng.normal(0.0, 0.15, img.shape).astype(np.float32))
        img = (img + noise).clamp(0, 1)
    return img


def _likert(v: float | None, rng: np.random.Generator, noise: float) -> int:
    k = 1 + round((v if v is not None else 100.0) / 25.0)
    if rng.random() < noise:
        k += 1 if rng.random() < 0.5 else -1
    return int(min(5, max(1, k)))


def _prompt_rows(
    rng: np.random.Generator, n_prompts: int, variants: tuple[str, ...], size: int, noise: float
) -> list[list[dict]]:
    groups = []
    for _ in range(n_prompts):
        rec = random_t2i_record(rng)
        scene = Scene.from_dict(rec["scene"])
        rows = []
        for name in variants:
            img = _variant(name, scene, rng, size)
            oracle = score_t2i(img, rec["prompt"])
            row: dict[str, Any] = {
                "image": to_pil(img),
                "prompt": rec["prompt"],
                "task": "t2i",
                "category": rec["category"],
                "source_image": None,
                "oracle": float(oracle.overall),
                "reasons": list(REASONS[name]),
            }
            for dim, pillar in PILLAR_OF.items():
                row[dim] = _likert(oracle.pillars.get(pillar), rng, noise)
            rows.append(row)
        groups.append(rows)
    return groups


def _pairs(
    groups: list[list[dict]], rng: np.random.Generator, pairs_per_prompt: int, tie_margin: float
) -> list[dict]:
    out = []
    for rows in groups:
        for _ in range(pairs_per_prompt):
            i, j = rng.choice(len(rows), size=2, replace=False)
            a, b = rows[int(i)], rows[int(j)]
            diff = a["oracle"] - b["oracle"]
            label = 0.5 if abs(diff) <= tie_margin else float(diff > 0)
            out.append(
                {
                    "prompt": a["prompt"],
                    "task": "t2i",
                    "category": a["category"],
                    "image_a": a["image"],
                    "image_b": b["image"],
                    "source_image": None,
                    "label": label,
                    "reason": "tie" if label == 0.5 else "consistency",
                    "oracle_a": a["oracle"],
                    "oracle_b": b["oracle"],
                    "valid": True,
                    "text_distortion": False,
                    "figure_distortion": False,
                }
            )
    return out


def toy_annotations(
    n_prompts: int = 24,
    n_test_prompts: int = 8,
    variants: tuple[str, ...] = VARIANTS,
    pairs_per_prompt: int = 6,
    size: int = 32,
    label_noise: float = 0.1,
    tie_margin: float = 2.0,
    seed: int = 0,
) -> Any:
    """A `DatasetDict` with pointwise, pointwise_test, pairwise, pairwise_test splits (module docstring)."""
    from datasets import Dataset, DatasetDict, Features, Image, Sequence, Value

    rng = np.random.default_rng(seed)
    common = {
        "prompt": Value("string"),
        "task": Value("string"),
        "category": Value("string"),
        "source_image": Image(),
    }
    point = Features(
        {
            **common,
            "image": Image(),
            "quality": Value("int64"),
            "fidelity": Value("int64"),
            "alignment": Value("int64"),
            "oracle": Value("float64"),
            "reasons": Sequence(Value("string")),
        }
    )
    pair = Features(
        {
            **common,
            "image_a": Image(),
            "image_b": Image(),
            "label": Value("float64"),
            "reason": Value("string"),
            "oracle_a": Value("float64"),
            "oracle_b": Value("float64"),
            "valid": Value("bool"),
            "text_distortion": Value("bool"),
            "figure_distortion": Value("bool"),
        }
    )
    splits = {}
    for suffix, n in (("", n_prompts), ("_test", n_test_prompts)):
        groups = _prompt_rows(rng, n, variants, size, label_noise)
        splits["pointwise" + suffix] = Dataset.from_list([r for g in groups for r in g], features=point)
        splits["pairwise" + suffix] = Dataset.from_list(
            _pairs(groups, rng, pairs_per_prompt, tie_margin), features=pair
        )
    return DatasetDict(splits)


def save_toy_annotations(path: str | Path, **kwargs: Any) -> Path:
    """Build `toy_annotations(**kwargs)` and `save_to_disk` it at `path`."""
    data = toy_annotations(**kwargs)
    with quiet_progress():
        data.save_to_disk(str(path))
    return Path(path)
