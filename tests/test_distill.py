"""On-policy distillation: loss 0 against itself, routing by task, guided target, resume, errors, CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from qirl.checkpoint import latest_checkpoint, load_checkpoint
from qirl.config import load_recipe
from qirl.data import PromptRecord
from qirl.errors import UserError
from qirl.models.registry import load_policy
from qirl.prompt_sets import builtin_prompts, record_source
from qirl.rl.distill import (
    DistillRecipe,
    DistillTeacher,
    distill,
    nfe_per_iteration,
    routes,
    rows_condition,
    select_teachers,
    trained_steps,
)

TINY = [
    "train.prompts_per_iter=4",
    "train.micro_batch=2",
    "rollout.num_steps=2",
    "eval.every=0",
    "run.tensorboard=false",
]


@pytest.fixture(scope="module")
def perturbed(tmp_path_factory) -> str:
    """A model folder: the base DiT with every trainable weight nudged (a teacher unlike the base)."""
    policy = load_policy("base")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    path = tmp_path_factory.mktemp("teacher") / "model"
    policy.save_pretrained(path)
    return str(path)


def recipe(out: Path, t2i: str, edit: str, *extra: str) -> DistillRecipe:
    return load_recipe(
        DistillRecipe,
        None,
        TINY + [f"teachers.t2i={t2i}", f"teachers.edit={edit}", f"run.out_dir={out}", *extra],
    )


def rows(cfg: DistillRecipe, resume: bool = False) -> list[dict]:
    return list(distill(cfg, resume=resume))


def dit_weights_equal(a: str, b: str) -> bool:
    sa, sb = load_policy(a).state_dict(), load_policy(b).state_dict()
    return all(torch.equal(sa[n], sb[n]) for n in sa)


def test_first_iteration_moves_the_student_and_evaluates_both_tasks(tmp_path, perturbed):
    out = rows(
        recipe(
            tmp_path / "r",
            perturbed,
            perturbed,
            "train.iterations=1",
            "eval.every=1",
            "eval.n=2",
            "eval.num_steps=2",
            "eval.grid=2",
            "run.tensorboard=true",
        )
    )
    assert out[0]["step"] == 0 and {"eval/t2i/overall", "eval/edit/success"} <= set(out[0])
    first = out[1]
    assert first["step"] == 1 and out[-1]["done"]
    assert 0 < first["loss"] < float("inf") and first["grad_norm"] > 0 and first["skipped"] == 0
    assert first["loss/t2i"] > 0 and first["loss/edit"] > 0
    assert first["nfe"] == 4 * (2 * 2 + 2 * (3 + 1)) == nfe_per_iteration(recipe(tmp_path, "a", "b"))
    assert "eval_oracle_overall" in first
    assert (tmp_path / "r" / "grids" / "step_00001_edit.png").is_file()
    assert (tmp_path / "r" / "grids" / "step_00001_t2i.png").is_file()
    assert not dit_weights_equal("base", str(tmp_path / "r" / "model"))
    assert (tmp_path / "r" / "metrics.jsonl").read_text().count("\n") == 2
    assert list((tmp_path / "r" / "tb").iterdir())  # TensorBoard event file (tensorboard is a dev extra)


def test_student_equal_to_teacher_has_zero_loss_and_keeps_its_weights(tmp_path):
    out = rows(recipe(tmp_path / "z", "base", "base", "train.iterations=2"))
    for row in out[:-1]:
        assert row["loss"] == 0.0 and row["loss/t2i"] == 0.0 and row["loss/edit"] == 0.0
        assert row["grad_norm"] == 0.0
    assert dit_weights_equal("base", str(tmp_path / "z" / "model"))  # AdamW, zero gradient, no decay


@pytest.mark.parametrize("perturbed_task", ["t2i", "edit"])
def test_each_prompt_is_routed_to_its_tasks_teacher(tmp_path, perturbed, perturbed_task):
    t2i, edit = (perturbed, "base") if perturbed_task == "t2i" else ("base", perturbed)
    first = rows(recipe(tmp_path / perturbed_task, t2i, edit, "train.iterations=1"))[0]
    other = "edit" if perturbed_task == "t2i" else "t2i"
    assert first[f"loss/{perturbed_task}"] > 1e-6
    assert first[f"loss/{other}"] == 0.0  # the base student against the base teacher


def test_guided_target_differs_from_conditional(tmp_path):
    cfg = recipe(tmp_path / "g", "base", "base", "train.iterations=1", "teacher.target=guided")
    first = rows(cfg)[0]
    assert first["loss"] > 1e-6 and first["loss/t2i"] > 0 and first["loss/edit"] > 0
    assert first["nfe"] == nfe_per_iteration(cfg) == 4 * (2 * 2 + 2 * (3 + 2))


def test_ode_rollout_with_a_step_subset_and_unused_teacher(tmp_path, perturbed):
    cfg = recipe(
        tmp_path / "o",
        perturbed,
        str(tmp_path / "never_made"),
        "train.iterations=1",
        "data.prompts=shapes-t2i",
        "rollout.sampler=ode",
        "rollout.guidance=1",
        "rollout.num_steps=3",
        "train.steps_per_traj=1",
    )
    out = rows(cfg)
    assert out[0]["loss/t2i"] > 0 and "loss/edit" not in out[0]
    assert out[0]["nfe"] == 4 * (3 * 1 + 1 * (3 + 1))
    assert out[-1]["teachers"] == {"t2i": perturbed}


def test_non_finite_loss_skips_the_step_and_keeps_weights(tmp_path, perturbed, monkeypatch):
    import qirl.rl.distill as d

    real = d.ops.velocity_mse
    monkeypatch.setattr(d.ops, "velocity_mse", lambda s, t: real(s * float("nan"), t))
    out = rows(recipe(tmp_path / "nan", perturbed, perturbed, "train.iterations=2"))
    assert [r["skipped"] for r in out[:-1]] == [1, 2] and out[-1]["skipped"] == 2
    assert dit_weights_equal("base", str(tmp_path / "nan" / "model"))


def test_lora_student_exports_a_merged_model(tmp_path, perturbed):
    out = rows(recipe(tmp_path / "l", perturbed, perturbed, "train.iterations=1", "train.lora_rank=4"))
    assert out[0]["grad_norm"] > 0
    base, merged = load_policy("base").state_dict(), load_policy(str(tmp_path / "l" / "model")).state_dict()
    changed = [n for n in base if not torch.equal(base[n], merged[n])]
    assert changed and all(n.startswith("blocks.") for n in changed)  # only the adapted DiT layers moved


def test_the_rollout_reuses_the_routed_student_conditions_in_row_order():
    """Prompts are encoded once per task; the rollout's condition is those rows put back in order."""
    policy = load_policy("base")
    mixed: list[PromptRecord] = []
    for t2i, edit in zip(builtin_prompts("val-t2i")[:3], builtin_prompts("val-edit")[:3], strict=True):
        mixed += [edit, t2i]  # interleaved tasks: rows e, t, e, t, e, t
    sources = [record_source(r, policy.image_size) for r in mixed]
    routed = routes(policy, {"t2i": policy, "edit": policy}, mixed, sources, DistillTeacher())
    assert [route.task for route in routed] == ["t2i", "edit"]
    cond = rows_condition(policy, routed, mixed, sources)
    with torch.no_grad():
        whole = policy.encode([r.prompt for r in mixed], sources)  # [6], encoded together
    assert cond.is_edit.tolist() == [True, False] * 3
    x, t = torch.randn((6, *policy.latent_shape), generator=torch.Generator().manual_seed(0)), torch.full((6,), 0.6)
    with torch.no_grad():  # the same velocities as a condition encoded in one batch (padding aside)
        torch.testing.assert_close(policy.velocity(x, t, cond), policy.velocity(x, t, whole), atol=1e-5, rtol=1e-4)


def test_trained_steps_are_distinct_sorted_and_seeded():
    a = trained_steps(5, 6, 3, torch.Generator().manual_seed(0))  # [B, k]
    b = trained_steps(5, 6, 3, torch.Generator().manual_seed(0))
    assert a.shape == (5, 3) and torch.equal(a, b)
    assert (a >= 0).all() and (a < 6).all() and (a[:, 1:] > a[:, :-1]).all()
    assert torch.equal(trained_steps(2, 4, 4, torch.Generator()), torch.arange(4).expand(2, 4))


def test_resume_is_exact(tmp_path, perturbed):
    def cfg(name: str, iterations: int) -> DistillRecipe:
        return recipe(
            tmp_path / name,
            perturbed,
            "base",
            f"train.iterations={iterations}",
            "run.checkpoint_every=2",
            "train.steps_per_traj=1",
            "train.ema_decay=0.5",
        )

    rows(cfg("full", 4))
    rows(cfg("cut", 2))
    with pytest.raises(UserError, match="--resume"):
        rows(cfg("cut", 4))
    resumed = rows(cfg("cut", 4), resume=True)
    assert resumed[-1]["resumed_from"] == 2 and resumed[-1]["steps"] == 4
    a = load_checkpoint(latest_checkpoint(tmp_path / "full"))
    b = load_checkpoint(latest_checkpoint(tmp_path / "cut"))
    assert a.step == b.step == 4
    for group in ("model", "ema"):
        for name, tensor in a.tensors[group].items():
            assert torch.equal(tensor, b.tensors[group][name]), (group, name)
    assert a.state["data_rng"] == b.state["data_rng"]
    lines_a = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    lines_b = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert (
        len(lines_a) == len(lines_b) == 4
        and lines_a[-1].split('"rollout_s"')[0] == lines_b[-1].split('"rollout_s"')[0]
    )


def test_missing_teacher_names_the_task_and_the_run_that_makes_it(tmp_path):
    out = tmp_path / "m"
    with pytest.raises(UserError, match=r"teacher runs not found: edit \(.*nope\).*`qirl grpo edit run.out_dir=.*nope`"):
        rows(recipe(out, "base", str(tmp_path / "nope")))
    assert not out.exists()  # nothing written


@pytest.mark.parametrize(
    "teachers, match",
    [
        ("t2i", "no teacher for edit"),
        ("t2i,t2i", "twice"),
        ("video", "unknown task"),
        ("t2i,edit=", "empty path"),
        (",", "no task"),
    ],
)
def test_teacher_selection_errors(tmp_path, teachers, match):
    with pytest.raises(UserError, match=match):
        rows(select_teachers(recipe(tmp_path / "s", "base", "base"), teachers))


def test_teacher_selection_keeps_or_overrides_paths(tmp_path):
    cfg = select_teachers(recipe(tmp_path, "base", "runs/e"), "edit,t2i=runs/x")
    assert cfg.teachers == {"edit": "runs/e", "t2i": "runs/x"}
    assert select_teachers(cfg, None) is cfg


@pytest.mark.parametrize(
    "override, match",
    [
        ("teacher.target=bogus", "teacher.target"),
        ("teacher.guidance=1", "guidance > 1"),
        ("rollout.sampler=bogus", "rollout.sampler"),
        ("train.steps_per_traj=3", "steps_per_traj"),
        ("teachers.video=base", "unknown task"),
        ("data.prompts=heldout-t2i", "evaluation set"),
    ],
)
def test_bad_recipe_is_a_user_error(tmp_path, override, match):
    extra = ["teacher.target=guided"] if override.startswith("teacher.guidance") else []
    with pytest.raises(UserError, match=match):
        rows(recipe(tmp_path / "bad", "base", "base", *extra, override))


@pytest.fixture
def keep_torch_threads():
    """`qirl --threads N` sets torch's global thread count; give the rest of the session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_cli_runs_one_iteration_and_a_missing_teacher_exits_2(tmp_path, perturbed, keep_torch_threads):
    from qirl.cli.main import app

    runner = CliRunner()
    recipe_file = tmp_path / "d.yaml"
    recipe_file.write_text("train: {iterations: 1}\n")
    out = tmp_path / "cli"
    args = [str(recipe_file), *TINY, f"run.out_dir={out}"]
    ok = runner.invoke(
        app, ["--threads", "1", "distill", "--teachers", f"t2i={perturbed},edit=base", *args, "--quiet"]
    )
    assert ok.exit_code == 0, ok.output
    assert (out / "model" / "config.json").is_file()
    assert "teachers:\n  t2i: " + perturbed in (out / "recipe.yaml").read_text()
    missing = runner.invoke(
        app,
        ["distill", "--teachers", f"t2i=base,edit={tmp_path}/gone", *args[:-1], f"run.out_dir={tmp_path}/x"],
    )
    assert missing.exit_code == 2, missing.output
    assert "`qirl grpo edit run.out_dir=" in missing.output and "Traceback" not in missing.output
    assert len(missing.output.strip().splitlines()) == 1, missing.output
    assert not (tmp_path / "x").exists()
