"""`qirl eval seeds`: a recipe's result over several training seeds, read from one bench folder.

A recipe run at several training seeds (`run.seed`) gives one model per seed; benching them together
(`qirl eval bench --model base --model rl0=... --model rl1=...`) scores every model on the same
prompts, seeds and initial noise, and gives each its paired change over the first model (`vs`,
bench.py). Each model's bench interval covers prompt sampling only; whether the *recipe* beats the base
also depends on the training seed, which one model cannot show. This pools an arm's models:

- the per-seed overall and paired change, and their means over the n training seeds;
- the 95% Student-t interval of the mean change over the training seeds,
  ``mean +- t_{0.975, n-1} s / sqrt(n)`` (s the sample standard deviation over seeds; Student 1908),
  the interval the report-style claim "the recipe improves on the base" needs. With n = 3, t = 4.30,
  so three seeds that agree within a point give an interval about +-2.5 wide;
- the mean change of each pillar (T2I pillars; Success / Preservation / Quality for edits).
"""

from __future__ import annotations

from pathlib import Path
from statistics import fmean
from typing import Any

from scipy import stats

from qirl.errors import UserError
from qirl.eval.bench import MARKER
from qirl.eval.io import read_json


def parse_arms(specs: list[str]) -> dict[str, list[str]]:
    """``["rl=rl0,rl1,rl2", ...]`` -> {"rl": ["rl0", "rl1", "rl2"], ...}."""
    arms: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, labels = spec.partition("=")
        members = [x.strip() for x in labels.split(",") if x.strip()]
        if not sep or not name.strip() or not members:
            raise UserError(f"--arm must be NAME=LABEL[,LABEL...] (the bench's model labels), got {spec!r}")
        if name.strip() in arms:
            raise UserError(f"--arm {name.strip()!r} is given twice")
        arms[name.strip()] = members
    if not arms:
        raise UserError("give at least one --arm NAME=LABEL[,LABEL...]")
    return arms


def mean_interval(values: list[float]) -> tuple[float, list[float] | None]:
    """Mean and 95% Student-t interval over ``values`` (None for a single value): scipy's
    ``t.interval`` with the standard error of the mean, ``s / sqrt(n)``."""
    mean = fmean(values)
    if len(values) < 2:
        return mean, None
    lo, hi = stats.t.interval(0.95, len(values) - 1, loc=mean, scale=stats.sem(values))
    return mean, [float(lo), float(hi)]


def seed_summary(bench: str | Path, arm_specs: list[str]) -> dict[str, Any]:
    """Each arm's per-seed and mean overall and paired change over the bench's first model, per task."""
    folder = Path(bench)
    if not (folder / MARKER).is_file():
        raise UserError(f"{folder}: not a bench folder (no {MARKER}; make one with `qirl eval bench`)")
    results: dict[str, dict[str, Any]] = read_json(folder / MARKER, "bench summary")["results"]
    labels = list(results)
    reference = labels[0]
    arms = parse_arms(arm_specs)
    rows: list[dict[str, Any]] = []
    for name, members in arms.items():
        for label in members:
            if label not in results:
                raise UserError(f"--arm {name}: {label!r} is not a model of {folder} ({', '.join(labels)})")
            if label == reference:
                raise UserError(f"--arm {name}: {label!r} is the bench's reference (its first model)")
        for task in results[reference]:
            if not all(task in results[m] for m in members):
                continue
            ref = results[reference][task]
            per = [results[m][task] for m in members]
            changes = [r["vs"][reference]["change"] for r in per]
            change, ci = mean_interval(changes)
            overall = fmean(r["overall"] for r in per)
            pillars = {
                p: round(fmean(r["pillars"][p] - v for r in per), 2)
                for p, v in ref["pillars"].items()
                if v is not None and all(r["pillars"].get(p) is not None for r in per)
            }
            rows.append({
                "arm": name, "task": task, "seeds": len(members), "reference": reference,
                "reference_overall": ref["overall"], "overall": round(overall, 2),
                "change": round(change, 2), "change_ci": None if ci is None else [round(x, 2) for x in ci],
                "per_seed_change": changes, "per_seed_overall": [r["overall"] for r in per],
                "pillar_change": pillars,
            })
    return {"bench": str(folder), "reference": reference, "rows": rows}


def flat_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One table row per (arm, task) for people."""
    out = []
    for r in summary["rows"]:
        ci = r["change_ci"]
        change = f"{r['change']:+.1f}" + ("" if ci is None else f" [{ci[0]:+.1f}, {ci[1]:+.1f}]")
        out.append({
            "arm": r["arm"], "task": r["task"], "seeds": r["seeds"], "overall": f"{r['overall']:.1f}",
            f"change vs {r['reference']} (95%, t over seeds)": change,
            "per seed": ", ".join(f"{c:+.1f}" for c in r["per_seed_change"]),
            "pillar change": ", ".join(f"{p} {v:+.1f}" for p, v in r["pillar_change"].items()),
        })
    return out
