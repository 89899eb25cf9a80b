"""`qirl sample`: generate a folder of images from prompts (scored by `qirl score images`); the prompt
sets it reads are `qirl.prompt_sets`.

A sample folder holds `images/NNNN.png`, `sources/NNNN.png` (edits), `grid.png` and `samples.jsonl`
(each prompt record plus the paths and seed of its image). It is written in a temporary folder and
renamed into place at the end, so an interrupted run never leaves a half-written folder behind.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from qirl.data import (
    PromptRecord,
    make_grid,
    publish_mode,
    save_image_atomic,
    write_jsonl,
)
from qirl.errors import UserError
from qirl.models.registry import PolicyOptions, load_policy
from qirl.prompt_sets import image_noise, record_source
from qirl.sampling import sample_ode


@dataclass
class SampleOptions:
    steps: int = 20
    guidance: float = 3.0
    shift: float = 1.0
    seed: int = 0
    per_prompt: int = 1
    batch_size: int = 64
    policy: PolicyOptions = field(default_factory=lambda: PolicyOptions(device="cpu"))  # how to load the model


def generate(model: str, records: list[PromptRecord], out: str | Path, opts: SampleOptions) -> Iterator[dict[str, Any]]:
    """Sample `opts.per_prompt` images per record into the folder `out` (replaced atomically)."""
    if opts.steps < 1 or opts.per_prompt < 1 or opts.batch_size < 1:
        raise UserError("--steps, --per-prompt and --batch-size must be at least 1")
    policy = load_policy(model, options=opts.policy)
    size = policy.image_size
    jobs = [(r, k) for r in records for k in range(opts.per_prompt)]
    sources = [record_source(r, size) for r in records]  # validate every source before any work
    src_of = {id(r): s for r, s in zip(records, sources, strict=True)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        rows, images, pair_tiles = [], [], []
        for start in range(0, len(jobs), opts.batch_size):
            chunk = jobs[start : start + opts.batch_size]
            with torch.no_grad():
                cond = policy.encode([r.prompt for r, _ in chunk], [src_of[id(r)] for r, _ in chunk])
                noise = torch.stack(
                    [image_noise(opts.seed, start + j, tuple(policy.latent_shape)) for j in range(len(chunk))]
                )  # [b, C, H, W]
                latents = sample_ode(
                    policy, cond, num_steps=opts.steps, guidance=opts.guidance, shift=opts.shift, noise=noise
                )
                batch_images = policy.decode(latents).float().cpu()  # [b, 3, H, W]
            for j, (rec, k) in enumerate(chunk):
                idx = start + j
                row = {**rec.to_json(), "image": f"images/{idx:04d}.png", "sample": k, "seed": opts.seed}
                save_image_atomic(batch_images[j], tmp / row["image"])
                src = src_of[id(rec)]
                if src is not None:
                    row["source_image"] = f"sources/{idx:04d}.png"
                    row.pop("source", None)
                    save_image_atomic(src, tmp / row["source_image"])
                    pair_tiles.extend([src, batch_images[j]])
                else:
                    images.append(batch_images[j])
                rows.append(row)
            yield {"step": min(start + opts.batch_size, len(jobs)), "total": len(jobs)}
        if images:
            save_image_atomic(make_grid(torch.stack(images), ncol=8, upscale=2), tmp / "grid.png")
        if pair_tiles:
            save_image_atomic(make_grid(torch.stack(pair_tiles), ncol=8, upscale=2), tmp / "grid_edit.png")
        write_jsonl(tmp / "samples.jsonl", [{**r, "options": asdict(opts), "model": model} for r in rows])
        if out.exists():
            if not (out / "samples.jsonl").is_file():
                raise UserError(f"{out}: exists and is not a qirl sample folder; choose another --out")
            shutil.rmtree(out)
        publish_mode(tmp)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    yield {"done": True, "images": len(rows), "out": str(out), "model": model}
