"""`qirl eval arena`: pairwise comparisons of models, rated by online Elo and Bradley-Terry with intervals.

Every model generates for the same prompts and seeds (the same initial noise per (prompt, seed),
models.py); for each (prompt, seed) every pair of models is compared once by the judge (judges.py:
simulated annotators by default, the noiseless oracle, a reward model, or people through a voting page).
Votes are stored in `<out>/votes.jsonl` (votes.py) and ratings are always recomputed from all stored
votes (ratings.py), so an arena grows: re-running with more seeds, more prompts, a new model or
another judge adds only the comparisons not yet voted, and `--votes FILE` adds votes collected
elsewhere (an exact duplicate line is added once).

Folder: votes.jsonl, arena.json (ratings, intervals, ranks, win rates, settings), grids/<model>.png
(each model's first prompts at the first seed, for the report), vote.html (with `--judge human`).
The folder is rebuilt in a temporary folder and swapped in whole (io.staged_dir).
"""

from __future__ import annotations

import itertools
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from qirl.data import atomic_write_text, save_image_atomic, write_jsonl
from qirl.errors import UserError
from qirl.eval.bench import GRID_PROMPTS, TASKS, bench_records, sample_grid, seed_list
from qirl.eval.io import read_json, staged_dir, write_json
from qirl.eval.judges import VotePolicy, cast_vote, make_judge, vote_rng
from qirl.eval.models import Sampling, generate_images, job_sources, load_models, parse_models, slug
from qirl.eval.ratings import VoteArrays, compute_ratings
from qirl.eval.votes import as_triples, read_votes, same_vote, vote_key

MARKER = "arena.json"


def _judge_name(judge: Sequence[str]) -> str:
    return "+".join(judge)


def _load_existing(out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(arena.json, stored votes) of an existing arena folder, or ({}, [])."""
    if not out.exists():
        return {}, []
    if not (out / MARKER).is_file():
        raise UserError(f"{out}: exists and is not a qirl arena folder (no {MARKER}); choose another --out")
    meta = read_json(out / MARKER, "arena summary")
    votes = read_votes(out / "votes.jsonl") if (out / "votes.jsonl").is_file() else []
    return meta, votes


def run_arena(
    out: str | Path,
    models: Sequence[str] = (),
    task: str | None = None,
    judge: Sequence[str] = ("annotators",),
    votes: Sequence[str | Path] = (),
    n_prompts: int | None = None,
    seeds: int | Sequence[int] = 1,
    prompts: str | None = None,
    sampling: Sampling | None = None,
    vote_policy: VotePolicy | None = None,
    k: float = 16.0,
    n_boot: int = 1000,
    anchor: str | None = None,
    anchor_rating: float = 1000.0,
    batch_size: int = 64,
) -> Iterator[dict[str, Any]]:
    """Generate, vote, rate; yield progress, then the summary (`done`). Validates everything first."""
    t0 = time.perf_counter()
    out = Path(out)
    vote_policy = vote_policy or VotePolicy()
    meta, stored = _load_existing(out)
    task = task or meta.get("task") or "t2i"
    if task not in TASKS:
        raise UserError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    if meta.get("task") not in (None, task):
        raise UserError(f"{out}: holds a {meta['task']} arena; use another --out for {task}")
    if n_boot < 0 or batch_size < 1 or k <= 0:
        raise UserError("--bootstrap must be >= 0, --batch-size >= 1 and --k > 0")
    imported: list[dict[str, Any]] = []
    for path in votes:
        for v in read_votes(path):
            if v.get("task") not in (None, task):
                raise UserError(f"{path}: holds a {v['task']} vote; this arena is {task}")
            imported.append(v)
    specs = parse_models(models, sampling)
    if len(specs) == 1:
        raise UserError("an arena needs at least two models (--models a,b)")
    judge = list(judge) or ["annotators"]
    judge_name = _judge_name(judge)
    human = judge == ["human"]
    scorer = None if human or not specs else make_judge(judge)
    records = bench_records(task, prompts, n_prompts) if specs else []
    if specs and not records:
        raise UserError(f"--prompts {prompts!r}: no {task} prompts")
    seeds_ = seed_list(seeds)
    policies = load_models(specs)

    known = {vote_key(v) for v in stored}
    seen, added = {same_vote(v) for v in stored}, []
    for v in imported:
        if same_vote(v) not in seen:
            seen.add(same_vote(v))
            added.append(v)
    labels = [s.label for s in specs]
    pairs = list(itertools.combinations(labels, 2))
    todo = [
        (i, s, a, b) for i in range(len(records)) for s in seeds_ for a, b in pairs
        if vote_key({"model_a": a, "model_b": b, "task": task, "prompt": records[i].prompt, "seed": s,
                     "judge": judge_name}) not in known
    ]
    jobs = sorted({(i, s) for i, s, _, _ in todo} | {(i, seeds_[0]) for i in range(min(GRID_PROMPTS[task], len(records)))})
    total = len(jobs) * len(specs)
    if not stored and not added and not todo:
        raise UserError("nothing to rate: give --models (two or more) or --votes")
    order = _model_order(meta, labels, stored + added)
    anchor = anchor or meta.get("anchor") or order[0]
    if anchor not in order:
        raise UserError(f"--anchor {anchor!r}: not a model of this arena ({', '.join(order)})")
    order = [anchor] + [m for m in order if m != anchor]

    # Generate and score every (prompt, seed) a new vote needs, plus the grid prompts.
    native: dict[tuple[str, int, int], float] = {}
    images: dict[tuple[str, int, int], torch.Tensor] = {}
    done = 0
    size = next(iter(policies.values())).image_size if policies else 32
    sources = dict(zip(jobs, job_sources(records, jobs, size), strict=True)) if jobs else {}
    for spec in specs:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            batch = generate_images(policies[spec.label], records, chunk, spec.sampling, batch_size)  # [b, 3, H, W]
            if scorer is not None:
                scores = scorer.score(batch, [records[i] for i, _ in chunk], [sources[j] for j in chunk])
                native.update({(spec.label, i, s): sc.native for (i, s), sc in zip(chunk, scores, strict=True)})
            images.update({(spec.label, i, s): im for (i, s), im in zip(chunk, batch, strict=True)})
            done += len(chunk)
            yield {"step": done, "total": total, "model": spec.label}

    new_votes, page_pairs = [], []
    for i, s, a, b in todo:
        rec = records[i]
        base = {"model_a": a, "model_b": b, "task": task, "prompt": rec.prompt, "prompt_id": rec.id, "seed": s}
        if human:
            page_pairs.append({**base, **_page_images(images, sources, a, b, i, s)})
            continue
        sa, sb = native[(a, i, s)], native[(b, i, s)]
        rng = vote_rng(vote_policy, a, b, task, rec.prompt, s) if judge == ["annotators"] else None
        policy = vote_policy if judge == ["annotators"] else VotePolicy(0.0, vote_policy.tie_margin, vote_policy.seed)
        winner = cast_vote(sa, sb, policy, rng)
        new_votes.append({**base, "winner": winner, "judge": judge_name,
                          "score_a": _r(sa), "score_b": _r(sb)})

    all_votes = stored + added + new_votes
    summary: dict[str, Any] = {"out": str(out), "task": task, "new_votes": len(added) + len(new_votes),
                               "votes": len(all_votes)}
    ratings = None
    if all_votes:
        arrays = VoteArrays.build(order, as_triples(all_votes))
        ratings = compute_ratings(arrays, anchor=0, anchor_rating=anchor_rating, k=k, n_boot=n_boot)
    with staged_dir(out, MARKER, "arena") as tmp:
        grids = dict(meta.get("grids", {}))
        for name in grids.values():
            if (out / name).is_file():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(out / name, tmp / name)
        if (out / "vote.html").is_file() and not human:
            shutil.copy2(out / "vote.html", tmp / "vote.html")
        shown = [i for i in range(min(GRID_PROMPTS[task], len(records)))]
        for spec in specs:
            name = f"grids/{slug(spec.label)}.png"
            tiles = [images[(spec.label, i, seeds_[0])] for i in shown]
            save_image_atomic(sample_grid(task, tiles, [sources[(i, seeds_[0])] for i in shown]), tmp / name)
            grids[spec.label] = name
        if human:
            from qirl.eval.vote_page import vote_page

            atomic_write_text(tmp / "vote.html", vote_page(task, page_pairs, str(out.resolve())))
            summary["vote_page"] = str(out / "vote.html")
            summary["pairs_to_vote"] = len(page_pairs)
        write_jsonl(tmp / "votes.jsonl", all_votes)
        model_meta = {m["label"]: m for m in meta.get("models", [])}
        model_meta.update({s.label: {"label": s.label, "path": s.path, "sampling": asdict(s.sampling)} for s in specs})
        arena = {
            "kind": "qirl-arena",
            "task": task,
            "anchor": anchor if ratings is not None else None,
            "anchor_rating": anchor_rating,
            "k": k,
            "bootstrap": n_boot,
            "models": list(model_meta.values()),
            "votes": len(all_votes),
            "votes_by_judge": _count(v["judge"] for v in all_votes),
            "ties": sum(v["winner"] == "tie" for v in all_votes),
            "grids": grids,
            "grid_prompts": [r.prompt for r in records[: GRID_PROMPTS[task]]] if specs else meta.get("grid_prompts", []),
            **(ratings.as_dict() if ratings is not None else {}),
        }
        write_json(tmp / MARKER, arena)
    if ratings is not None:
        summary.update({key: arena[key] for key in ("ratings", "order", "win_rate")})
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    yield {"done": True, **summary}


def _model_order(meta: dict[str, Any], labels: Sequence[str], votes: Sequence[dict[str, Any]]) -> list[str]:
    """Stored order first, then the models given now, then any model seen only in imported votes."""
    order = list(dict.fromkeys([*(m for m in meta.get("order", []) if isinstance(m, str)), *labels]))
    for v in votes:
        for m in (v["model_a"], v["model_b"]):
            if m not in order:
                order.append(m)
    return order


def _page_images(images, sources, a: str, b: str, i: int, s: int) -> dict[str, str]:
    from qirl.rewards.codec import encode_image

    uri = "data:image/png;base64,"
    out = {"img_a": uri + encode_image(images[(a, i, s)]), "img_b": uri + encode_image(images[(b, i, s)])}
    if sources.get((i, s)) is not None:
        out["src"] = uri + encode_image(sources[(i, s)])
    return out


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def _r(x: float) -> float | None:
    return None if x != x else round(float(x), 3)


def flat_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """For people: one row per model, 'BT [low, high] | Elo [low, high] | rank'."""
    flat = {k: summary[k] for k in ("out", "task", "votes", "new_votes", "seconds") if k in summary}
    if "vote_page" in summary:
        flat["vote page"] = f"{summary['vote_page']} ({summary['pairs_to_vote']} pairs)"
    for row in summary.get("ratings", []):
        flat[f"#{row['rank']} {row['model']}"] = (
            f"BT {row['bt']:.0f} [{row['bt_ci'][0]:.0f}, {row['bt_ci'][1]:.0f}]  "
            f"Elo {row['elo']:.0f} [{row['elo_ci'][0]:.0f}, {row['elo_ci'][1]:.0f}]  votes {row['votes']}"
        )
    return flat
