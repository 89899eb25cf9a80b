"""Which shape the oracle detects when a single-object prompt asks for one: a confusion table per model.

The base model's single-object shape accuracy (`qirl eval bench`) says how often the requested shape
is detected; this says what is drawn instead. Prompts: every `single` prompt of `val-t2i` and
`heldout-t2i`; images: the CLI's sampler (Euler ODE, CFG, fixed per-image noise `image_noise(seed, i)`),
`--seeds` images per prompt; detection: `qirl.shapes.detect` (the oracle's own detector; "none" = no
object found). Mean IoU is the detected object's soft IoU with its best-fitting shape template (1 = an
ideal shape; blobs score about 0.6-0.7).

`--sensitivity` adds how much the prompt's shape word moves the model's clean-image estimate, beside
how much its colour word does: for each (t, noise) the same x_t (gray background + noise) is denoised
under "a large red {shape} on a gray background" for the four shapes, and under "a large {colour}
circle ..." for four colours; the figure is the mean absolute deviation of ``x0_hat = x_t - t v``
(conditional, no CFG) from its mean over the four prompts, in latent units ([-1, 1] pixels), averaged
over 8 noises. A model that ignores a word scores near 0 for it. "text" is the same deviation of the
text encoder's token states (what the DiT attends to), before any denoising.

`--loss-gap` adds the flow-matching loss on 64 single-object training renders under their own caption
and how much it rises when one word of the caption names the wrong shape (or colour), per t: what the
word is worth to the model where the noisy image alone cannot tell the shape.

    python benchmarks/shape_confusion.py --model base
    python benchmarks/shape_confusion.py --model base --sensitivity
    python benchmarks/shape_confusion.py --model base --loss-gap
    python benchmarks/shape_confusion.py --model base --model runs/pretrain2 --shift 3.0
"""

from __future__ import annotations

import argparse
import collections
import json
from collections.abc import Sequence

import numpy as np
import torch

from qirl.models.policy import FlowPolicy
from qirl.models.registry import load_policy
from qirl.prompt_sets import builtin_prompts, image_noise
from qirl.sampling import sample_ode
from qirl.shapes import random_t2i_record, render_batch
from qirl.shapes.caption_parse import parse_caption
from qirl.shapes.detect import detect
from qirl.shapes.scene import COLORS, SHAPES, Scene, ShapeObject


def confusion(policy: FlowPolicy, model: str, seeds: int, steps: int, guidance: float, shift: float) -> dict:
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


def word_sensitivity(policy: FlowPolicy, noises: int = 8) -> dict[str, dict[str, float]]:
    """Mean |x0_hat - its mean over prompts| (and likewise of the text states) when only the shape (or
    only the colour) word changes."""
    words = {
        "shape": [f"a large red {s} on a gray background" for s in SHAPES],
        "colour": [f"a large {c} circle on a gray background" for c in ("red", "blue", "green", "yellow")],
    }
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(noises, *policy.latent_shape, generator=gen)  # [K, C, H, W]
    out: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for kind, prompts in words.items():
            cond = policy.encode(prompts * noises, [None] * (len(prompts) * noises))  # rows: noise-major
            text = cond.text[: len(prompts)]  # [4, L, Dt] the four prompts (one-token swaps: same L)
            out[kind] = {"text": round(float((text - text.mean(0, keepdim=True)).abs().mean()), 4)}
            x = eps.repeat_interleave(len(prompts), 0)  # [K*4, C, H, W] each noise under the 4 prompts
            for t in (0.5, 0.7, 0.9):
                x_t = t * x  # (1 - t) * gray background (latent 0) + t * eps
                x0 = x_t - t * policy.velocity(x_t, torch.full((len(x),), t), cond)  # [K*4, C, H, W]
                x0 = x0.reshape(noises, len(prompts), *x0.shape[1:])  # [K, 4, C, H, W]
                out[kind][f"t={t}"] = round(float((x0 - x0.mean(1, keepdim=True)).abs().mean()), 4)
    return out


def loss_gap(policy: FlowPolicy, n: int = 64, noises: int = 4) -> dict[str, dict[str, float]]:
    """The flow-matching loss on renders of ``n`` single-object training scenes under their own caption,
    and how much it rises when the caption names the wrong shape (or the wrong colour), per t.

    Captions are "a {size} {colour} {shape} on a {background} background"; the wrong one swaps a single
    word for the next shape (colour) in the vocabulary's order, so both captions have the same length.
    The rise is what the word is worth to the model's velocity at that noise level: 0 for a word the
    model ignores, large where the image alone cannot tell (high t) if the model listens to it.
    """
    rng = np.random.default_rng(5)
    scenes = [Scene.from_dict(random_t2i_record(rng, "train", "single")["scene"]) for _ in range(n)]

    def caption(o: ShapeObject, background: str, shape: str, colour: str) -> str:
        return f"a {o.size} {colour} {shape} on a {background} background"

    def after(options: Sequence[str], value: str) -> str:
        return options[(list(options).index(value) + 1) % len(options)]

    objects = [(s.objects[0], s.background) for s in scenes]
    prompts = {
        "true": [caption(o, bg, o.shape, o.color) for o, bg in objects],
        "shape": [caption(o, bg, after(SHAPES, o.shape), o.color) for o, bg in objects],
        "colour": [caption(o, bg, o.shape, after(list(COLORS), o.color)) for o, bg in objects],
    }
    x0 = policy.encode_images(render_batch(scenes))  # [n, C, H, W]
    gen = torch.Generator().manual_seed(1)
    eps = torch.randn(noises, *x0.shape, generator=gen)  # [K, n, C, H, W]
    out: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        conds = {k: policy.encode(v, [None] * n) for k, v in prompts.items()}
        for t in (0.2, 0.4, 0.6, 0.8, 0.95):
            loss = dict.fromkeys(conds, 0.0)
            for noise in eps:
                x_t = (1 - t) * x0 + t * noise  # [n, C, H, W]
                for kind, cond in conds.items():
                    v = policy.velocity(x_t, torch.full((n,), t), cond)  # [n, C, H, W]
                    loss[kind] += float((v - (noise - x0)).square().mean()) / noises
            out[f"t={t}"] = {
                "loss": round(loss["true"], 5),
                "wrong shape": round(loss["shape"] - loss["true"], 5),
                "wrong colour": round(loss["colour"] - loss["true"], 5),
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="a model, run or 'base' (repeatable)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--shift", type=float, default=1.0)
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--sensitivity", action="store_true", help="also how much the shape / colour word moves x0_hat")
    ap.add_argument("--loss-gap", action="store_true", help="also how much a wrong shape / colour word raises the loss")
    args = ap.parse_args()
    results = []
    for model in args.model:
        policy = load_policy(model)
        results.append(confusion(policy, model, args.seeds, args.steps, args.guidance, args.shift))
        if args.sensitivity:
            results[-1]["word_sensitivity"] = word_sensitivity(policy)
        if args.loss_gap:
            results[-1]["loss_gap"] = loss_gap(policy)
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
        for kind, by_t in r.get("word_sensitivity", {}).items():
            print(f"moved by the {kind} word (text states; x0_hat at t): " + ", ".join(f"{t} {v}" for t, v in by_t.items()))
        for t, row in r.get("loss_gap", {}).items():
            print(f"loss at {t}: {row['loss']}; wrong shape word +{row['wrong shape']}, wrong colour word +{row['wrong colour']}")


if __name__ == "__main__":
    main()
