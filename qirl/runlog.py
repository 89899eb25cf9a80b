"""A run's metrics log (`metrics.jsonl`): appended as training goes, cut back on resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qirl.data import atomic_write_text


def append_metrics(path: Path, row: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop rows logged after the checkpoint so the curve continues without a fork."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= last_step]
    atomic_write_text(path, "".join(r + "\n" for r in rows))
