"""recipes/qwen-image/*.yaml are real recipes: each runs one iteration with its model paths pointed at tiny
random pipelines of the same families (and CPU-sized overrides), through the same trainers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qirl.config import load_recipe
from qirl.models.diffusers_tiny import build_tiny_pipeline
from qirl.models.registry import load_policy
from qirl.rl.distill import DistillRecipe, distill, select_teachers
from qirl.rl.grpo import GrpoRecipe, grpo

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "qwen-image"
CPU = ["policy.resolution=32", "policy.dtype=float32", "policy.gradient_checkpointing=false", "run.tensorboard=false"]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipes")
    return {
        "t2i": build_tiny_pipeline("qwen-image", root / "t2i", seed=0),
        "edit": build_tiny_pipeline("qwen-image-edit", root / "edit", seed=0),
        "edit_teacher": build_tiny_pipeline("qwen-image-edit", root / "edit1", seed=1),
    }


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def last(rows) -> dict:
    out = list(rows)
    return out[-1]


def test_every_recipe_loads_with_its_schema() -> None:
    for name, schema in (("t2i", GrpoRecipe), ("edit", GrpoRecipe), ("distill", DistillRecipe)):
        recipe = load_recipe(schema, RECIPES / f"{name}.yaml")
        assert recipe.policy.dtype == "bfloat16" and recipe.policy.gradient_checkpointing
        assert recipe.eval.every == 0 and recipe.train.prompts_per_iter % 8 == 0  # 8 GPUs per node


@pytest.mark.parametrize("task", ["t2i", "edit"])
def test_grpo_recipes_run_on_tiny_pipelines(pipes: dict[str, Path], tmp_path: Path, task: str) -> None:
    overrides = [
        f"model={pipes[task]}", f"data.prompts=shapes-{task}", "rewards.models=[{name: oracle_aesthetics}]",
        "train.iterations=1", "train.prompts_per_iter=2", "train.group_size=2", "train.micro_batch=4",
        "sampling.num_steps=3", "train.lora_rank=4", f"run.out_dir={tmp_path / 'run'}", *CPU,
    ]
    summary = last(grpo(load_recipe(GrpoRecipe, RECIPES / f"{task}.yaml", overrides)))
    assert summary["steps"] == 1 and summary["skipped"] == 0
    policy = load_policy(str(tmp_path / "run"))  # the exported model/ (LoRA merged) loads back
    assert policy.family == ("qwen-image" if task == "t2i" else "qwen-image-edit")


def test_distill_recipe_runs_on_tiny_pipelines(pipes: dict[str, Path], tmp_path: Path) -> None:
    overrides = [
        f"student={pipes['edit']}", "data.prompts=shapes-mix", "train.iterations=1", "train.prompts_per_iter=4",
        "train.micro_batch=4", "rollout.num_steps=3", "train.lora_rank=4", f"run.out_dir={tmp_path / 'run'}", *CPU,
    ]
    recipe = load_recipe(DistillRecipe, RECIPES / "distill.yaml", overrides)
    recipe = select_teachers(recipe, f"t2i={pipes['t2i']},edit={pipes['edit_teacher']}")
    rows = list(distill(recipe))
    assert rows[0]["loss"] > 0 and rows[-1]["steps"] == 1


def test_sample_and_bench_take_a_pipeline_folder(pipes: dict[str, Path], tmp_path: Path) -> None:
    """`qirl sample` and `qirl eval bench` load a diffusers pipeline folder with its load options."""
    from qirl.cli.main import app
    from typer.testing import CliRunner

    runner = CliRunner()
    out = tmp_path / "samples"
    result = runner.invoke(
        app,
        ["sample", "--model", str(pipes["t2i"]), "--prompt", "a red circle", "--resolution", "32",
         "--steps", "2", "--out", str(out), "--quiet"],
    )
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("*.png"))) >= 1
    bench = tmp_path / "bench"
    result = runner.invoke(
        app,
        ["eval", "bench", "--model", f"q={pipes['t2i']}@resolution=32@steps=2", "--task", "t2i", "--seeds", "1",
         "--n-prompts", "2", "--bootstrap", "0", "--out", str(bench), "--quiet"],
    )
    assert result.exit_code == 0, result.output
    assert (bench / "bench.json").is_file()
