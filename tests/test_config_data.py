"""Recipes, prompt records, images and checkpoints: every user mistake is one clear UserError."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch
from PIL import Image

from qirl.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from qirl.config import load_recipe
from qirl.data import load_image, read_jsonl, write_jsonl
from qirl.errors import UserError


@dataclass
class Train:
    lr: float = 1e-3
    steps: int = 10


@dataclass
class Recipe:
    train: Train = field(default_factory=Train)
    name: str = "x"


def test_recipe_yaml_and_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  lr: 0.5\n")
    cfg = load_recipe(Recipe, path, ["train.steps=7", "name=y"])
    assert isinstance(cfg, Recipe) and isinstance(cfg.train, Train)
    assert (cfg.train.lr, cfg.train.steps, cfg.name) == (0.5, 7, "y")


@pytest.mark.parametrize(
    "yaml_text, overrides, needle",
    [
        ("train:\n  lrr: 0.5\n", [], "lrr"),
        ("train:\n  steps: many\n", [], "steps"),
        ("name: x\n", ["train.nope=1"], "train.nope"),
        ("name: x\n", ["train.steps=abc"], "train.steps"),
        ("name: x\n", ["train.steps"], "key=value"),
        ("train: [1, 2\n", [], "malformed YAML"),
    ],
)
def test_recipe_errors_name_the_key(tmp_path, yaml_text, overrides, needle):
    path = tmp_path / "r.yaml"
    path.write_text(yaml_text)
    with pytest.raises(UserError) as err:
        load_recipe(Recipe, path, overrides)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_recipe(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_recipe(Recipe, tmp_path / "nope.yaml")


def test_read_jsonl_valid(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"prompt": "a red circle", "category": "single"}\n\n'
        '{"prompt": "make it blue", "task": "edit", "source": "src.png", "note": 1}\n'
    )
    recs = read_jsonl(path)
    assert [r.task for r in recs] == ["t2i", "edit"]
    assert recs[1].source == str(tmp_path / "src.png")
    assert recs[1].extra == {"note": 1}
    assert recs[1].to_json()["note"] == 1


@pytest.mark.parametrize(
    "text, needle",
    [
        ('{"prompt": "ok"}\n{bad json\n', "p.jsonl:2: malformed JSON"),
        ('{"category": "x"}\n', "p.jsonl:1: missing required key 'prompt'"),
        ('{"prompt": 3}\n', "'prompt' must be a string"),
        ('{"prompt": "x", "task": "video"}\n', "'task' must be one of"),
        ('{"prompt": "x", "task": "edit"}\n', "needs 'source'"),
        ("[1, 2]\n", "expected a JSON object"),
        ("\n\n", "no prompts"),
    ],
)
def test_read_jsonl_errors(tmp_path, text, needle):
    path = tmp_path / "p.jsonl"
    path.write_text(text)
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        read_jsonl(path)


def test_write_jsonl_atomic_roundtrip(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"prompt": "a", "task": "t2i"}])
    assert json.loads(path.read_text()) == {"prompt": "a", "task": "t2i"}
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_load_image_checks_mode_and_size(tmp_path):
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "ok.png")
    Image.new("RGBA", (32, 32)).save(tmp_path / "rgba.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "small.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    img = load_image(tmp_path / "ok.png", 32)
    assert img.shape == (3, 32, 32) and torch.allclose(img[0], torch.ones(32, 32))
    with pytest.raises(UserError, match="mode must be RGB"):
        load_image(tmp_path / "rgba.png", 32)
    with pytest.raises(UserError, match="must be 32x32, got 16x16"):
        load_image(tmp_path / "small.png", 32)
    with pytest.raises(UserError, match="not a readable image"):
        load_image(tmp_path / "junk.png")
    with pytest.raises(UserError, match="not found"):
        load_image(tmp_path / "missing.png")


def test_checkpoint_roundtrip_with_optimizer(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"model": model.state_dict()}, {"pos": step}, {"optimizer": opt.state_dict()}, keep=2)
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_00000002", "step_00000003"]
    ck = load_checkpoint(latest_checkpoint(tmp_path))
    assert ck.step == 3 and ck.state["pos"] == 3
    opt2 = torch.optim.AdamW(model.parameters(), lr=0.5)
    opt2.load_state_dict(ck.nested("optimizer"))
    assert opt2.param_groups[0]["lr"] == 0.01
    assert torch.equal(opt2.state[model.weight]["exp_avg"], opt.state[model.weight]["exp_avg"])
    assert torch.equal(ck.tensors["model"]["weight"], model.weight.detach())


def test_corrupt_checkpoint_is_a_user_error(tmp_path):
    path = save_checkpoint(tmp_path, 1, {"model": {"w": torch.ones(2)}}, {})
    (path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupt checkpoint file"):
        load_checkpoint(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(UserError, match="missing checkpoint file"):
        load_checkpoint(path)
    with pytest.raises(UserError, match="not a qirl checkpoint"):
        load_checkpoint(tmp_path)


def test_failed_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, {"model": {"w": torch.ones(2)}}, {})
    import qirl.checkpoint as ck

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "save_file", full_disk)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, {"model": {"w": torch.zeros(2)}}, {})
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step_00000001"
    assert torch.equal(load_checkpoint(latest).tensors["model"]["w"], torch.ones(2))
    assert not list((tmp_path / "checkpoints").glob(".*tmp"))


def test_recipe_include_merges_under_the_section(tmp_path):
    from qirl.rl.grpo import GrpoRecipe

    (tmp_path / "w.yaml").write_text("category_weights:\n  counting: {oracle_alignment: 2.0}\n")
    (tmp_path / "r.yaml").write_text(
        "rewards:\n  include: w.yaml\n  models:\n    - {name: oracle_alignment}\n"
    )
    cfg = load_recipe(GrpoRecipe, tmp_path / "r.yaml")
    assert cfg.rewards.category_weights == {"counting": {"oracle_alignment": 2.0}}
    assert [m.name for m in cfg.rewards.models] == ["oracle_alignment"]
    (tmp_path / "r2.yaml").write_text("rewards:\n  include: missing.yaml\n")
    with pytest.raises(UserError, match="missing.yaml: recipe file not found"):
        load_recipe(GrpoRecipe, tmp_path / "r2.yaml")
    (tmp_path / "loop.yaml").write_text("include: loop.yaml\n")
    with pytest.raises(UserError, match="include cycle"):
        load_recipe(GrpoRecipe, tmp_path / "loop.yaml")


def test_validation_sets_are_fixed_and_disjoint_from_heldout_and_training_pools():
    from qirl.prompt_sets import VAL_EXCLUDED_POOL, _identity, builtin_prompts, generated_pool

    for task, name in (("t2i", "val-t2i"), ("edit", "val-edit"), ("edit", "val-edit-large")):
        val = builtin_prompts(name)
        assert val == builtin_prompts(name)  # fixed seeds
        assert {r.task for r in val} == {task}
        assert len({_identity(r) for r in val}) > 0.9 * len(val)
        seen = {_identity(r) for r in builtin_prompts(f"heldout-{task}")}
        seen |= {_identity(r) for r in generated_pool(f"shapes-{task}", VAL_EXCLUDED_POOL)}
        assert not seen & {_identity(r) for r in val}
    names = ("val-t2i", "val-edit", "val-edit-large", "heldout-t2i", "heldout-edit", "heldout-edit-large")
    sets = {name: {_identity(r) for r in builtin_prompts(name)} for name in names}
    for i, a in enumerate(names):  # no two evaluation sets share a prompt
        for b in names[i + 1 :]:
            assert not sets[a] & sets[b], (a, b)
    pool = {_identity(r) for r in generated_pool("shapes-edit", VAL_EXCLUDED_POOL)}
    assert not sets["heldout-edit-large"] & pool
    categories = {r.category for r in builtin_prompts("val-t2i")}
    assert categories == {r.category for r in builtin_prompts("heldout-t2i")}  # every pillar is measured


def test_text_files_that_are_not_utf8_are_one_line_user_errors(tmp_path):
    """Every reader of a user's text file names the file and the first bad byte (never a traceback)."""
    from qirl.checkpoint import load_checkpoint
    from qirl.data import read_jsonl
    from qirl.files import read_json

    binary = b"\x89PNG\r\n\x1a\n\x00\xff\xfe"
    (tmp_path / "p.jsonl").write_bytes(binary)
    with pytest.raises(UserError, match=r"p.jsonl: prompt file is not UTF-8 text: byte 0x89 at offset 0"):
        read_jsonl(tmp_path / "p.jsonl")
    (tmp_path / "c.json").write_text('{"a": 1}', encoding="utf-16")
    with pytest.raises(UserError, match=r"c.json: JSON file is not UTF-8 text \(UTF-16\?\)"):
        read_json(tmp_path / "c.json")
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "state.json").write_bytes(binary)
    with pytest.raises(UserError, match="state.json: checkpoint state is not UTF-8"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "state.json").write_text("{oops")
    with pytest.raises(UserError, match="state.json:1: malformed JSON in checkpoint state"):
        load_checkpoint(tmp_path / "ck")
    with pytest.raises(UserError, match="missing.json: JSON file not found"):
        read_json(tmp_path / "missing.json")


def test_overrides_reach_list_elements_and_bad_ones_are_user_errors():
    from qirl.rl.grpo import GrpoRecipe

    r = load_recipe(GrpoRecipe, "recipes/t2i_rm.yaml",
                    ["rewards.models.0.args.path=runs/x/model", "rewards.models.2.weight=2"])
    assert r.rewards.models[0].args == {"path": "runs/x/model", "dimension": "alignment"}
    assert r.rewards.models[2].weight == 2.0 and r.rewards.models[1].weight == 1.0
    for bad, match in (("rewards.models.7.weight=2", "no such list element"),
                       ("rewards.models.0.weight=abc", "could not be converted")):
        with pytest.raises(UserError, match=match):
            load_recipe(GrpoRecipe, "recipes/t2i_rm.yaml", [bad])


def test_edit_reward_recipes_load():
    """recipes/rm_edit.yaml trains an edit-only reward model; recipes/edit_rm.yaml trains on it."""
    from qirl.rewards.vlm.train import RewardTrainRecipe
    from qirl.rl.grpo import GrpoRecipe

    rm = load_recipe(RewardTrainRecipe, "recipes/rm_edit.yaml", [])
    assert rm.model.tasks == ["edit"] and "alignment" in rm.data.dimensions
    g = load_recipe(GrpoRecipe, "recipes/edit_rm.yaml", [])
    names = [(m.name, m.args.get("dimension")) for m in g.rewards.models]
    assert names == [("vlm_pointwise", "alignment"), ("vlm_pointwise", "quality"), ("oracle_identity", None)]
    assert all(m.args.get("path") == rm.run.out_dir + "/model" for m in g.rewards.models[:2])
    assert [m.name for m in g.rewards.monitors] == ["oracle_edit"]  # the judge only watches


def test_the_edit_recipes_differ_only_in_their_update():
    """recipes/edit.yaml (DPO, the edit teacher), recipes/edit_raft.yaml and the GRPO arm kept in
    recipes/ablations/edit_grpo.yaml roll out and reward alike; only the update differs."""
    from qirl.rl.grpo import GrpoRecipe, validate

    raft = load_recipe(GrpoRecipe, "recipes/edit_raft.yaml", [])
    dpo = load_recipe(GrpoRecipe, "recipes/edit.yaml", [])
    grpo = load_recipe(GrpoRecipe, "recipes/ablations/edit_grpo.yaml", [])
    for recipe in (raft, dpo, grpo):
        validate(recipe)
    for recipe in (dpo, grpo):
        assert recipe.sampling == raft.sampling and recipe.rewards == raft.rewards and recipe.data == raft.data
    assert (dpo.train.objective, dpo.train.raft_require, dpo.train.raft_keep) == ("dpo", "oracle_instruction", 2)
    assert dpo.train.lr == raft.train.lr and dpo.train.iterations == raft.train.iterations
    assert dpo.run.out_dir == "runs/grpo_edit"  # the default edit teacher of `qirl distill --teachers t2i,edit`
    assert grpo.train.objective == "grpo" and grpo.run.out_dir != dpo.run.out_dir
    t = raft.train
    assert (t.objective, t.raft_require, t.raft_times) == ("raft", "oracle_instruction", "window")
    assert t.kl_coef > 0 and t.raft_require in [m.name for m in raft.rewards.models]
