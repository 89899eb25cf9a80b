"""Does a pointwise reward model read the prompt? Right scene vs another prompt's scene, both clean.

For N T2I prompts of the Shapes grammar (seeded), the clean render of each prompt's scene is scored
against that prompt, and so is the clean render of the *next* prompt's scene. Both images are flawless,
so only the prompt can tell them apart: a model that rates the image alone is at 0.5 (chance). Printed
per question (alignment, fidelity, quality) and for their mean (the composite of recipes/t2i_rm.yaml):
the share of prompts whose own scene scores higher. Quality judges the image alone, so 0.5 is right
for it.

    python benchmarks/reward_reads_prompt.py --model builtin --model runs/rm_t2i/model
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from vlm_cases import shapes_batch  # noqa: E402  (the tests' seeded Shapes batch)

from qirl.rewards.base import build_reward  # noqa: E402

DIMENSIONS = ("alignment", "fidelity", "quality")


def prompt_reading(path: str, n: int, seed: int) -> dict[str, float]:
    images, prompts, records = shapes_batch(2 * n, seed=seed)  # odd rows are edits: dropped
    t2i = [i for i, r in enumerate(records) if r.task == "t2i"]
    right, rows, asked = images[t2i], [records[i] for i in t2i], [prompts[i] for i in t2i]  # [n, 3, H, W]
    wrong = right.roll(1, dims=0)  # another prompt's scene
    out, total = {}, torch.zeros(len(t2i))
    for dim in DIMENSIONS:
        rm = build_reward("vlm_pointwise", path=path, dimension=dim, device="cpu")
        margin = rm(right, asked, rows) - rm(wrong, asked, rows)  # [n]
        out[dim] = round(float((margin > 0).float().mean()), 3)
        total += margin
    out["mean of the three"] = round(float((total > 0).float().mean()), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, help="a pointwise reward folder or 'builtin'")
    ap.add_argument("--n", type=int, default=48, help="prompts")
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for path in args.model:
        print(json.dumps({"model": path, "n": args.n, **prompt_reading(path, args.n, args.seed)}))


if __name__ == "__main__":
    main()
