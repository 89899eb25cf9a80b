"""Which shape the oracle detects when a single-object prompt asks for one: a confusion table per model.

The base model's single-object shape accuracy (`qirl eval bench`) says how often the requested shape
is detected; this says what is drawn instead. Prompts: every `single` prompt of `val-t2i` and
`heldout-t2i`; images: the CLI's sampler (Euler ODE, CFG, fixed per-image noise `image_noise(seed, i)`),
`--seeds` images per prompt; detection: `qirl.shapes.detect` (the oracle's own detector; "none" = no
object found). Mean IoU is the detected object's soft IoU with its best-fitting shape template (1 = an
ideal shape; blobs score about 0.6-0.7).

    python benchmarks/shape_confusion.py --model base
    python benchmarks/shape_confusion.py --model base --model runs/pretrain2 --shift 3.0
"""

from __future__ import annotations

import argparse
import collections
import json

import numpy as np
import torch

from qirl.models.registry import load_policy
from qirl.prompt_sets import builtin_prompts, image_noise
from qirl.sampling import sample_ode
from qirl.shapes.caption_parse import parse_caption
from qirl.shapes.detect import detect
from qirl.shapes.scene import SHAPES


def confusion(model: str, seeds: int, steps: int, guidance: float, shift: float) -> dict:
    policy = load_policy(model)
    records = [r for r in builtin_prompts("val-t2i") + builtin_prompts("heldout-t2i") if r.category == "single"]
    wanted = [parse_caption(r.prompt).objects[0].shape for r in records]
    table: dict[str, collections.Counter] = {s: collections.Counter() for s in SHAPES}
    ious: dict[str, list[float]] = {s: [] for s in SHAPES}
    for seed in range(seeds):
        with torch.no_grad():
            cond = policy.encode([r.prompt for r in records], [None] * len(records))
            noise = torch.stack([image_noise(seed, i, tuple(policy.latent_shape)) for i in range(len(records))])
            latents = sample_ode(policy, cond, steps, guidance=guidance, shift=shift, noise=noise)
            images = policy.decode(latents).float().clamp(0, 1)  # [n, 3, H, W]
        for want, image in zip(wanted, images, strict=True):
            found = detect(image)
            table[want][found[0].shape if found else "none"] += 1
            if found:
                ious[want].append(found[0].iou)
    hits = sum(table[s][s] for s in SHAPES)
    total = sum(sum(c.values()) for c in table.values())
    return {
        "model": model,
        "images": total,
        "accuracy": round(100 * hits / total, 1),
        "table": {s: dict(table[s]) for s in SHAPES if table[s]},
        "mean_iou": {s: round(float(np.mean(v)), 3) for s, v in ious.items() if v},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="a model, run or 'base' (repeatable)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--shift", type=float, default=1.0)
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    results = [confusion(m, args.seeds, args.steps, args.guidance, args.shift) for m in args.model]
    if args.json:
        print(json.dumps(results, indent=1))
        return
    for r in results:
        print(f"{r['model']}: requested shape detected in {r['accuracy']}% of {r['images']} images")
        columns = [*SHAPES, "none"]
        print("| requested | " + " | ".join(columns) + " | mean IoU |")
        print("|" + " --- |" * (len(columns) + 2))
        for s, row in r["table"].items():
            print(f"| {s} | " + " | ".join(str(row.get(c, 0)) for c in columns) + f" | {r['mean_iou'].get(s, 'n/a')} |")


if __name__ == "__main__":
    main()
