"""Reading an annotation dataset (the `qirl.rewards.annotate` schema), checked split by split.

A `datasets.DatasetDict` saved with `save_to_disk`:

- `pointwise`, `pointwise_test`: image, prompt, task (t2i | edit), category, source_image (or None),
  quality, fidelity, alignment (Likert 1..5), oracle (0..100), reasons (list of short strings).
- `pairwise`, `pairwise_test`: prompt, task, category, image_a, image_b, source_image (or None),
  label (1.0 a preferred, 0.0 b preferred, 0.5 tie), reason, oracle_a, oracle_b, valid,
  text_distortion, figure_distortion.

Only the columns a command uses are required; a missing split or column is a `UserError` naming it
(and the columns the split does have).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image

from qirl.errors import UserError

LABEL_COLUMNS = ("quality", "fidelity", "alignment")


@contextmanager
def quiet_progress() -> Iterator[None]:
    """Silence transformers' and datasets' tqdm bars inside library calls (the library never prints;
    the CLI owns progress display), restoring the caller's setting after."""
    import datasets as dtqdm
    from transformers.utils import logging as tlog

    t_on, d_off = tlog.is_progress_bar_enabled(), dtqdm.are_progress_bars_disabled()
    tlog.disable_progress_bar()
    dtqdm.disable_progress_bars()
    try:
        yield
    finally:
        if t_on:
            tlog.enable_progress_bar()
        if not d_off:
            dtqdm.enable_progress_bars()


def load_annotations(path: str | Path) -> Any:
    """The `DatasetDict` at `path`; a comma-separated list of folders (annotation rounds, for example
    the base model's pool and a GRPO run's) is their union, split by split. A missing or unreadable
    folder is a `UserError`."""
    from datasets import DatasetDict, concatenate_datasets

    folders = [p.strip() for p in str(path).split(",") if p.strip()] if isinstance(path, str) else [path]
    if not folders:
        raise UserError("data.path: no annotation folder named")
    rounds = [_load_one(Path(f)) for f in folders]
    if len(rounds) == 1:
        return rounds[0]
    union = {}
    for split in dict.fromkeys(name for r in rounds for name in r):  # first-seen order
        parts = [r[split] for r in rounds if split in r]
        columns = [set(part.column_names) for part in parts]
        if differ := sorted(set.union(*columns) - set.intersection(*columns)):
            raise UserError(f"{path}: the rounds' {split!r} splits do not share one schema "
                            f"(column(s) {', '.join(differ)} only in some)")
        try:
            union[split] = concatenate_datasets(parts)
        except ValueError as err:  # datasets: the rounds' columns or types differ
            raise UserError(f"{path}: the rounds' {split!r} splits do not share one schema ({err})") from None
    return DatasetDict(union)


def _load_one(path: Path) -> Any:
    from datasets import DatasetDict, load_from_disk

    if not path.is_dir():
        raise UserError(
            f"{path}: annotation dataset folder not found (make one with qirl's annotate command)"
        )
    try:
        with quiet_progress():
            data = load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001 - datasets raises FileNotFoundError, ValueError, pyarrow errors
        raise UserError(f"{path}: not a readable datasets folder ({type(err).__name__}: {err})") from None
    if not isinstance(data, DatasetDict):
        raise UserError(
            f"{path}: expected a DatasetDict with pointwise/pairwise splits, got a single Dataset"
        )
    return data


def require(data: Any, split: str, columns: Sequence[str], where: str) -> Any:
    """`data[split]`, checked to have `columns`."""
    if split not in data:
        raise UserError(f"{where}: missing split {split!r} (has: {', '.join(data) or 'none'})")
    ds = data[split]
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise UserError(
            f"{where}: split {split!r} lacks column(s) {', '.join(missing)} (has: {', '.join(ds.column_names)})"
        )
    if len(ds) == 0:
        raise UserError(f"{where}: split {split!r} is empty")
    return ds


def needs_source(ds: Any, split: str, where: str) -> None:
    """Edit rows need their source image: a split with edits must have `source_image`."""
    if "edit" in set(ds["task"]) and "source_image" not in ds.column_names:
        raise UserError(f"{where}: split {split!r} has edit rows but no column 'source_image'")


def rgb(image: Any, where: str) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise UserError(f"{where}: expected an image, got {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


def image_row(row: dict[str, Any], key: str, where: str) -> list[Image.Image] | None:
    """The images a row shows the VLM: [image] for T2I, [source, image] for an edit; None if an edit
    has no source."""
    img = rgb(row[key], where)
    if row["task"] == "edit":
        src = row.get("source_image")
        return None if src is None else [rgb(src, where), img]
    return [img]
