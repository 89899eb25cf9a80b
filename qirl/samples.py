"""`qirl sample`: generate a folder of images from prompts (scored by `qirl score images`).

A sample folder holds `images/NNNN.png`, `sources/NNNN.png` (edits), `grid.png` and `samples.jsonl`
(each prompt record plus the paths and seed of its image). It is written in a temporary folder and
renamed into place at the end, so an interrupted run never leaves a half-written folder behind.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qirl.data import (
    PromptRecord,
    load_image,
    make_grid,
    publish_mode,
    read_jsonl,
    record_from_dict,
    save_image_atomic,
    write_jsonl,
)
from qirl.errors import UserError
from qirl.models.registry import PolicyOptions, load_policy
from qirl.sampling import sample_ode
from qirl.shapes import random_edit_record, random_t2i_record, render_batch
from qirl.shapes.scene import Scene

# Built-in prompt sets: fixed seeds, so every user and every run sees the same prompts. Held-out and
# validation sets use seeds the pretraining never draws from and include the creative split (unseen
# combinations). `val-*` is for training-time evaluation, recipe tuning and ablations; `heldout-*` only
# for the final figures in docs, so a recipe tuned on one is measured on prompts it never saw.
BUILTIN_SETS = {
    "demo": ("mixed", 16, 11),
    "heldout-t2i": ("t2i", 96, 1_000_001),
    "heldout-edit": ("edit", 48, 1_000_002),
    "val-t2i": ("t2i", 96, 2_000_001),
    "val-edit": ("edit", 48, 2_000_002),
}
# A validation record never repeats a held-out record or one of the first `VAL_EXCLUDED_POOL` records of
# a generated training pool (same prompt text for T2I; same instruction and source scene for an edit).
VAL_EXCLUDED_POOL = 1024


def _draw_set(kind: str, n: int, seed: int, excluded: frozenset[str] = frozenset()) -> list[dict]:
    """``n`` records from ``seed``; a draw whose `_identity` is in ``excluded`` is skipped (drawn again)."""
    rng = np.random.default_rng(seed)
    rows: list[dict] = []
    while len(rows) < n:
        i = len(rows)
        task = kind if kind != "mixed" else ("edit" if i % 4 == 3 else "t2i")
        split = "creative" if i % 6 == 5 else "train"
        row = random_t2i_record(rng, split=split) if task == "t2i" else random_edit_record(rng, split="train")
        if _identity(row) not in excluded:
            rows.append(row)
    return rows


def _identity(row: dict | PromptRecord) -> str:
    """What makes two prompt records the same task: the T2I prompt, or the instruction and its source."""
    if isinstance(row, PromptRecord):
        row = row.to_json()
    if row.get("task") == "edit":
        return f"edit|{row['prompt']}|{json.dumps(row.get('source_scene'), sort_keys=True)}"
    return f"t2i|{row['prompt']}"


@functools.cache
def _val_excluded() -> frozenset[str]:
    """Identities a validation set must not repeat: the held-out sets and the pools' first records."""
    return frozenset(
        _identity(r)
        for r in (
            *builtin_prompts("heldout-t2i"),
            *builtin_prompts("heldout-edit"),
            *generated_pool("shapes-t2i", VAL_EXCLUDED_POOL),
            *generated_pool("shapes-edit", VAL_EXCLUDED_POOL),
        )
    )


def builtin_prompts(name: str) -> list[PromptRecord]:
    """A named built-in prompt set (see `BUILTIN_SETS`)."""
    kind, n, seed = BUILTIN_SETS[name]
    rows = _draw_set(kind, n, seed, _val_excluded() if name.startswith("val-") else frozenset())
    return [record_from_dict({**row, "id": f"{name}-{i:04d}"}, f"{name}[{i}]") for i, row in enumerate(rows)]


# Generated training pools, "shapes-t2i:N" / "shapes-edit:N": N records of the grammar's train split from
# a fixed seed, e.g. the candidate pool `qirl curate` filters. Disjoint seeds from the held-out sets.
GENERATED_POOLS = {"shapes-t2i": ("t2i", 7), "shapes-edit": ("edit", 8)}


def generated_pool(kind: str, n: int) -> list[PromptRecord]:
    task, seed = GENERATED_POOLS[kind]
    rng = np.random.default_rng(seed)
    make = random_t2i_record if task == "t2i" else random_edit_record
    return [
        record_from_dict({**make(rng, split="train"), "id": f"{kind}-{i:05d}"}, f"{kind}:{n}[{i}]") for i in range(n)
    ]


def resolve_prompts(spec: str) -> list[PromptRecord]:
    """A built-in set name, a generated pool ("shapes-t2i:256"), a JSONL path, or several of them joined
    by commas (their records concatenated, e.g. "recipes/data/t2i_curated.jsonl,shapes-edit:256")."""
    if "," in spec:
        return [r for part in spec.split(",") if part.strip() for r in resolve_prompts(part.strip())]
    if spec in BUILTIN_SETS:
        return builtin_prompts(spec)
    kind, _, count = spec.partition(":")
    if kind in GENERATED_POOLS and count:
        if not count.isdigit() or int(count) < 1:
            raise UserError(f"{spec!r}: the pool size after ':' must be a positive integer")
        return generated_pool(kind, int(count))
    if not spec.endswith(".jsonl") and not Path(spec).exists():
        raise UserError(f"--prompts {spec!r}: not a file and not a built-in set ({', '.join(BUILTIN_SETS)})")
    return read_jsonl(spec)


def record_source(record: PromptRecord, size: int) -> torch.Tensor | None:
    """The source image `[3, H, W]` of an edit record (file or rendered Shapes scene); None for T2I."""
    if record.task != "edit":
        return None
    if record.source is not None:
        return load_image(record.source, size)
    assert record.source_scene is not None
    try:
        scene = Scene.from_dict(record.source_scene)
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"record {record.id or record.prompt!r}: invalid source_scene ({err})") from None
    return render_batch([scene], size)[0]


@dataclass
class SampleOptions:
    steps: int = 20
    guidance: float = 3.0
    shift: float = 1.0
    seed: int = 0
    per_prompt: int = 1
    batch_size: int = 64
    policy: PolicyOptions = field(default_factory=lambda: PolicyOptions(device="cpu"))  # how to load the model


def image_noise(seed: int, index: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Initial noise of image `index`: independent of batch size and of the other prompts."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.randn(shape, generator=gen)


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
