"""A run's metrics log (`metrics.jsonl`): appended as training goes, cut back on resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qirl.checkpoint import latest_checkpoint
from qirl.config import dump_recipe
from qirl.data import atomic_write_text
from qirl.errors import UserError
from qirl.files import read_text


def append_metrics(path: Path, row: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop rows logged after the checkpoint so the curve continues without a fork."""
    if not path.is_file():
        return
    kept = []
    for lineno, line in enumerate(read_text(path, "metrics log").splitlines(), start=1):
        if not line:
            continue
        try:
            step = json.loads(line).get("step", 0)
        except (json.JSONDecodeError, AttributeError):
            raise UserError(f"{path}:{lineno}: malformed metrics row (not a JSON object)") from None
        if step <= last_step:
            kept.append(line)
    atomic_write_text(path, "".join(r + "\n" for r in kept))


def checkpoint_to_resume(out: Path, resume: bool) -> Path | None:
    """The checkpoint a run continues from, None for a fresh run.

    A fresh run never overwrites a run directory that has checkpoints, and `--resume` with nothing to
    resume is an error: both are one-line `UserError`s naming the directory.
    """
    existing = latest_checkpoint(out) if out.exists() else None
    if existing is not None and not resume:
        raise UserError(f"{out}: run directory has checkpoints; pass --resume or choose another run.out_dir")
    if resume and existing is None:
        raise UserError(f"{out}: nothing to resume (no checkpoint found)")
    return existing


def start_metrics(out: Path, recipe: Any, resumed_step: int | None) -> Path:
    """The run's `metrics.jsonl`: cut back to `resumed_step` on resume; on a fresh run, any old log is
    removed and the recipe is written beside it (`recipe.yaml`, to rerun the run exactly)."""
    out.mkdir(parents=True, exist_ok=True)
    metrics_file = out / "metrics.jsonl"
    if resumed_step is not None:
        truncate_metrics(metrics_file, resumed_step)
    else:
        atomic_write_text(out / "recipe.yaml", dump_recipe(recipe))
        metrics_file.unlink(missing_ok=True)
    return metrics_file


class MetricsLog:
    """Appends metric rows to ``metrics.jsonl`` and, when TensorBoard is installed, to ``<out>/tb``.

    TensorBoard is optional (``pip install tensorboard``): the JSONL is the record, the event files are
    a view of it. Only finite scalar values are sent there, keyed as in the JSONL.
    """

    def __init__(self, path: Path, tensorboard: bool = True) -> None:
        self.path = path
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: JSONL only
                SummaryWriter = None  # noqa: N806
            if SummaryWriter is not None:
                self.writer = SummaryWriter(log_dir=str(path.parent / "tb"))

    def append(self, row: dict[str, Any]) -> None:
        append_metrics(self.path, row)
        if self.writer is not None and "step" in row:
            for key, value in row.items():
                if key not in ("step", "total") and isinstance(value, (int, float)) and value == value:
                    self.writer.add_scalar(key, value, row["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class _NullLog:
    """What ranks other than 0 log to: nothing."""

    def append(self, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def open_metrics(out: Path, recipe: Any, resumed_step: int | None, tensorboard: bool, is_main: bool = True) -> Any:
    """`start_metrics` + `MetricsLog` on rank 0; a log that drops rows on the other ranks."""
    if not is_main:
        return _NullLog()
    return MetricsLog(start_metrics(out, recipe, resumed_step), tensorboard)
