"""Rendering of metric generators: a rich progress bar with live metrics, or JSON, or nothing.

Every long qirl command is a library generator that yields metric dicts (spaCy's pattern); the CLI alone
decides how they are shown. A dict with `"done": True` is the final summary.
"""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

err_console = Console(stderr=True)
out_console = Console()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def live_metrics(stream: Iterator[dict[str, Any]], title: str, quiet: bool = False) -> dict[str, Any]:
    """Consume a metrics stream; show progress unless quiet; return the final summary.

    Metrics with `step` and `total` drive the bar; their other scalar keys are shown beside it.
    """
    summary: dict[str, Any] = {}
    stream = iter(stream)
    # Set-up errors (a bad file, a missing model) surface before anything is drawn, as one line.
    first = next(stream, None)
    if first is None:
        return summary
    stream = itertools.chain([first], stream)
    if quiet:
        for item in stream:
            if item.get("done"):
                summary = item
        return summary
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[metrics]}"),
    )
    with Progress(*columns, console=err_console, transient=False) as progress:
        task = progress.add_task(title, total=None, metrics="")
        for item in stream:
            if item.get("done"):
                summary = item
                continue
            shown = "  ".join(
                f"{k}={_fmt(v)}" for k, v in item.items() if k not in ("step", "total", "event") and not isinstance(v, (dict, list))
            )
            progress.update(task, completed=item.get("step", 0), total=item.get("total"), metrics=shown)
    return summary


def _cell(value: Any) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)  # a third level of nesting: compact, still exact
    return _fmt(value)


def _sub_table(name: str, value: dict[str, Any]) -> Table:
    """A nested result as its own table: {row: {column: value}} as a grid, {key: value} as two columns."""
    table = Table(title=name, title_justify="left")
    if all(isinstance(v, dict) for v in value.values()):
        columns = list(dict.fromkeys(k for row in value.values() for k in row))
        table.add_column("")
        for c in columns:
            table.add_column(str(c), justify="right")
        for key, row in value.items():
            table.add_row(str(key), *(_cell(row.get(c, "")) for c in columns))
    else:
        table.add_column("")
        table.add_column("value", justify="right")
        for key, v in value.items():
            table.add_row(str(key), _cell(v))
    return table


def print_summary(summary: dict[str, Any], as_json: bool, title: str) -> None:
    """The final summary: JSON on stdout for machines (the full structure), or tables for people: the
    scalars in one, and each nested result (per category, per reward, ...) in its own."""
    clean = {k: v for k, v in summary.items() if k != "done"}
    if as_json:
        sys.stdout.write(json.dumps(clean, indent=1, default=str) + "\n")
        return
    table = Table(title=title, show_header=False)
    nested = {}
    for key, value in clean.items():
        if isinstance(value, dict) and value:
            nested[key] = value
        elif isinstance(value, list):
            table.add_row(key, f"{len(value)} items (--json for all)")
        else:
            table.add_row(key, _fmt(value))
    out_console.print(table)
    for key, value in nested.items():
        out_console.print(_sub_table(key, value))


def print_rows(rows: list[dict[str, Any]], as_json: bool, title: str) -> None:
    """A list of records: JSON on stdout, or one table with a column per key."""
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=1, default=str) + "\n")
        return
    table = Table(title=title)
    for i, key in enumerate(dict.fromkeys(k for row in rows for k in row)):
        table.add_column(key, no_wrap=i == 0, overflow="fold")
    for row in rows:
        table.add_row(*(_cell(v) for v in row.values()))
    out_console.print(table)
