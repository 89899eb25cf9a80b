"""Pretraining: the loss goes down, checkpoints resume exactly, a SIGKILLed run continues."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qirl.checkpoint import latest_checkpoint, load_checkpoint
from qirl.config import load_recipe
from qirl.errors import UserError
from qirl.models.registry import load_policy
from qirl.pretrain import PretrainRecipe, pretrain

TINY = [
    "model.dim=32",
    "model.depth=1",
    "model.heads=2",
    "model.text_dim=32",
    "model.text_depth=1",
    "model.text_heads=2",
    "data.vocab_samples=300",
    "train.batch_size=4",
    "train.warmup_steps=2",
    "run.log_every=1",
]


def tiny_recipe(out: Path, steps: int, every: int) -> PretrainRecipe:
    return load_recipe(
        PretrainRecipe, None, TINY + [f"train.steps={steps}", f"run.checkpoint_every={every}", f"run.out_dir={out}"]
    )


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(latest_checkpoint(run)).tensors["model"]


def test_resume_is_exact(tmp_path):
    full = list(pretrain(tiny_recipe(tmp_path / "full", 6, 3)))
    assert full[-1]["done"] and full[-1]["steps"] == 6
    # "Kill" after step 4: the consumer stops; the newest checkpoint on disk is step 3.
    partial = tiny_recipe(tmp_path / "cut", 6, 3)
    for row in pretrain(partial):
        if row.get("step") == 4:
            break
    assert latest_checkpoint(tmp_path / "cut").name == "step_00000003"
    with pytest.raises(UserError, match="--resume"):
        list(pretrain(partial))
    resumed = list(pretrain(partial, resume=True))
    assert resumed[-1]["resumed_from"] == 3
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # The loss curve continues: one row per step, no duplicates from the abandoned steps.
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "cut" / "model" / "model.safetensors").is_file()


def test_load_policy_from_runs(tmp_path):
    """A finished run loads its exported EMA model; a run in progress its newest checkpoint's EMA."""
    list(pretrain(tiny_recipe(tmp_path / "run", 2, 1)))
    finished = load_policy(str(tmp_path / "run"))
    ema = load_checkpoint(latest_checkpoint(tmp_path / "run")).tensors["ema"]
    shutil.rmtree(tmp_path / "run" / "model")
    in_progress = load_policy(str(tmp_path / "run"))
    for name, value in in_progress.state_dict().items():
        assert torch.equal(value, ema[name]), name
        assert torch.allclose(finished.state_dict()[name], value), name


def test_resume_without_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="nothing to resume"):
        list(pretrain(tiny_recipe(tmp_path / "none", 2, 1), resume=True))


def test_bad_model_config_names_the_key(tmp_path):
    recipe = tiny_recipe(tmp_path / "bad", 2, 1)
    recipe.model.patch_size = 5
    with pytest.raises(UserError, match="recipe model: image_size 32 is not divisible by patch_size 5"):
        list(pretrain(recipe))


def test_loss_goes_down(tmp_path):
    recipe = tiny_recipe(tmp_path / "learn", 60, 1000)
    recipe.train.lr = 3e-3
    rows = [r for r in pretrain(recipe) if not r.get("done")]
    first = sum(r["loss"] for r in rows[:10]) / 10
    last = sum(r["loss"] for r in rows[-10:]) / 10
    assert last < 0.8 * first, (first, last)


def test_sigkill_and_resume_from_the_cli(tmp_path):
    """A real kill -9 in the middle of `qirl pretrain`; `--resume` continues to the same weights."""
    exe = [sys.executable, "-m", "qirl.cli.main", "pretrain", "recipes/pretrain.yaml", "--quiet"]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = TINY + ["train.steps=40", "run.checkpoint_every=5"]
    ref = subprocess.run(exe + common + [f"run.out_dir={tmp_path / 'ref'}"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "killed"
    proc = subprocess.Popen(exe + common + [f"run.out_dir={run}"], cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "checkpoints" / "step_00000010").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = latest_checkpoint(run)
    assert latest is not None and load_checkpoint(latest).step < 40
    again = subprocess.run(exe + common + [f"run.out_dir={run}", "--resume"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    a, b = final_weights(tmp_path / "ref"), final_weights(run)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_task_mix_step_draws_one_task_per_batch():
    """task_mix=step: every batch is all T2I or all edits, and both occur at about edit_fraction."""
    import numpy as np

    from qirl.pretrain import PretrainData, draw_batch

    rng = np.random.default_rng(0)
    data = PretrainData(edit_fraction=0.5, task_mix="step", caption_dropout=0.0)
    kinds = []
    for _ in range(40):
        _, sources, targets, scenes = draw_batch(rng, 4, data, 32)
        assert len(scenes) == 4
        assert targets.shape == (4, 3, 32, 32)
        edits = {s is not None for s in sources}
        assert len(edits) == 1
        kinds.append(edits.pop())
    assert 10 <= sum(kinds) <= 30
    mixed = [draw_batch(rng, 8, PretrainData(edit_fraction=0.5), 32)[1] for _ in range(10)]
    assert any(len({s is not None for s in src}) == 2 for src in mixed)  # "row" mixes tasks in a batch


def test_unknown_task_mix_is_user_error(tmp_path):
    recipe = tiny_recipe(tmp_path / "bad", 2, 1)
    recipe.data.task_mix = "batch"
    with pytest.raises(UserError, match="data.task_mix"):
        list(pretrain(recipe))


def test_init_from_starts_a_second_stage_from_a_model_folder(tmp_path):
    """train.init_from: the new run starts from those weights (and tokenizer); another shape is refused."""
    list(pretrain(tiny_recipe(tmp_path / "one", 2, 1)))
    first = load_policy(str(tmp_path / "one" / "model"))
    stage2 = tiny_recipe(tmp_path / "two", 1, 1)
    stage2.train.init_from = str(tmp_path / "one" / "model")
    stage2.train.lr = 0.0  # a zero step: the exported weights are the initial ones
    list(pretrain(stage2))
    second = load_policy(str(tmp_path / "two" / "model"))
    assert second.tokenizer.get_vocab() == first.tokenizer.get_vocab()
    for name, value in first.state_dict().items():
        assert torch.equal(second.state_dict()[name], value), name
    other = tiny_recipe(tmp_path / "bad", 1, 1)
    other.train.init_from = str(tmp_path / "one" / "model")
    other.model.depth = 2
    with pytest.raises(UserError, match="init_from.*depth"):
        list(pretrain(other))


def aux_recipe(out: Path, steps: int, every: int) -> PretrainRecipe:
    recipe = tiny_recipe(out, steps, every)
    recipe.model.edit_conditioning = "sequence"
    recipe.data.task_mix = "step"
    recipe.train.shape_aux_weight = 0.5
    recipe.train.shape_aux_layer = 1
    return recipe


def test_shape_aux_objective_trains_resumes_exactly_and_is_not_exported(tmp_path):
    recipe = aux_recipe(tmp_path / "full", 30, 10)
    recipe.train.lr = 3e-3
    rows = [r for r in pretrain(recipe) if not r.get("done")]
    aux = [r["shape_aux_loss"] for r in rows]
    assert sum(aux[-5:]) / 5 < 0.8 * sum(aux[:5]) / 5, aux  # the head learns the shape map
    # The head and its optimiser state are in the checkpoint, so a cut run continues to the same weights.
    cut = aux_recipe(tmp_path / "cut", 30, 10)
    cut.train.lr = 3e-3
    for row in pretrain(cut):
        if row.get("step") == 15:
            break
    list(pretrain(cut, resume=True))
    a, b = load_checkpoint(latest_checkpoint(tmp_path / "full")), load_checkpoint(latest_checkpoint(tmp_path / "cut"))
    for part in ("model", "shape_aux_head"):
        for k in a.tensors[part]:
            assert torch.equal(a.tensors[part][k], b.tensors[part][k]), (part, k)
    # The exported model is a plain TinyDiT: same parameter names as a run without the auxiliary head.
    plain = aux_recipe(tmp_path / "plain", 1, 1)
    plain.train.shape_aux_weight = 0.0
    list(pretrain(plain))
    exported = load_policy(str(tmp_path / "full" / "model")).state_dict().keys()
    assert exported == load_policy(str(tmp_path / "plain" / "model")).state_dict().keys()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"shape_aux_layer": 0}, "train.shape_aux_layer must be between 1 and model.depth"),
        ({"shape_aux_weight": -1.0}, "train.shape_aux_weight must be >= 0"),
        ({"task_mix": "row"}, "needs data.task_mix: step"),
    ],
)
def test_shape_aux_settings_are_checked(tmp_path, change, message):
    recipe = aux_recipe(tmp_path / "bad", 2, 1)
    for key, value in change.items():
        setattr(recipe.data if key == "task_mix" else recipe.train, key, value)
    with pytest.raises(UserError, match=message):
        list(pretrain(recipe))
    assert not (tmp_path / "bad").exists()


def test_resuming_a_plain_run_with_the_shape_aux_objective_is_a_user_error(tmp_path):
    plain = aux_recipe(tmp_path / "run", 2, 1)
    plain.train.shape_aux_weight = 0.0
    list(pretrain(plain))
    plain.train.steps, plain.train.shape_aux_weight = 4, 0.5
    with pytest.raises(UserError, match="without train.shape_aux_weight"):
        list(pretrain(plain, resume=True))


def test_t2i_categories_choose_the_caption_mix(tmp_path):
    import numpy as np

    from qirl.pretrain import PretrainData, draw_batch

    only_single = PretrainData(edit_fraction=0.0, t2i_categories=["single"])
    batch = draw_batch(np.random.default_rng(0), 32, only_single, 32)
    assert all(len(scene.objects) == 1 for scene in batch.target_scenes)
    default = draw_batch(np.random.default_rng(0), 32, PretrainData(edit_fraction=0.0), 32)
    assert any(len(scene.objects) > 1 for scene in default.target_scenes)
    recipe = tiny_recipe(tmp_path / "bad", 2, 1)
    recipe.data.t2i_categories = ["single", "creative"]  # creative prompts are the held-out pairs
    with pytest.raises(UserError, match="data.t2i_categories: unknown or non-training categories creative"):
        list(pretrain(recipe))


def test_token_identity_loss_rewards_states_that_keep_their_word():
    from qirl.pretrain import token_identity_loss

    emb = torch.nn.functional.one_hot(torch.arange(6), 8).float()  # [V=6, D=8], orthogonal words
    ids = torch.tensor([[0, 3, 4, 5], [0, 2, 1, 1]])  # [B, L]; position 0 is [CLS]
    padding = torch.tensor([[False, False, False, False], [False, False, True, True]])
    kept = token_identity_loss(emb[ids], ids, padding, emb)
    collapsed = token_identity_loss(emb[torch.full_like(ids, 3)], ids, padding, emb)  # every state = word 3
    assert kept < 0.01 < collapsed
    # Padding and [CLS] are not asked for: changing their states changes nothing.
    noisy = emb[ids].clone()
    noisy[1, 2:] = 5.0
    noisy[:, 0] = -1.0
    assert torch.equal(token_identity_loss(noisy, ids, padding, emb), kept)
    # A batch of empty prompts ([CLS] alone) has nothing to recover: zero, still differentiable.
    states = torch.randn(2, 1, 8, requires_grad=True)
    empty = token_identity_loss(states, ids[:, :1], padding[:, :1], emb)
    empty.backward()
    assert float(empty.detach()) == 0.0


def test_text_aux_objective_trains_the_encoder_and_is_checked(tmp_path):
    from qirl.models.text import tokenize
    from qirl.pretrain import token_identity_loss

    def identity_loss_of(model_dir: Path) -> float:
        model = load_policy(str(model_dir))
        prompts = ["a large red circle on a white background", "two small blue squares"]
        ids, padding = tokenize(model.tokenizer, prompts, model.config.max_text_len)
        with torch.no_grad():
            states, _ = model.text_encoder(ids, padding)  # [B, L, D]
            return float(token_identity_loss(states, ids, padding, model.text_encoder.tok_emb.weight))

    runs = {}
    for weight in (0.0, 1.0):
        recipe = tiny_recipe(tmp_path / f"w{weight}", 30, 10)
        recipe.train.lr, recipe.train.text_aux_weight = 3e-3, weight
        runs[weight] = [r for r in pretrain(recipe) if not r.get("done")]
    text = [r["text_aux_loss"] for r in runs[1.0]]
    assert text[-1] < 0.8 * text[0], text
    assert all("text_aux_loss" not in r for r in runs[0.0])
    # The same data and seed with the loss on leave an encoder whose states keep their words far better.
    assert identity_loss_of(tmp_path / "w1.0" / "model") < 0.5 * identity_loss_of(tmp_path / "w0.0" / "model")
    bad = tiny_recipe(tmp_path / "bad", 2, 1)
    bad.train.text_aux_weight = -0.1
    with pytest.raises(UserError, match="train.text_aux_weight must be >= 0"):
        list(pretrain(bad))
    assert not (tmp_path / "bad").exists()
