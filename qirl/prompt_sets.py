"""Prompt sets and what every command derives from a prompt record: its edit source and its noise.

Built-in sets (`demo`, `val-*`, `heldout-*`), generated training pools (`shapes-t2i:N`), JSONL files,
and comma-joined lists of them resolve here (`resolve_prompts`), below every command that reads
prompts (`qirl sample`, curate, grpo, distill, eval), so none of them imports another command's module.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch

from qirl.builtin_recipes import shipped_path
from qirl.data import PromptRecord, load_image, read_jsonl, record_from_dict
from qirl.errors import UserError
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
    # 240 held-out edits: a recipe's effect of a few points is within the noise of heldout-edit's 48
    # (docs/grpo.md, "Editing RL, fourth round"); for final figures only, as heldout-edit
    "heldout-edit-large": ("edit", 240, 1_000_012),
    "val-t2i": ("t2i", 96, 2_000_001),
    "val-edit": ("edit", 48, 2_000_002),
    # 240 edits (40 per kind on average): val-edit's 48 give about 8 per kind, too few to see a recipe
    # trade one kind for another (docs/grpo.md, "Editing RL, fourth round")
    "val-edit-large": ("edit", 240, 2_000_012),
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
            *builtin_prompts("heldout-edit-large"),
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
    spec = shipped_path(spec)  # recipes/data/... of a built-in recipe, from any folder
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


def image_noise(seed: int, index: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Initial noise of image `index`: independent of batch size and of the other prompts."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.randn(shape, generator=gen)
