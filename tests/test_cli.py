"""The CLI end to end with typer's test runner: help, sample, score, and one-line errors with exit 2."""

from __future__ import annotations

import json

import pytest
from qirl.cli.main import app
from typer.testing import CliRunner

runner = CliRunner()


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("pretrain", "sample", "score", "curate", "grpo", "distill", "eval"):
        assert name in result.output


def test_sample_then_score_the_shipped_base(tmp_path):
    out = tmp_path / "samples"
    result = runner.invoke(
        app, ["sample", "--prompts", "demo", "--limit", "8", "--steps", "4", "--out", str(out), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    assert all((out / r["image"]).is_file() for r in rows)
    assert (out / "grid.png").is_file()
    assert any(r["task"] == "edit" and (out / r["source_image"]).is_file() for r in rows)
    result = runner.invoke(app, ["score", "images", str(out), "--json", "--reward", "oracle_alignment"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert 0 <= summary["t2i_overall"] <= 100 and summary["t2i_images"] + summary["edit_images"] == 8
    scored = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(scored) == 8
    # oracle_alignment judges T2I rows only; the edit rows get null (NaN), the others a value in [0, 1].
    for row in scored:
        value = row["rewards"]["oracle_alignment"]
        assert (value is None) if row["task"] == "edit" else (0 <= value <= 1)
        assert "overall" in row["oracle"]
    assert 0 <= summary["t2i_rewards"]["oracle_alignment"] <= 1


def test_sample_is_deterministic_and_batch_independent(tmp_path):
    """Same batch size: identical PNG bytes. Other batch size: each pixel within one 8-bit level.

    Each image's initial noise depends only on its index (`image_noise`), so batching does not change
    what is computed, only how BLAS blocks the matrix products; float32 sums in another order differ
    in the last bits, and a value that sits on a rounding boundary of the 8-bit PNG can move by one
    level. Exact equality across batch sizes held with some BLAS thread counts and not others.
    """
    import numpy as np
    from PIL import Image

    args = ["sample", "--prompts", "demo", "--limit", "3", "--steps", "3", "--quiet"]
    for name, batch in (("a", "3"), ("a2", "3"), ("b", "1")):
        assert runner.invoke(app, args + ["--out", str(tmp_path / name), "--batch-size", batch]).exit_code == 0
    for i in range(3):
        png = [tmp_path / name / "images" / f"{i:04d}.png" for name in ("a", "a2", "b")]
        assert png[0].read_bytes() == png[1].read_bytes()
        a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (png[0], png[2]))
        assert np.abs(a - b).max() <= 1
        assert (a != b).mean() < 0.01  # a few boundary pixels, not a different image


@pytest.mark.parametrize(
    "setup, args, needle",
    [
        (None, ["pretrain", "{tmp}/missing.yaml"], "recipe file not found"),
        ("recipe", ["pretrain", "{tmp}/r.yaml"], "lrr"),
        (None, ["pretrain", "recipes/pretrain.yaml", "train.nope=1"], "train.nope"),
        (None, ["score", "pretrain", "recipes/vlm_pretrain.yaml", "model.mode=pairwise"], "model.mode=pointwise"),
        ("badjsonl", ["sample", "--prompts", "{tmp}/p.jsonl", "--out", "{tmp}/o"], "p.jsonl:2"),
        ("emptyjsonl", ["sample", "--prompts", "{tmp}/p.jsonl", "--out", "{tmp}/o"], "no prompts"),
        (None, ["sample", "--model", "{tmp}/nomodel", "--prompt", "a red circle", "--out", "{tmp}/o"], "no such folder"),
        ("corrupt", ["sample", "--model", "{tmp}/m", "--prompt", "a red circle", "--out", "{tmp}/o"], "model.safetensors"),
        ("rgba", ["sample", "--prompt", "make the circle red", "--source", "{tmp}/s.png", "--out", "{tmp}/o"], "mode must be RGB"),
        ("small", ["sample", "--prompt", "make the circle red", "--source", "{tmp}/s.png", "--out", "{tmp}/o"], "must be 32x32"),
        (None, ["score", "images", "{tmp}"], "no samples.jsonl"),
        (None, ["score", "images", "{tmp}", "--reward", "nope"], "unknown reward"),
        ("binjsonl", ["sample", "--prompts", "{tmp}/p.jsonl", "--out", "{tmp}/o"], "p.jsonl: prompt file is not UTF-8"),
        ("utf16recipe", ["pretrain", "{tmp}/r.yaml"], "r.yaml: recipe is not UTF-8 text (UTF-16?)"),
        ("utf16recipe", ["grpo", "{tmp}/r.yaml"], "r.yaml: recipe is not UTF-8"),
        ("utf16recipe", ["distill", "{tmp}/r.yaml"], "r.yaml: recipe is not UTF-8"),
        ("emptyrecipe", ["grpo", "{tmp}/r.yaml"], "r.yaml: empty recipe"),
        ("emptyrecipe", ["pretrain", "{tmp}/r.yaml"], "r.yaml: empty recipe"),
    ],
)
def test_user_errors_are_one_line_exit_2(tmp_path, setup, args, needle):
    from PIL import Image

    if setup == "recipe":
        (tmp_path / "r.yaml").write_text("train:\n  lrr: 1\n")
    elif setup == "badjsonl":
        (tmp_path / "p.jsonl").write_text('{"prompt": "a red circle"}\n{oops\n')
    elif setup == "emptyjsonl":
        (tmp_path / "p.jsonl").write_text("")
    elif setup == "binjsonl":
        (tmp_path / "p.jsonl").write_bytes(b'{"prompt": "a red circle"}\n\x89PNG\r\n\x1a\n\x00\xff')
    elif setup == "utf16recipe":
        (tmp_path / "r.yaml").write_text("train:\n  steps: 2\n", encoding="utf-16")
    elif setup == "emptyrecipe":
        (tmp_path / "r.yaml").write_text("# nothing here yet\n")
    elif setup == "corrupt":
        import shutil

        from qirl.models.registry import base_model_path

        shutil.copytree(base_model_path(), tmp_path / "m")
        (tmp_path / "m" / "model.safetensors").write_bytes(b"\0" * 10)
    elif setup == "rgba":
        Image.new("RGBA", (32, 32)).save(tmp_path / "s.png")
    elif setup == "small":
        Image.new("RGB", (8, 8)).save(tmp_path / "s.png")
    result = runner.invoke(app, [a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "o").exists()  # nothing half-written


@pytest.fixture
def keep_torch_threads():
    """`qirl --threads N` sets torch's global thread count; give the rest of the session its own back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_reward_pipeline_annotate_train_eval_score(tmp_path, keep_torch_threads):
    """annotate -> train (pointwise) -> eval -> score images with the trained model, all through the CLI."""
    data, run = tmp_path / "ann", tmp_path / "rm"
    result = runner.invoke(
        app,
        ["score", "annotate", f"out_dir={data}", "n_prompts=6", "samples_per_prompt=4", "steps=[2]",
         "guidance=[1.0]", "pairs_per_prompt=2", "test_fraction=0.34", "--json"],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["prompts"] == 6
    result = runner.invoke(
        app,
        ["--threads", "1", "score", "train", "recipes/rm_pointwise.yaml", f"data.path={data}", f"run.out_dir={run}",
         "train.steps=4", "train.batch_size=4", "run.log_every=2", "run.eval_every=100", "run.checkpoint_every=2",
         "--json"],
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["score", "eval", str(run), "--data", str(data), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert 0 <= metrics["pairwise_accuracy"] <= 1 and -1 <= metrics["spearman"] <= 1
    samples = tmp_path / "s"
    assert runner.invoke(app, ["sample", "--prompts", "demo", "--limit", "2", "--steps", "2", "--out", str(samples), "--quiet"]).exit_code == 0
    result = runner.invoke(
        app, ["score", "images", str(samples), "--reward", f"vlm_pointwise:path={run / 'model'}", "--reward", "oracle", "--json"]
    )
    assert result.exit_code == 0, result.output
    means = json.loads(result.stdout)["t2i_rewards"]
    assert 0 <= means["vlm_pointwise_alignment"] <= 1 and 0 <= means["oracle"] <= 1


def test_score_images_rejects_corrupt_image_and_bad_reward_args(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    (tmp_path / "m.jsonl").write_text('{"image": "bad.png", "prompt": "a red circle"}\n')
    result = runner.invoke(app, ["score", "images", str(tmp_path / "m.jsonl")])
    assert result.exit_code == 2 and "bad.png: not a readable image" in result.output
    assert not (tmp_path / "scores.jsonl").exists()
    result = runner.invoke(app, ["score", "images", str(tmp_path / "m.jsonl"), "--reward", "oracle:oops"])
    assert result.exit_code == 2 and "key=value" in result.output


def test_curate_from_the_cli(tmp_path):
    out = tmp_path / "cur"
    args = ["curate", "demo", "recipes/curate.yaml", "sampling.group_size=3", "sampling.num_steps=2", "sampling.window_size=2",
            f"out.prompts={out}/c.jsonl", f"out.weights={out}/w.yaml", f"out.stats={out}/s.json", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    kept = [json.loads(line) for line in (out / "c.jsonl").read_text().splitlines()]
    assert len(kept) == summary["kept"] > 0 and all("curation" in r for r in kept)
    result = runner.invoke(app, args[:-1] + ["filter.threshold=5.0"])
    assert result.exit_code == 2 and "lower filter.threshold" in result.output
