"""Are two exported models bit-identical? Compares every tensor of every ``*.safetensors`` file of two model
folders (and the last metrics row of their runs, timings aside) — the check that a refactor left the
single-process math unchanged.

    # the same 3-iteration run from two checkouts (PYTHONPATH picks the code), then:
    qirl grpo recipes/t2i.yaml model=<base folder> train.iterations=3 eval.every=0 run.out_dir=runs/a
    python benchmarks/compare_exports.py runs/a runs/b
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    args = ap.parse_args()
    files = sorted((args.run_a / "model").glob("*.safetensors"))
    same = bool(files)
    for f in files:
        a, b = load_file(f), load_file(args.run_b / "model" / f.name)
        same &= a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads((run / "metrics.jsonl").read_text().splitlines()[-1]) for run in (args.run_a, args.run_b)]
    diff = {k: (rows[0][k], rows[1][k]) for k in rows[0] if not k.endswith("_s") and rows[0][k] != rows[1].get(k)}
    print(json.dumps({"weights_bit_identical": same, "files": len(files), "last_row_differences": diff}, indent=1))


if __name__ == "__main__":
    main()
