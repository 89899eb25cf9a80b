"""Synthetic annotations: exact schema, Likert labels that track the oracle, the report's pairwise priority
order, ties, disjoint test prompts, determinism, and no half-written folder after a failure."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from qirl.errors import UserError
from qirl.models.registry import load_policy
from qirl.rewards.annotate import (
    PAIRWISE_FEATURES,
    POINTWISE_FEATURES,
    AnnotateConfig,
    annotate,
    likert,
    noisy_likert,
    prefer,
)
from qirl.shapes import Scene, random_t2i_record
from qirl.shapes.checklist import ALIGNMENT, FIDELITY, QUALITY, Item
from qirl.shapes.edit_oracle import PRESERVATION, SUCCESS
from qirl.shapes.judge import LEVELS, Truth, judge_t2i, reasons_from_items
from qirl.shapes.perturb import perturb
from qirl.stats import rankdata, spearman

SPLITS = ("pointwise", "pointwise_test", "pairwise", "pairwise_test")
# The contract with the reward-model trainer, spelled out so that a change to the constants fails here.
POINTWISE_SCHEMA = {
    "image": "Image", "prompt": "string", "task": "string", "category": "string", "source_image": "Image",
    "quality": "int32", "fidelity": "int32", "alignment": "int32", "oracle": "float32",
    "reasons": "list<string>",
}
PAIRWISE_SCHEMA = {
    "prompt": "string", "task": "string", "category": "string", "image_a": "Image", "image_b": "Image",
    "source_image": "Image", "label": "float32", "reason": "string", "oracle_a": "float32",
    "oracle_b": "float32", "valid": "bool", "text_distortion": "bool", "figure_distortion": "bool",
}

# Model samples at tiny step counts (the pool's content, not its quality, is under test here).
MODEL = dict(n_prompts=8, samples_per_prompt=4, perturbed_fraction=0.5, guidance=[1.0, 2.0], steps=[2, 3],
             pairs_per_prompt=6, test_fraction=0.25, edit_fraction=0.4, seed=3)
# Render-only pools: fast, and 9 slots make every T2I pool hold the clean render twice (a cycle of 8).
RENDERS = dict(n_prompts=24, samples_per_prompt=9, perturbed_fraction=1.0, pairs_per_prompt=36, seed=5)
NOISELESS = dict(likert_noise=0.0, slip_rate=0.0, flip_rate=0.0)


def _run(out: Path, **kw) -> datasets.DatasetDict:
    events = list(annotate(AnnotateConfig(out_dir=str(out), **kw)))
    assert events[-1]["done"] and all("step" in e and "total" in e for e in events[:-1])
    return datasets.load_from_disk(str(out))


def _raw(ds: datasets.Dataset, *columns: str) -> datasets.Dataset:
    """The image columns as stored PNG bytes, to compare images exactly."""
    for c in columns:
        ds = ds.cast_column(c, datasets.Image(decode=False))
    return ds


def _both(dd: datasets.DatasetDict, kind: str) -> datasets.Dataset:
    return datasets.concatenate_datasets([dd[kind], dd[f"{kind}_test"]])


def _kind(feature) -> str:
    if isinstance(feature, datasets.Image):
        return "Image"
    if isinstance(feature, datasets.List):
        return f"list<{feature.feature.dtype}>"
    return feature.dtype


@pytest.fixture(scope="module")
def model_run(tmp_path_factory) -> tuple[Path, datasets.DatasetDict]:
    out = tmp_path_factory.mktemp("ann") / "model"
    return out, _run(out, **MODEL)


@pytest.fixture(scope="module")
def render_runs(tmp_path_factory) -> dict[str, datasets.DatasetDict]:
    base = tmp_path_factory.mktemp("ann")
    return {
        "noisy": _run(base / "noisy", **RENDERS),
        "clean": _run(base / "clean", **RENDERS, **NOISELESS),
        "flipped": _run(base / "flipped", **RENDERS, **{**NOISELESS, "flip_rate": 1.0}),
    }


# ------------------------------------------------------------------------------------------ schema


def test_schema_and_dtypes(model_run):
    out, dd = model_run
    assert tuple(dd) == SPLITS
    for name in SPLITS:
        ds = dd[name]
        want = POINTWISE_SCHEMA if name.startswith("pointwise") else PAIRWISE_SCHEMA
        assert {k: _kind(f) for k, f in ds.features.items()} == want
        assert ds.features == (POINTWISE_FEATURES if name.startswith("pointwise") else PAIRWISE_FEATURES)
        assert len(ds) > 0
    pw = dd["pointwise"]
    for row in pw:
        assert row["image"].mode == "RGB" and row["image"].size == (32, 32)
        assert row["task"] in ("t2i", "edit")
        assert (row["source_image"] is None) == (row["task"] == "t2i")
        assert all(1 <= row[d] <= 5 for d in ("quality", "fidelity", "alignment"))
        assert 0.0 <= row["oracle"] <= 100.0
        assert all(isinstance(r, str) and r for r in row["reasons"])
    pairs = dd["pairwise"]
    assert set(pairs["label"]) <= {0.0, 0.5, 1.0}
    assert set(pairs["reason"]) <= {*LEVELS, "tie"}
    assert not any(pairs["text_distortion"])  # Shapes images hold no text
    for row in pairs:
        assert (row["label"] == 0.5) == (row["reason"] == "tie")
        assert (row["source_image"] is None) == (row["task"] == "t2i")
    summary = json.loads((out / "annotations.json").read_text())
    assert summary["counts"]["pointwise"] == len(pw)
    assert summary["counts"]["pairwise_test"] == len(dd["pairwise_test"])
    assert set(summary) >= {"likert", "pairwise", "noise", "agreement", "pool", "seconds", "config"}


def test_one_pool_behind_both_sets_and_disjoint_test_prompts(model_run):
    _, dd = model_run
    for point, pair in (("pointwise", "pairwise"), ("pointwise_test", "pairwise_test")):
        pool: dict[str, set[bytes]] = {}
        for row in _raw(dd[point], "image"):
            pool.setdefault(row["prompt"], set()).add(row["image"]["bytes"])
        for row in _raw(dd[pair], "image_a", "image_b"):
            assert {row["image_a"]["bytes"], row["image_b"]["bytes"]} <= pool[row["prompt"]]
        counts = {p: list(dd[point]["prompt"]).count(p) for p in pool}
        assert set(counts.values()) == {MODEL["samples_per_prompt"]}
    train = set(dd["pointwise"]["prompt"]) | set(dd["pairwise"]["prompt"])
    test = set(dd["pointwise_test"]["prompt"]) | set(dd["pairwise_test"]["prompt"])
    assert train and test and not train & test
    assert len(test) == round(MODEL["test_fraction"] * MODEL["n_prompts"])


def test_deterministic_given_seed(model_run, tmp_path):
    _, first = model_run
    again = _run(tmp_path / "again", **MODEL)
    for name in SPLITS:
        a, b = first[name].with_format("arrow")[:], again[name].with_format("arrow")[:]
        assert a.equals(b), name
    other = _run(tmp_path / "other", **{**MODEL, "seed": 4})
    assert other["pointwise"]["prompt"] != first["pointwise"]["prompt"]


def test_sde_pool_is_grpo_like_and_deterministic(model_run, tmp_path):
    """`noise_level > 0` samples the pool as GRPO rolls out (SDE steps on the window): different images
    from the ODE pool, the same ones again for the same seed. (Noises are drawn per image, but a
    different batch size can still flip a rounding in the 8-bit images, as in the ODE pool.)"""
    _, ode = model_run
    kw = {**MODEL, "noise_level": 0.7, "sde_window": 2}
    sde = _run(tmp_path / "sde", **kw)
    again = _run(tmp_path / "sde_again", **kw)
    for name in SPLITS:
        assert sde[name].with_format("arrow")[:].equals(again[name].with_format("arrow")[:]), name
    images = lambda ds: [row["bytes"] for row in _raw(ds["pointwise"], "image")["image"]]  # noqa: E731
    assert images(sde) != images(ode)
    stats = json.loads((tmp_path / "sde" / "annotations.json").read_text())["pool"]
    assert all("sde=0.7" in o for o in stats["by_origin"] if o.startswith("model"))
    # shared_noise: a prompt's samples start from one noise (a GRPO group): still distinct images
    shared = _run(tmp_path / "shared", **{**kw, "shared_noise": True})
    assert images(shared) != images(sde) and len(set(images(shared))) > len(images(shared)) // 2
    with pytest.raises(UserError, match="shared_noise needs noise_level"):
        AnnotateConfig(shared_noise=True).validate()


def test_a_pool_from_several_models_splits_the_slots(model_run, tmp_path):
    """`model=a,b`: slot k of a prompt from model k mod 2, each with the noise and sampler settings the
    slot has in a one-model pool, so base,base is the base pool exactly."""
    out, first = model_run
    twice = _run(tmp_path / "twice", **{**MODEL, "model": "base, base"})
    for name in SPLITS:
        assert first[name].with_format("arrow")[:].equals(twice[name].with_format("arrow")[:]), name
    stats = json.loads((tmp_path / "twice" / "annotations.json").read_text())["pool"]
    assert stats["models"] == {"model 0": "base", "model 1": "base"}
    assert {o.split(" g=")[0] for o in stats["by_origin"] if o.startswith("model")} == {"model 0", "model 1"}
    # a second model that differs: its slots change, so the pool is no longer the base pool
    other = load_policy("base")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    other.save_pretrained(tmp_path / "other_model")
    mixed = _run(tmp_path / "mixed", **{**MODEL, "model": f"base,{tmp_path / 'other_model'}"})
    base_images = {row["bytes"] for row in _raw(first["pointwise"], "image")["image"]}
    mixed_images = {row["bytes"] for row in _raw(mixed["pointwise"], "image")["image"]}
    assert mixed_images != base_images  # model 1's slots are its own samples
    with pytest.raises(UserError, match="no policy named"):
        next(annotate(AnnotateConfig(out_dir=str(tmp_path / "none"), model=" , ")))


# ------------------------------------------------------------------------------------------ labels


def test_likert_cut_points_and_noise_range():
    scores = (0, 24.9, 25, 49.9, 50, 74.9, 75, 94.9, 95, 100)
    assert [likert(s) for s in scores] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    rng = np.random.default_rng(0)
    labels = [noisy_likert(s, rng, 30.0, 0.5) for s in np.linspace(0, 100, 400)]
    assert set(labels) == {1, 2, 3, 4, 5}
    assert [noisy_likert(s, rng, 0.0, 0.0) for s in (10, 60, 100)] == [1, 3, 5]


def test_spearman_with_numpy_ranks():
    assert rankdata([10, 20, 20, 30]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    x, y = [1, 2, 2, 3, 5], [2, 1, 4, 4, 9]
    rx, ry = rankdata(x), rankdata(y)
    assert spearman(x, y) == pytest.approx(np.corrcoef(rx, ry)[0, 1])
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_likert_labels_track_the_oracle(render_runs):
    def rho(ds):
        total = np.add(np.add(ds["quality"], ds["fidelity"]), ds["alignment"])
        return spearman(total, ds["oracle"])

    clean, noisy = _both(render_runs["clean"], "pointwise"), _both(render_runs["noisy"], "pointwise")
    assert clean["oracle"] == noisy["oracle"]  # same pool: only the annotators differ
    assert rho(clean) > 0.7
    assert 0.0 < rho(noisy) < rho(clean)
    for dim in ("quality", "fidelity", "alignment"):
        assert spearman(clean[dim], clean["oracle"]) > 0.3
        agree = np.mean(np.equal(clean[dim], noisy[dim]))
        assert 0.5 < agree < 1.0


def _judged(rec: dict, kind: str, seed: int = 0) -> Truth:
    img = perturb(Scene.from_dict(rec["scene"]), kind, 32, np.random.default_rng(seed))
    return judge_t2i((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8) / np.float32(255), rec["prompt"])


def test_reasons_read_like_an_annotator():
    items = [
        Item(ALIGNMENT, "2 purple triangles#1: shape", 0), Item(ALIGNMENT, "2 purple triangles#1: colour", 0),
        Item(FIDELITY, "2 purple triangles#1: geometry", 0),  # unmatched: part of "missing", not a reason
        Item(ALIGNMENT, "2 purple triangles#2: shape", 2), Item(ALIGNMENT, "2 purple triangles#2: size", 1),
        Item(FIDELITY, "2 purple triangles#2: geometry", 1), Item(ALIGNMENT, "2 purple triangles: count", 1),
        Item(ALIGNMENT, "2 purple triangles left of red circle", 0), Item(QUALITY, "sharp_edges", 0),
        Item(ALIGNMENT, "no_extra_objects", 2), Item(ALIGNMENT, "background", None),
    ]
    assert reasons_from_items(items) == [
        "one of the two purple triangles is missing",
        "one of the two purple triangles is slightly the wrong size",
        "the count is off by one: expected two purple triangles",
        "the two purple triangles are not left of the red circle",
        "one of the two purple triangles is slightly malformed",  # distortion after consistency
        "edges are blurry",
    ]
    edit = [Item(SUCCESS, "move", 0), Item(PRESERVATION, "moved red circle: rest kept", 1),
            Item(PRESERVATION, "new object #1", 0), Item(PRESERVATION, "new object #2", 0)]
    assert reasons_from_items(edit) == [
        "the object was not moved", "the edited red circle drifted slightly beyond the edit",
        "an unrequested object appeared",
    ]


def test_priority_order_on_constructed_scores():
    t = Truth(consistency=90, distortion=50, texture=40, aesthetics=30, overall=0, valid=True,
              figure_distortion=False)
    worse_consistency = replace(t, consistency=70, distortion=100, texture=100, aesthetics=100)
    assert prefer(t, worse_consistency, 5.0) == (1.0, "consistency")
    assert prefer(worse_consistency, t, 5.0) == (0.0, "consistency")
    close = replace(t, consistency=88, distortion=60, texture=0, aesthetics=0)  # consistency: within 5
    assert prefer(t, close, 5.0) == (0.0, "distortion")
    assert prefer(t, replace(t, distortion=52, texture=30, aesthetics=100), 5.0) == (1.0, "texture")
    assert prefer(t, replace(t, texture=43, aesthetics=60), 5.0) == (0.0, "aesthetics")
    within = replace(t, consistency=94, distortion=46, texture=44, aesthetics=26)
    assert prefer(t, within, 5.0) == (0.5, "tie")


def test_consistency_beats_texture_on_real_images():
    rec = random_t2i_record(np.random.default_rng(7), category="multi")
    noisy, missing = _judged(rec, "noise", seed=1), _judged(rec, "missing_object")
    assert noisy.texture < missing.texture  # texture favours the clean picture of the wrong thing ...
    assert noisy.consistency > missing.consistency  # ... but the noisy one shows what was asked
    assert prefer(noisy, missing, 5.0) == (1.0, "consistency")
    assert any(r.endswith("is missing") for r in missing.reasons)
    assert any("background" in r or "stray" in r or "edges" in r for r in noisy.reasons)
    blurred = _judged(rec, "blur")
    assert any("edges" in r for r in blurred.reasons)


def test_identical_images_tie_and_flips_follow_the_noiseless_labels(render_runs):
    clean, flipped = render_runs["clean"]["pairwise"], render_runs["flipped"]["pairwise"]
    same = [row["image_a"]["bytes"] == row["image_b"]["bytes"] for row in _raw(flipped, "image_a", "image_b")]
    assert sum(same) > 0  # every T2I pool holds the clean render twice
    for s, lc, lf, rf in zip(same, clean["label"], flipped["label"], flipped["reason"], strict=True):
        if s:
            assert lf == 0.5 and rf == "tie"  # even an annotator who flips every label
        assert lf == (0.5 if lc == 0.5 else 1.0 - lc)
    assert clean["reason"] == flipped["reason"]
    assert 0.0 < np.mean(np.equal(clean["label"], 0.5)) < 0.5


def test_pairwise_priority_in_the_dataset(render_runs):
    """Re-judging the stored pair images reproduces every noiseless label and its deciding level."""
    ds = render_runs["clean"]["pairwise"].filter(lambda r: r["task"] == "t2i").select(range(40))
    for row in ds:
        a, b = (judge_t2i(np.asarray(row[k], np.float32) / 255, row["prompt"])
                for k in ("image_a", "image_b"))
        assert prefer(a, b, 5.0) == (row["label"], row["reason"])
        assert row["oracle_a"] == pytest.approx(a.overall, abs=1e-3)
        assert row["valid"] == (a.valid and b.valid) and row["figure_distortion"] == (
            a.figure_distortion or b.figure_distortion)


# ------------------------------------------------------------------------------------------ files


def test_no_partial_folder_after_a_failure(model_run, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "ann"
    shutil.copytree(model_run[0], out)
    before = sorted(p.name for p in out.iterdir())

    def boom(self, path, *args, **kwargs):
        (Path(path) / "half.arrow").write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        list(annotate(AnnotateConfig(out_dir=str(out), **{**RENDERS, "n_prompts": 3})))
    assert sorted(p.name for p in out.iterdir()) == before  # the previous dataset is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["ann"]  # no temporary folder left behind
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError):
        list(annotate(AnnotateConfig(out_dir=str(fresh), **{**RENDERS, "n_prompts": 3})))
    assert not fresh.exists() and [p.name for p in tmp_path.iterdir()] == ["ann"]


def test_stopping_early_leaves_nothing(tmp_path):
    stream = annotate(AnnotateConfig(out_dir=str(tmp_path / "ann"), **{**RENDERS, "n_prompts": 3}))
    assert next(stream)["step"] > 0
    stream.close()
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_a_foreign_folder_and_bad_config(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an annotation folder"):
        next(annotate(AnnotateConfig(out_dir=str(tmp_path / "mine"))))
    for bad in ({"n_prompts": 1}, {"perturbed_fraction": 1.5}, {"test_fraction": 0.0}, {"steps": []}):
        with pytest.raises(UserError):
            AnnotateConfig(**bad).validate()


def test_mismatched_captions_rate_the_same_images_against_other_prompts(tmp_path):
    """`qirl score mismatch`: same image bytes, another prompt of the same split, the oracle's verdict
    against that prompt (so a clean render loses alignment), schema kept, written atomically."""
    from qirl.rewards.mismatch import mismatch
    from qirl.rewards.vlm.data import load_annotations

    src = tmp_path / "src"
    orig = _run(src, **{**RENDERS, **NOISELESS, "edit_fraction": 0.0, "test_fraction": 0.25})
    summary = mismatch(src, tmp_path / "mm", fraction=1.0, seed=1, likert_noise=0.0, slip_rate=0.0)
    mm = datasets.load_from_disk(str(tmp_path / "mm"))
    assert set(mm) == {"pointwise", "pointwise_test"}
    assert {n: len(mm[n]) for n in mm} == summary["counts"] == {n: len(orig[n]) for n in mm}
    for name in mm:
        assert {k: str(v) for k, v in mm[name].features.items()} == {
            k: str(v) for k, v in orig[name].features.items()}
        by_bytes = {r["bytes"]: p for r, p in zip(_raw(orig[name], "image")["image"], orig[name]["prompt"], strict=True)}
        rows = zip(_raw(mm[name], "image")["image"], mm[name]["prompt"], mm[name]["oracle"], strict=True)
        for img, prompt, oracle in rows:
            assert prompt != by_bytes[img["bytes"]] and prompt in set(orig[name]["prompt"])
            pixels = np.asarray(Image.open(io.BytesIO(img["bytes"])).convert("RGB"), np.float32) / 255.0
            assert oracle == pytest.approx(judge_t2i(pixels, prompt).overall)
    # Another prompt's clean scene is rated lower on alignment than the clean scene of its own prompt.
    own = [a for a, o in zip(orig["pointwise"]["alignment"], orig["pointwise"]["oracle"], strict=True) if o == 100.0]
    assert np.mean(mm["pointwise"]["alignment"]) < np.mean(own)
    # the round adds to the source as one more data.path entry
    union = load_annotations(f"{src},{tmp_path / 'mm'}")
    assert len(union["pointwise"]) == 2 * len(orig["pointwise"])
    with pytest.raises(UserError, match="fraction"):
        mismatch(src, tmp_path / "bad", fraction=0.0)
    assert not (tmp_path / "bad").exists()
