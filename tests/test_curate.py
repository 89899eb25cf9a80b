"""Tests for `qirl.rl.curate`: filtering by intra-group range, calibration, atomic outputs.

Sampling runs the shipped base model at tiny settings (2 steps, G=3, 6 T2I prompts); the calibration
rule is checked on hand-made reward arrays.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf

from qirl.config import load_recipe
from qirl.data import write_jsonl
from qirl.errors import UserError
from qirl.models.registry import load_policy
from qirl.prompt_sets import builtin_prompts
from qirl.rewards.composite import CompositeConfig, CompositeReward
from qirl.rl.curate import (
    CurateFilter,
    CurateOut,
    CurateRecipe,
    CurateSampling,
    calibrate,
    curate,
    group_stats,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def policy():
    return load_policy("base")


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    recs = [r for r in builtin_prompts("demo") if r.task == "t2i"][:6]
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    write_jsonl(path, [r.to_json() for r in recs])
    return path


def _recipe(prompts: Path, out: Path, threshold: float, on: str = "composite") -> CurateRecipe:
    return CurateRecipe(
        prompts=str(prompts),
        sampling=CurateSampling(group_size=3, num_steps=2, window_size=2, batch_prompts=4),
        filter=CurateFilter(threshold=threshold, metric=on),
        out=CurateOut(str(out / "curated.jsonl"), str(out / "weights.yaml"), str(out / "stats.json")),
    )


def _run(recipe, policy):
    msgs = list(curate(recipe, policy=policy))
    assert all("done" not in m for m in msgs[:-1]) and msgs[-1]["done"] is True
    return msgs[-1]


@pytest.fixture(scope="module")
def run_any(policy, prompts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    return out, _run(_recipe(prompts_file, out, 0.2, "any"), policy)


def test_kept_are_exactly_those_reaching_threshold(run_any):
    out, summary = run_any
    rows = summary["per_prompt"]
    names = ["oracle_alignment", "oracle_fidelity", "oracle_aesthetics"]
    expect = [
        any(r["rewards"][n]["range"] is not None and r["rewards"][n]["range"] >= 0.2 for n in names)
        for r in rows
    ]
    assert [r["kept"] for r in rows] == expect
    assert summary["kept"] == sum(expect) > 0
    curated = [json.loads(line) for line in (out / "curated.jsonl").read_text().splitlines()]
    assert [c["id"] for c in curated] == [r["id"] for r, k in zip(rows, expect, strict=True) if k]
    for c in curated:  # original record kept, plus the curation field
        assert {"prompt", "task", "category", "scene", "curation"} <= set(c)
        assert set(c["curation"]) == {*names, "composite"}
    stats = json.loads((out / "stats.json").read_text())
    assert stats["kept"] == summary["kept"]
    for cat, info in stats["per_category"].items():
        mine = [r for r in rows if r["category"] == cat]
        assert info["kept"] == sum(r["kept"] for r in mine)
        assert info["kept_fraction"] == pytest.approx(info["kept"] / len(mine))


def test_composite_filter_and_range_stats(policy, prompts_file, tmp_path, run_any):
    _, summary_any = run_any
    comp = [r["rewards"]["composite"]["range"] for r in summary_any["per_prompt"]]
    thr = sorted(comp)[len(comp) // 2]  # about half reach it
    summary = _run(_recipe(prompts_file, tmp_path, thr, "composite"), policy)
    # same seeds -> same samples and ranges as the "any" run
    assert [r["rewards"]["composite"]["range"] for r in summary["per_prompt"]] == comp
    assert [r["kept"] for r in summary["per_prompt"]] == [c >= thr for c in comp]


def test_empty_result_is_user_error_and_writes_nothing(policy, prompts_file, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match="lower filter.threshold"):
        list(curate(_recipe(prompts_file, out, 2.0), policy=policy))  # ranges are <= 1
    assert not out.exists() or not any(out.iterdir())


def test_bad_filter_on_is_user_error(policy, prompts_file, tmp_path):
    with pytest.raises(UserError, match="filter.metric"):
        list(curate(_recipe(prompts_file, tmp_path, 0.1, "nope"), policy=policy))


def test_weights_yaml_merges_into_composite_config(run_any):
    out, summary = run_any
    data = yaml.safe_load((out / "weights.yaml").read_text())
    assert set(data) == {"category_weights"}
    cfg = OmegaConf.to_object(
        OmegaConf.merge(
            OmegaConf.structured(CompositeConfig),
            {
                "models": [
                    {"name": "oracle_alignment"},
                    {"name": "oracle_fidelity"},
                    {"name": "oracle_aesthetics"},
                ]
            },
            data,
        )
    )
    assert cfg.category_weights == summary["category_weights"]
    reward = CompositeReward.from_config(cfg)  # names validated against the models
    for table in cfg.category_weights.values():
        assert sum(table.values()) / len(table) == pytest.approx(1.0, abs=1e-5)
    assert set(reward.category_weights) == set(cfg.category_weights)


def test_outputs_atomic_no_temp_files(run_any):
    out, _ = run_any
    assert sorted(p.name for p in out.iterdir()) == ["curated.jsonl", "stats.json", "weights.yaml"]


def test_group_stats_hand_computed():
    v = np.array([[0.0, 0.5, 1.0], [0.2, np.nan, 0.4], [np.nan, 0.3, np.nan]])
    st = group_stats(v)
    assert np.allclose(st["range"][:2], [1.0, 0.2]) and math.isnan(st["range"][2])
    assert np.allclose(st["mean"], [0.5, 0.3, 0.3])
    assert np.allclose(st["std"], [np.std([0, 0.5, 1.0]), 0.1, 0.0])


def test_calibration_hand_made():
    # category a: 4 groups. reward x varies in all 4 (p=1), y in 1 of 4 (p=1/4), z never (p=0)
    # category b: x varies in 1 of 2, y in 2 of 2, z is NaN everywhere (not defined in b)
    const, vary = [0.5, 0.5], [0.0, 1.0]
    nan = [np.nan, np.nan]
    a = [[vary, vary if i == 0 else const, const] for i in range(4)]  # [4, K, G]
    b = [[vary, vary, nan], [const, vary, nan]]
    rewards = np.array(a + b).transpose(0, 2, 1)  # [P, G, K]
    cats = ["a"] * 4 + ["b"] * 2
    weights, p = calibrate(rewards, cats, ["x", "y", "z"], [1.0, 1.0, 1.0])
    assert p == {"a": {"x": 1.0, "y": 0.25, "z": 0.0}, "b": {"x": 0.5, "y": 1.0, "z": None}}
    # a: raw 1/sqrt(1)=1, 1/sqrt(.25)=2, 0 -> mean 1 -> (1, 2, 0)
    assert weights["a"] == pytest.approx({"x": 1.0, "y": 2.0, "z": 0.0})
    # b: raw sqrt(2), 1 -> mean (sqrt2+1)/2
    m = (math.sqrt(2) + 1) / 2
    assert weights["b"] == pytest.approx({"x": math.sqrt(2) / m, "y": 1 / m})
    # base weights scale the raw weights before the per-category rescale
    weights2, _ = calibrate(rewards, cats, ["x", "y", "z"], [2.0, 1.0, 1.0])
    assert weights2["a"] == pytest.approx({"x": 1.5, "y": 1.5, "z": 0.0})
    none, _ = calibrate(rewards, cats, ["x", "y", "z"], [2.0, 1.0, 1.0], rule="none")
    assert none == {"a": {"x": 2.0, "y": 1.0, "z": 1.0}, "b": {"x": 2.0, "y": 1.0}}


def test_recipe_file_loads():
    cfg = load_recipe(CurateRecipe, ROOT / "recipes" / "curate.yaml", ["prompts=p.jsonl", "filter.metric=any"])
    assert cfg.prompts == "p.jsonl" and cfg.filter.metric == "any" and cfg.sampling.group_size == 8
    assert [m.name for m in cfg.rewards.models] == [
        "oracle_alignment",
        "oracle_fidelity",
        "oracle_aesthetics",
    ]


def test_equal_spread_calibration_hand_made():
    # one category, two groups of 4; reward a spreads 4x wider than reward b
    a = np.array([[0.0, 0.4, 0.0, 0.4], [0.2, 0.6, 0.2, 0.6]])  # std 0.2 in both groups
    b = a / 4  # std 0.05
    rewards = np.stack([a, b], axis=-1)  # [P, G, K]
    weights, _ = calibrate(rewards, ["x", "x"], ["a", "b"], rule="equal_spread")
    assert weights["x"]["b"] == pytest.approx(4 * weights["x"]["a"], rel=1e-5)
    assert (weights["x"]["a"] + weights["x"]["b"]) / 2 == pytest.approx(1.0, abs=1e-5)
