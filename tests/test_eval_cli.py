"""`qirl eval bench | arena | report` end to end with typer's test runner, and their one-line errors."""

from __future__ import annotations

import json
import re

import pytest
import torch
from qirl.cli.main import app
from typer.testing import CliRunner

runner = CliRunner()
FAST = ["--steps", "3", "--n-prompts", "3", "--bootstrap", "50", "--quiet"]


@pytest.fixture(autouse=True)
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """A second, distinct policy: the base model with its weights perturbed, saved as a model folder."""
    from qirl.models.registry import load_policy

    policy = load_policy("base")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * p.std().nan_to_num() * torch.randn(p.shape, generator=gen))
    path = tmp_path_factory.mktemp("models") / "noisy"
    policy.save_pretrained(path)
    return str(path)


def _run(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_bench_two_models_json(tmp_path):
    out = tmp_path / "bench"
    result = _run(["eval", "bench", "--model", "base", "--model", "cfg1=base@guidance=1", "--seeds", "1",
                   "--out", str(out), "--json", *FAST])
    s = json.loads(result.stdout)
    assert set(s["results"]) == {"base", "cfg1"}
    t2i, edit = s["results"]["base"]["t2i"], s["results"]["cfg1"]["edit"]
    assert set(t2i["pillars"]) == {"Quality", "Aesthetics", "Alignment", "Real-world Fidelity", "Creative Generation"}
    assert list(edit["pillars"]) == ["Success", "Preservation", "Quality"]
    assert t2i["overall_ci"][0] <= t2i["overall"] <= t2i["overall_ci"][1]
    assert s["images"] == 2 * (3 + 3)
    rows = _lines(out / "scores.jsonl")
    assert len(rows) == 12 and {r["model"] for r in rows} == {"base", "cfg1"}
    # cfg1's paired change over base is the mean per-image difference (same prompts, seeds and noise).
    for task in ("t2i", "edit"):
        by = {(r["model"], r["prompt_index"], r["seed"]): r["overall"] for r in rows if r["task"] == task}
        diffs = [by["cfg1", i, seed] - by["base", i, seed] for (m, i, seed) in by if m == "base"]
        change = s["results"]["cfg1"][task]["vs"]["base"]
        assert change["change"] == pytest.approx(sum(diffs) / len(diffs), abs=0.01)
        assert change["change_ci"][0] <= change["change"] <= change["change_ci"][1]
    assert "vs" not in s["results"]["base"]["t2i"]
    bench = json.loads((out / "bench.json").read_text())
    assert all((out / bench["grids"][m][t]).is_file() for m in ("base", "cfg1") for t in ("t2i", "edit"))
    # The bench is deterministic: the same command gives the same scores.
    again = json.loads(_run(["eval", "bench", "--model", "base", "--task", "t2i", "--seeds", "1", "--out",
                             str(tmp_path / "b2"), "--json", *FAST]).stdout)
    assert again["results"]["base"]["t2i"]["overall"] == t2i["overall"]


def test_arena_extend_import_and_report(tmp_path, other_model):
    arena = tmp_path / "arena"
    models = f"base,noisy={other_model}"
    s = json.loads(_run(["eval", "arena", "--models", models, "--task", "t2i", "--seeds", "1", "--out", str(arena),
                         "--json", *FAST]).stdout)
    assert s["votes"] == 3 and s["new_votes"] == 3
    assert {r["model"] for r in s["ratings"]} == {"base", "noisy"}
    votes = _lines(arena / "votes.jsonl")
    assert all({"model_a", "model_b", "prompt", "seed", "winner", "judge"} <= set(v) for v in votes)
    assert {v["judge"] for v in votes} == {"annotators"}

    # Re-running with more seeds adds only the new comparisons; the ratings come from all votes.
    s = json.loads(_run(["eval", "arena", "--models", models, "--seeds", "2", "--out", str(arena), "--json",
                         *FAST]).stdout)
    assert s["votes"] == 6 and s["new_votes"] == 3

    # Votes from elsewhere (e.g. people), added once even when the file is given twice.
    extra = tmp_path / "more.jsonl"
    extra.write_text("\n".join(json.dumps({"model_a": "base", "model_b": "noisy", "winner": w, "judge": "human",
                                           "prompt": "a red circle", "seed": 0, "annotator": f"p{k}"})
                               for k, w in enumerate(["a", "a", "tie", "b"])) + "\n")
    s = json.loads(_run(["eval", "arena", "--out", str(arena), "--votes", str(extra), "--votes", str(extra),
                         "--json", "--bootstrap", "50"]).stdout)
    assert s["votes"] == 10 and s["new_votes"] == 4
    meta = json.loads((arena / "arena.json").read_text())
    assert meta["votes_by_judge"] == {"annotators": 6, "human": 4}
    assert meta["order"][0] == "base" and meta["ratings"][0]["bt_ci"][0] <= meta["ratings"][0]["bt"]
    wr = meta["win_rate"]
    assert wr[0][1] + wr[1][0] == pytest.approx(1.0)

    # A bench folder and the arena in one report.
    bench = tmp_path / "bench"
    _run(["eval", "bench", "--model", models, "--task", "t2i", "--seeds", "1", "--out", str(bench), *FAST])
    report = tmp_path / "report"
    summary = json.loads(_run(["eval", "report", str(bench), str(arena), "--out", str(report), "--json"]).stdout)
    assert summary["figures"] >= 6
    md, page = (report / "report.md").read_text(), (report / "report.html").read_text()
    for name in re.findall(r"\]\((figures/[^)]+)\)", md):
        assert (report / name).is_file()
    assert "Bradley-Terry" in md and "Real-world Fidelity" in md and "noisy" in md
    # Self-contained: every image embedded, nothing fetched from anywhere.
    srcs = re.findall(r'<img[^>]*src="([^"]*)"', page)
    assert len(srcs) == summary["figures"] and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)|url\(|@import|<link|<script""", page)


def test_human_judge_writes_a_voting_page(tmp_path, other_model):
    arena = tmp_path / "arena"
    s = json.loads(_run(["eval", "arena", "--models", f"base,noisy={other_model}", "--judge", "human", "--seeds",
                         "1", "--out", str(arena), "--json", *FAST]).stdout)
    assert s["votes"] == 0 and s["pairs_to_vote"] == 3 and "ratings" not in s
    page = (arena / "vote.html").read_text()
    assert page.count("data:image/png;base64,") == 6 and "votes_human.jsonl" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)


@pytest.mark.parametrize(
    "setup, args, needle",
    [
        (None, ["eval", "bench", "--model", "{tmp}/nomodel", "--out", "{tmp}/o"], "no such folder"),
        (None, ["eval", "bench", "--model", "base@cfg=2", "--out", "{tmp}/o"], "must be one of"),
        (None, ["eval", "bench", "--task", "video", "--out", "{tmp}/o"], "--task must be"),
        (None, ["eval", "arena", "--models", "base,b=base", "--task", "video", "--out", "{tmp}/o"], "--task must be"),
        (None, ["eval", "arena", "--models", "base", "--out", "{tmp}/o"], "at least two models"),
        (None, ["eval", "arena", "--models", "base,{tmp}/nomodel", "--out", "{tmp}/o"], "no such folder"),
        ("badvotes", ["eval", "arena", "--votes", "{tmp}/v.jsonl", "--out", "{tmp}/o"], "v.jsonl:2"),
        ("badwinner", ["eval", "arena", "--votes", "{tmp}/v.jsonl", "--out", "{tmp}/o"], "'winner' must be"),
        (None, ["eval", "arena", "--out", "{tmp}/o"], "nothing to rate"),
        (None, ["eval", "arena", "--models", "base,b=base", "--anchor", "zzz", "--out", "{tmp}/o"], "--anchor 'zzz'"),
        (None, ["eval", "arena", "--models", "base,x=base", "--judge", "nope", "--out", "{tmp}/o"], "unknown reward"),
        ("notdir", ["eval", "bench", "--out", "{tmp}/o"], "not a qirl bench folder"),
        (None, ["eval", "report", "{tmp}", "--out", "{tmp}/o"], "neither a bench folder"),
    ],
)
def test_user_errors_are_one_line_exit_2(tmp_path, setup, args, needle):
    if setup == "badvotes":
        (tmp_path / "v.jsonl").write_text('{"model_a": "x", "model_b": "y", "winner": "a"}\n{oops\n')
    elif setup == "badwinner":
        (tmp_path / "v.jsonl").write_text('{"model_a": "x", "model_b": "y", "winner": "left"}\n')
    elif setup == "notdir":
        (tmp_path / "o").mkdir()
        (tmp_path / "o" / "keep.txt").write_text("mine")
    result = runner.invoke(app, [a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    if setup == "notdir":
        assert [p.name for p in (tmp_path / "o").iterdir()] == ["keep.txt"]  # left as it was
    else:
        assert not (tmp_path / "o").exists()  # nothing half-written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]  # no temporary folder left


def test_ratings_plot_accepts_an_elo_estimate_outside_its_interval():
    """Online Elo depends on vote order; the bootstrap shuffles it, so the estimate can leave the interval."""
    from qirl.eval.figures import ratings_plot

    rows = [
        {"model": "a", "rank": 1, "bt": 1100.0, "bt_ci": [1050.0, 1150.0], "elo": 1034.4, "elo_ci": [1037.9, 1236.3]},
        {"model": "b", "rank": 2, "bt": 1000.0, "bt_ci": [1000.0, 1000.0], "elo": 1000.0, "elo_ci": [1000.0, 1000.0]},
    ]
    png = ratings_plot(rows, "t2i")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
