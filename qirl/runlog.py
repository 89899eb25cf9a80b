"""A run's metrics log (`metrics.jsonl`): appended as training goes, cut back on resume."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from qirl.checkpoint import latest_checkpoint
from qirl.config import dump_recipe, to_dict
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
    """Appends metric rows to ``metrics.jsonl`` and, when asked, to TensorBoard and Weights & Biases.

    The JSONL is the record; the others are views of it, sent only finite scalar values keyed as in the
    JSONL, at the row's ``step``. TensorBoard (``<out>/tb``) is written when it is installed. Weights &
    Biases runs only when asked for (``run.wandb``) and must then be installed (``pip install
    'qirl[wandb]'``); its run lives in ``<out>/wandb`` with an id derived from the run folder, so a
    resumed run continues the same W&B run. ``WANDB_MODE=offline`` keeps it on disk (``wandb sync``
    uploads it later), as on a cluster without internet.
    """

    def __init__(self, path: Path, tensorboard: bool = True, wandb: dict[str, Any] | None = None) -> None:
        self.path = path
        self.writer = None
        self.wandb = _start_wandb(path.parent, **wandb) if wandb is not None else None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: JSONL only
                SummaryWriter = None  # noqa: N806
            if SummaryWriter is not None:
                self.writer = SummaryWriter(log_dir=str(path.parent / "tb"))

    def append(self, row: dict[str, Any]) -> None:
        append_metrics(self.path, row)
        if "step" not in row:
            return
        scalars = {
            k: v
            for k, v in row.items()
            if k not in ("step", "total") and isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
        }
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, row["step"])
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=int(row["step"]))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(out: Path, project: str, config: dict[str, Any], resumed: bool) -> Any:
    """A W&B run for the run folder ``out``: id from the folder's absolute path, resumed on --resume."""
    try:
        import wandb
    except ImportError:
        raise UserError("run.wandb=true needs Weights & Biases: pip install 'qirl[wandb]'") from None
    run_id = "qirl-" + hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:12]
    return wandb.init(
        project=project,
        name=out.name,
        id=run_id,
        dir=str(out),
        config=config,
        resume="allow" if resumed else None,
        reinit="create_new",
    )


class _NullLog:
    """What ranks other than 0 log to: nothing."""

    def append(self, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def open_metrics(out: Path, recipe: Any, resumed_step: int | None, tensorboard: bool, is_main: bool = True) -> Any:
    """`start_metrics` + `MetricsLog` on rank 0 (W&B when ``recipe.run.wandb``); a log that drops rows on
    the other ranks."""
    if not is_main:
        return _NullLog()
    run = getattr(recipe, "run", None)
    wandb = None
    if getattr(run, "wandb", False):
        wandb = {"project": run.wandb_project, "config": to_dict(recipe), "resumed": resumed_step is not None}
    return MetricsLog(start_metrics(out, recipe, resumed_step), tensorboard, wandb)
