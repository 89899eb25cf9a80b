"""`qirl eval bench`: Qwen-Image-Bench-style pillar scores of one or more models, with bootstrap intervals.

Each model generates `seeds` images for every prompt of a fixed set (`heldout-t2i`, 96 prompts, and
`heldout-edit`, 48 edits, unless `--prompts` names another), all models from the same initial noise per
(prompt, seed) (models.py). A judge (judges.py; the oracle by default) scores every image:

- T2I: checklist items 0 / 1 / 2 / N/A -> 0 / 60 / 100, N/A left out, averaged item -> sub-dimension
  -> pillar -> image (mean of the pillars that apply) -> set, in the five pillars Quality, Aesthetics,
  Alignment, Real-world Fidelity, Creative Generation (Qwen-Image-Bench; checklist.py).
- Edit: Success, Preservation, Quality per image and overall = sqrt(Success x Quality) (GEdit-Bench /
  VIEScore), averaged over the set.

A set score is the mean over all (prompt, seed) images where it applies; its 95% interval is a cluster
bootstrap over prompts (stats.py). Every model after the first also gets its paired change over the
first (`vs`: the same bootstrap over the per-image differences, `paired_change`), which is the
interval to read when asking whether a model beats the base. `bench_policy` runs the same scoring on
an in-memory policy for training loops (a held-out subset, no files).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qirl.data import PromptRecord, make_grid, save_image_atomic, write_jsonl
from qirl.errors import UserError
from qirl.eval.checklist import ImageScore
from qirl.eval.io import check_replaceable, staged_dir, write_json
from qirl.eval.judges import OracleJudge, RewardJudge, make_judge
from qirl.eval.models import Sampling, generate_images, job_sources, load_models, parse_models, slug
from qirl.eval.stats import cluster_bootstrap
from qirl.models.policy import FlowPolicy

TASKS = ("t2i", "edit")
BENCH_SETS = {"t2i": "heldout-t2i", "edit": "heldout-edit"}
GRID_PROMPTS = {"t2i": 16, "edit": 8}  # prompts shown in each model's sample grid (first seed)
MARKER = "bench.json"


def seed_list(seeds: int | Sequence[int]) -> list[int]:
    """`3` -> [0, 1, 2]; a sequence is kept as given (de-duplicated, in order)."""
    out = list(range(seeds)) if isinstance(seeds, int) else list(dict.fromkeys(int(s) for s in seeds))
    if not out:
        raise UserError("at least one seed is needed")
    return out


def bench_records(task: str, prompts: str | None = None, n_prompts: int | None = None) -> list[PromptRecord]:
    """The task's records of the fixed set (or of `prompts`: a built-in set name or JSONL), first N."""
    from qirl.prompt_sets import resolve_prompts

    if task not in TASKS:
        raise UserError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    records = [r for r in resolve_prompts(prompts or BENCH_SETS[task]) if r.task == task]
    if n_prompts is not None:
        if n_prompts < 1:
            raise UserError(f"--n-prompts must be at least 1, got {n_prompts}")
        records = records[:n_prompts]
    return records


def _round(x: float | None, digits: int = 2) -> float | None:
    return None if x is None or x != x else round(float(x), digits)  # NaN (cannot score) -> null


def score_matrix(values: Sequence[float | None], jobs: Sequence[tuple[int, int]]) -> np.ndarray:
    """Scores laid out [P, S]: one row per prompt index, one column per seed (sorted), NaN = N/A."""
    prompts = sorted({i for i, _ in jobs})
    seeds = sorted({s for _, s in jobs})
    row, col = {p: k for k, p in enumerate(prompts)}, {s: k for k, s in enumerate(seeds)}
    m = np.full((len(prompts), len(seeds)), np.nan)  # [P, S]
    for (i, s), v in zip(jobs, values, strict=True):
        m[row[i], col[s]] = np.nan if v is None else v
    return m


def paired_change(model: np.ndarray, reference: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Mean change of `model` over `reference` and its 95% interval, from their [P, S] overall matrices.

    Every model of a bench draws the same initial noise per (prompt, seed) (models.py), so the two
    matrices are paired image by image (common random numbers, as in simulation studies). The
    interval is the cluster bootstrap over prompts (stats.py) of the per-image differences. A
    prompt's own difficulty dominates each model's interval: edit prompts range from kinds the base
    nearly always does to kinds it nearly never does. That difficulty cancels in the difference, so
    the paired interval is much narrower than the two separate intervals suggest. An image that is
    N/A for either model is left out.
    """
    diff = model - reference  # [P, S]; NaN where either is N/A
    mean, lo, hi = cluster_bootstrap(diff, n_boot, seed=seed)
    return {"change": _round(mean), "change_ci": [_round(lo), _round(hi)]}


def summarise(
    scores: Sequence[ImageScore],
    jobs: Sequence[tuple[int, int]],
    pillars: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Set means and 95% cluster-bootstrap intervals of overall and each pillar (see module docstring)."""
    prompts = sorted({i for i, _ in jobs})
    seeds = sorted({s for _, s in jobs})
    mean, lo, hi = cluster_bootstrap(score_matrix([s.overall for s in scores], jobs), n_boot, seed=seed)
    out: dict[str, Any] = {"overall": _round(mean), "overall_ci": [_round(lo), _round(hi)], "pillars": {}, "pillars_ci": {}}
    for p in pillars:
        m, low, high = cluster_bootstrap(score_matrix([s.pillars.get(p) for s in scores], jobs), n_boot, seed=seed)
        out["pillars"][p] = _round(m)
        out["pillars_ci"][p] = None if m is None else [_round(low), _round(high)]
    subdims: dict[str, dict[str, list[float]]] = {}
    for s in scores:
        for p, table in s.subdims.items():
            for name, v in table.items():
                if v is not None:
                    subdims.setdefault(p, {}).setdefault(name, []).append(v)
    out["subdims"] = {p: {n: _round(float(np.mean(v))) for n, v in t.items()} for p, t in subdims.items()}
    out.update(images=len(scores), prompts=len(prompts), seeds=len(seeds))
    return out


def category_summary(
    scores: Sequence[ImageScore], jobs: Sequence[tuple[int, int]], records: Sequence[PromptRecord]
) -> dict[str, Any]:
    """Mean overall per prompt category and, for T2I, the single-object shape accuracy: the share of
    images of "single" prompts (one requested object) whose Alignment shape item is fully met (2 ->
    100), i.e. the oracle detects the requested shape."""
    by: dict[str, list[float]] = {}
    single: list[bool] = []
    for (i, _), sc in zip(jobs, scores, strict=True):
        category = records[i].category or "none"
        by.setdefault(category, []).append(sc.overall)
        shape = sc.subdims.get("Alignment", {}).get("shape")
        if category == "single" and shape is not None:
            single.append(shape == 100)
    out: dict[str, Any] = {"categories": {c: _round(float(np.nanmean(v))) for c, v in sorted(by.items())}}
    if single:
        out["single_shape_accuracy"] = _round(100 * float(np.mean(single)))
    return out


def _score_batches(
    policy: FlowPolicy,
    records: Sequence[PromptRecord],
    jobs: Sequence[tuple[int, int]],
    sampling: Sampling,
    judge: OracleJudge | RewardJudge,
    batch_size: int,
) -> Iterator[tuple[Sequence[tuple[int, int]], torch.Tensor, list[torch.Tensor | None], list[ImageScore]]]:
    """(jobs, images [b, 3, H, W], edit sources, scores) per batch of jobs."""
    size = policy.image_size
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        images = generate_images(policy, records, chunk, sampling, batch_size)  # [b, 3, H, W]
        sources = job_sources(records, chunk, size)
        yield chunk, images, sources, judge.score(images, [records[i] for i, _ in chunk], sources)


def bench_policy(
    policy: FlowPolicy,
    task: str = "t2i",
    n_prompts: int | None = 16,
    seeds: int | Sequence[int] = 1,
    judge: str | Sequence[str] | OracleJudge | RewardJudge = "oracle",
    sampling: Sampling | None = None,
    prompts: str | None = None,
    batch_size: int = 64,
    n_boot: int = 0,
) -> dict[str, Any]:
    """The bench on an in-memory policy (training-time hook): {"overall", "pillars", ...}.

    Scores the first `n_prompts` prompts of the task's fixed held-out set (all when None) at each seed,
    as `qirl eval bench` does, without writing anything. The policy's train/eval mode is restored.
    Pass a built judge (`make_judge(...)`) to avoid rebuilding reward models at every call; `n_boot > 0`
    adds bootstrap intervals. About 0.2 s an image for the tiny DiT on one CPU thread at 20 steps.
    """
    records = bench_records(task, prompts, n_prompts)
    jobs = [(i, s) for i in range(len(records)) for s in seed_list(seeds)]
    judge = judge if isinstance(judge, (OracleJudge, RewardJudge)) else make_judge(judge)
    scores: list[ImageScore] = []
    for *_, batch in _score_batches(policy, records, jobs, sampling or Sampling(), judge, batch_size):
        scores += batch
    return {"task": task, **summarise(scores, jobs, judge.pillars(task), n_boot), **category_summary(scores, jobs, records)}


def sample_grid(task: str, images: list[torch.Tensor], sources: list[torch.Tensor | None]) -> torch.Tensor:
    """A model's sample grid [3, H', W']: T2I images 8 a row; edits as (source, output) pairs, 4 a row."""
    if task == "edit":
        tiles = [t for src, im in zip(sources, images, strict=True) for t in (src, im)]
        return make_grid(torch.stack(tiles), ncol=8, upscale=2)
    return make_grid(torch.stack(images), ncol=8, upscale=2)


def run_bench(
    models: Sequence[str],
    out: str | Path,
    tasks: str | Sequence[str] = "all",
    n_prompts: int | None = None,
    seeds: int | Sequence[int] = 3,
    judge: str | Sequence[str] = "oracle",
    sampling: Sampling | None = None,
    prompts: str | None = None,
    n_boot: int = 1000,
    batch_size: int = 64,
) -> Iterator[dict[str, Any]]:
    """Bench every model on every task into the folder `out` (replaced whole); yield progress, then
    the summary (`done`). Everything a user can get wrong is checked before the first image."""
    t0 = time.perf_counter()
    out = Path(out)
    if batch_size < 1 or n_boot < 0:
        raise UserError("--batch-size must be at least 1 and --bootstrap at least 0")
    check_replaceable(out, MARKER, "bench")
    specs = parse_models(models, sampling)
    if not specs:
        raise UserError("give at least one --model")
    seeds_ = seed_list(seeds)
    tasks = TASKS if tasks == "all" else [tasks] if isinstance(tasks, str) else list(tasks)
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise UserError(f"--task must be t2i, edit or all, got {', '.join(bad) or 'nothing'}")
    task_records = {t: bench_records(t, prompts, n_prompts) for t in dict.fromkeys(tasks)}
    task_records = {t: r for t, r in task_records.items() if r}
    if not task_records:
        raise UserError(f"--prompts {prompts!r}: no prompts of task {', '.join(tasks)}")
    judge_ = make_judge(judge)
    policies = load_models(specs)
    total = len(specs) * sum(len(r) * len(seeds_) for r in task_records.values())
    done, rows = 0, []
    results: dict[str, dict[str, Any]] = {}
    grids: dict[str, dict[str, str]] = {}
    overall_of: dict[str, np.ndarray] = {}  # task -> the first model's overall [P, S], for paired changes
    with staged_dir(out, MARKER, "bench") as tmp:
        for spec in specs:
            for task, records in task_records.items():
                jobs = [(i, s) for i in range(len(records)) for s in seeds_]
                scores: list[ImageScore] = []
                shown: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
                batches = _score_batches(policies[spec.label], records, jobs, spec.sampling, judge_, batch_size)
                for chunk, images, sources, batch in batches:
                    for (i, s), image, src, sc in zip(chunk, images, sources, batch, strict=True):
                        if s == seeds_[0] and i < GRID_PROMPTS[task]:
                            shown[i] = (image, src)
                        rows.append({
                            "model": spec.label, "task": task, "prompt_index": i, "prompt_id": records[i].id,
                            "prompt": records[i].prompt, "seed": s, "overall": _round(sc.overall, 3),
                            "pillars": {k: _round(v, 3) for k, v in sc.pillars.items()},
                        })
                    scores += batch
                    done += len(batch)
                    yield {"step": done, "total": total, "model": spec.label, "task": task}
                results.setdefault(spec.label, {})[task] = {
                    **summarise(scores, jobs, judge_.pillars(task), n_boot), **category_summary(scores, jobs, records)
                }
                overall = score_matrix([s.overall for s in scores], jobs)  # [P, S]
                reference = overall_of.setdefault(task, overall)  # the first model's
                if spec is not specs[0]:
                    results[spec.label][task]["vs"] = {specs[0].label: paired_change(overall, reference, n_boot)}
                name = f"grids/{slug(spec.label)}_{task}.png"
                order = sorted(shown)
                save_image_atomic(sample_grid(task, [shown[i][0] for i in order], [shown[i][1] for i in order]), tmp / name)
                grids.setdefault(spec.label, {})[task] = name
        seconds = round(time.perf_counter() - t0, 1)
        bench = {
            "kind": "qirl-bench",
            "judge": judge_.name,
            "tasks": list(task_records),
            "seeds": seeds_,
            "bootstrap": n_boot,
            "prompt_sets": {t: prompts or BENCH_SETS[t] for t in task_records},
            "models": [{"label": s.label, "path": s.path, "sampling": asdict(s.sampling)} for s in specs],
            "results": results,
            "grids": grids,
            "grid_prompts": {t: [r.prompt for r in recs[: GRID_PROMPTS[t]]] for t, recs in task_records.items()},
            "images": total,
            "seconds": seconds,
        }
        write_jsonl(tmp / "scores.jsonl", rows)
        write_json(tmp / MARKER, bench)
    yield {"done": True, "out": str(out), "images": total, "seconds": seconds, "judge": judge_.name, "results": results}


def flat_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """One table row per (model, task) for people: 'overall [low, high]' and the pillar means."""
    flat: dict[str, Any] = {"out": summary["out"], "images": summary["images"], "seconds": summary["seconds"]}
    for label, tasks in summary["results"].items():
        for task, r in tasks.items():
            lo, hi = r["overall_ci"]
            flat[f"{label} {task} overall"] = f"{r['overall']:.1f} [{lo:.1f}, {hi:.1f}]"
            for ref, c in r.get("vs", {}).items():
                lo, hi = c["change_ci"]
                flat[f"{label} {task} change vs {ref} (paired)"] = f"{c['change']:+.1f} [{lo:+.1f}, {hi:+.1f}]"
            flat[f"{label} {task} pillars"] = {p: "n/a" if v is None else round(v, 1) for p, v in r["pillars"].items()}
            flat[f"{label} {task} categories"] = r.get("categories", {})
            if "single_shape_accuracy" in r:
                flat[f"{label} {task} single-object shape accuracy"] = r["single_shape_accuracy"]
    return flat
