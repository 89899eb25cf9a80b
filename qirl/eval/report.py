"""`qirl eval report`: Markdown and one self-contained HTML page from bench and arena folders.

The report is built once as a list of blocks (headings, paragraphs, tables, figures, image rows) and
rendered twice: `report.md` with figures as files in `figures/`, and `report.html` with every image
embedded as a base64 PNG data URI and inline CSS, so the page opens offline, mailed or archived
alone, and loads nothing from the network. Figures: per-pillar bars with 95% intervals (figures.py),
ratings with intervals, the win-rate heat map, and each model's sample grid side by side (same
prompts, same seeds, same initial noise).
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qirl.data import atomic_write_text
from qirl.errors import UserError
from qirl.eval import figures
from qirl.eval.io import check_replaceable, read_json, staged_dir
from qirl.eval.models import slug

MARKER = "report.md"


@dataclass
class Image:
    name: str  # file name under figures/
    data: bytes
    caption: str = ""


@dataclass
class Block:
    kind: str  # h1 | h2 | h3 | p | table | images | list
    text: str = ""
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    images: list[Image] = field(default_factory=list)
    items: list[str] = field(default_factory=list)


def _ci(mean: float | None, ci: Sequence[float | None] | None) -> str:
    if mean is None:
        return "n/a"
    if not ci or ci[0] is None:
        return f"{mean:.1f}"
    return f"{mean:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]"


def _change(c: dict[str, Any] | None) -> str:
    """A paired change 'change [low, high]' with signs; '' for the reference model itself."""
    if not c or c["change"] is None:
        return ""
    lo, hi = c["change_ci"]
    return f"{c['change']:+.1f} [{lo:+.1f}, {hi:+.1f}]"


def _kind(folder: Path) -> str:
    if (folder / "bench.json").is_file():
        return "bench"
    if (folder / "arena.json").is_file():
        return "arena"
    raise UserError(f"{folder}: neither a bench folder (bench.json) nor an arena folder (arena.json)")


def _grid_images(folder: Path, grids: dict[str, str], labels: Sequence[str], prefix: str) -> list[Image]:
    out = []
    for label in labels:
        rel = grids.get(label)
        if rel and (folder / rel).is_file():
            out.append(Image(f"{prefix}_grid_{slug(label)}.png", (folder / rel).read_bytes(), label))
    return out


def bench_blocks(folder: Path, tag: str) -> list[Block]:
    """Tables, pillar bars, sub-dimension table and sample grids of one bench folder."""
    b = read_json(folder / "bench.json", "bench summary")
    labels = [m["label"] for m in b["models"]]
    settings = ", ".join(
        f"{m['label']} = {m['path']} (steps {m['sampling']['steps']}, CFG {m['sampling']['guidance']:g}, "
        f"shift {m['sampling']['shift']:g})" for m in b["models"]
    )
    blocks = [
        Block("h2", f"Bench: {folder.name}"),
        Block("p", f"Judge: {b['judge']}. Seeds per prompt: {len(b['seeds'])}. Images: {b['images']} in "
                   f"{b['seconds']} s. Intervals: 95% cluster bootstrap over prompts ({b['bootstrap']} "
                   f"resamples). Models: {settings}."),
    ]
    for task in b["tasks"]:
        results = {m: b["results"][m][task] for m in labels}
        pillars = list(results[labels[0]]["pillars"])
        sets = b.get("prompt_sets", {}).get(task, "")
        overall_note = "overall = sqrt(Success x Quality)" if task == "edit" else "overall = mean of pillars"
        blocks.append(Block("h3", f"{'Text-to-image' if task == 't2i' else 'Edit'} ({sets}; {overall_note})"))
        ref = labels[0]
        rows = [[m, _ci(r["overall"], r["overall_ci"]), _change(r.get("vs", {}).get(ref)),
                 *(_ci(r["pillars"][p], r["pillars_ci"][p]) for p in pillars), str(r["images"])]
                for m, r in results.items()]
        header = ["model", "overall", f"change vs {ref} (paired)", *pillars, "images"]
        blocks.append(Block("table", header=header, rows=rows))
        png = figures.pillar_bars(labels, results, f"{task}: overall and pillars (95% CI)")
        blocks.append(Block("images", images=[Image(f"{tag}_{task}_pillars.png", png, "per-pillar scores")]))
        sub_rows = []
        for p in pillars:
            names = list(dict.fromkeys(n for m in labels for n in results[m].get("subdims", {}).get(p, {})))
            for n in names:
                vals = [results[m].get("subdims", {}).get(p, {}).get(n) for m in labels]
                sub_rows.append([p, n, *("n/a" if v is None else f"{v:.1f}" for v in vals)])
        if sub_rows:
            blocks.append(Block("p", "Sub-dimensions (mean points over the images where they apply):"))
            blocks.append(Block("table", header=["pillar", "sub-dimension", *labels], rows=sub_rows))
        grids = {m: b["grids"].get(m, {}).get(task, "") for m in labels}
        imgs = _grid_images(folder, grids, labels, f"{tag}_{task}")
        if imgs:
            what = "(source, edit) pairs" if task == "edit" else "images"
            blocks.append(Block("p", f"Samples, first seed, one grid per model ({what} in reading order):"))
            blocks.append(Block("images", images=imgs))
            blocks.append(Block("list", items=b.get("grid_prompts", {}).get(task, [])))
    return blocks


def arena_blocks(folder: Path, tag: str) -> list[Block]:
    """Ratings table and plot, win-rate table and heat map, and sample grids of one arena folder."""
    a = read_json(folder / "arena.json", "arena summary")
    judges = ", ".join(f"{k} {v}" for k, v in a.get("votes_by_judge", {}).items())
    blocks = [
        Block("h2", f"Arena: {folder.name} ({a['task']})"),
        Block("p", f"Votes: {a['votes']} ({judges}; ties {a.get('ties', 0)}). Anchor: {a.get('anchor')} = "
                   f"{a.get('anchor_rating', 1000):g}. Online Elo K = {a.get('k')}, scale 400. Intervals: 95% "
                   f"bootstrap over votes ({a.get('bootstrap')} resamples). Rank: 1 + models whose interval "
                   f"lies wholly above (Bradley-Terry)."),
    ]
    rows = a.get("ratings", [])
    if rows:
        blocks.append(Block("table", header=["rank", "model", "Bradley-Terry [95% CI]", "online Elo [95% CI]", "votes"],
                            rows=[[str(r["rank"]), r["model"], _ci(r["bt"], r["bt_ci"]), _ci(r["elo"], r["elo_ci"]),
                                   str(r["votes"])] for r in rows]))
        order = a["order"]
        pngs = [Image(f"{tag}_ratings.png", figures.ratings_plot(rows, f"{a['task']} arena ratings"), "ratings"),
                Image(f"{tag}_winrate.png", figures.winrate_heatmap(order, a["win_rate"], "win rate (row over column)"),
                      "win rates")]
        blocks.append(Block("images", images=pngs))
        blocks.append(Block("p", "Win rate of the row model over the column model (ties count 1/2), votes in brackets:"))
        wr = [[m, *("-" if v is None else f"{v:.2f} ({n:g})" for v, n in zip(a["win_rate"][i], a["votes_matrix"][i], strict=True))]
              for i, m in enumerate(order)]
        blocks.append(Block("table", header=["", *order], rows=wr))
    labels = list(a.get("grids", {}))
    imgs = _grid_images(folder, a.get("grids", {}), labels, tag)
    if imgs:
        blocks.append(Block("p", "Samples, first seed, one grid per model:"))
        blocks.append(Block("images", images=imgs))
        blocks.append(Block("list", items=a.get("grid_prompts", [])))
    return blocks


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: Sequence[Block]) -> str:
    lines: list[str] = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            lines += ["#" * int(b.kind[1]) + " " + b.text, ""]
        elif b.kind == "p":
            lines += [b.text, ""]
        elif b.kind == "table":
            lines.append("| " + " | ".join(map(_md_cell, b.header)) + " |")
            lines.append("| " + " | ".join("---" for _ in b.header) + " |")
            lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in b.rows]
            lines.append("")
        elif b.kind == "images":
            lines += [" ".join(f"![{im.caption}](figures/{im.name})" for im in b.images), ""]
        elif b.kind == "list":
            lines += [f"{k + 1}. {_md_cell(item)}" for k, item in enumerate(b.items)] + [""]
    return "\n".join(lines)


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
.row { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
figure { margin: 0; }
figcaption { text-align: center; font-size: 0.85em; color: #555; }
img.grid { image-rendering: pixelated; width: 340px; }
ol { font-size: 0.85em; color: #444; }
"""


def render_html(blocks: Sequence[Block], title: str) -> str:
    e = html.escape
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
             f"<style>{_CSS}</style></head><body>"]
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            parts.append(f"<{b.kind}>{e(b.text)}</{b.kind}>")
        elif b.kind == "p":
            parts.append(f"<p>{e(b.text)}</p>")
        elif b.kind == "table":
            head = "".join(f"<th>{e(h)}</th>" for h in b.header)
            body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in b.rows)
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif b.kind == "images":
            figs = []
            for im in b.images:
                uri = "data:image/png;base64," + base64.b64encode(im.data).decode("ascii")
                cls = ' class="grid"' if "_grid_" in im.name else ""
                figs.append(f"<figure><img{cls} src=\"{uri}\" alt=\"{e(im.caption)}\">"
                            f"<figcaption>{e(im.caption)}</figcaption></figure>")
            parts.append(f"<div class=\"row\">{''.join(figs)}</div>")
        elif b.kind == "list":
            parts.append("<ol>" + "".join(f"<li>{e(item)}</li>" for item in b.items) + "</ol>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def build_report(inputs: Sequence[str | Path], out: str | Path, title: str = "qirl evaluation") -> dict[str, Any]:
    """Write report.md, report.html and figures/ into `out` (replaced whole); return a summary."""
    folders = [Path(p) for p in inputs]
    if not folders:
        raise UserError("give at least one bench or arena folder")
    kinds = [_kind(f) for f in folders]  # every input checked before anything is drawn
    check_replaceable(Path(out), MARKER, "report")
    blocks = [Block("h1", title),
              Block("p", "Written by `qirl eval report`; every figure is recomputed from the folders listed here: "
                         + ", ".join(str(f) for f in folders) + ".")]
    for k, (folder, kind) in enumerate(zip(folders, kinds, strict=True)):
        tag = f"{k}_{slug(folder.name)}"
        blocks += bench_blocks(folder, tag) if kind == "bench" else arena_blocks(folder, tag)
    out = Path(out)
    with staged_dir(out, MARKER, "report") as tmp:
        n_images = 0
        for b in blocks:
            for im in b.images:
                (tmp / "figures").mkdir(exist_ok=True)
                (tmp / "figures" / im.name).write_bytes(im.data)
                n_images += 1
        atomic_write_text(tmp / "report.html", render_html(blocks, title))
        atomic_write_text(tmp / MARKER, render_markdown(blocks))
    return {"out": str(out), "markdown": str(out / MARKER), "html": str(out / "report.html"),
            "figures": n_images, "inputs": [f"{f} ({k})" for f, k in zip(folders, kinds, strict=True)]}
