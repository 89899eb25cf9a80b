"""Bench scoring: item -> sub-dimension -> pillar, the edit overall, model specs, and the training hook."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qirl.errors import UserError
from qirl.eval.bench import bench_policy, bench_records, paired_change, score_matrix, summarise
from qirl.eval.checklist import ImageScore, edit_image_score, subdimension, t2i_image_score
from qirl.eval.judges import VotePolicy, cast_vote, make_judge
from qirl.eval.models import Sampling, generate_images, parse_model_spec, parse_models
from qirl.shapes import Scene, render_batch, score_t2i
from qirl.shapes.checklist import AESTHETICS, ALIGNMENT, CREATIVE, FIDELITY, QUALITY, Item
from qirl.shapes.edit_oracle import PRESERVATION, SUCCESS, EditScore
from qirl.shapes.oracle import OracleScore

KNOWN_SUBDIMS = {
    QUALITY: {"no stray marks", "palette colours", "clean background", "sharp edges"},
    AESTHETICS: {"inside frame", "contrast", "spacing", "object scale"},
    ALIGNMENT: {"shape", "colour", "size", "position", "count", "relation", "extra objects", "background"},
    FIDELITY: {"geometry", "clear shape", "intact objects"},
    CREATIVE: {"novel combination"},
}


@pytest.fixture(scope="module")
def policy():
    from qirl.models.registry import load_policy

    return load_policy("base")


def test_every_oracle_item_has_a_known_subdimension():
    """Ground-truth renders of the held-out prompts: every item maps to one of the documented groups."""
    records = bench_records("t2i")
    scenes = [Scene.from_dict(r.extra["scene"]) for r in records]
    images = render_batch(scenes, 32).permute(0, 2, 3, 1).numpy()  # [N, 32, 32, 3]
    for image, rec in zip(images, records, strict=True):
        score = score_t2i(image, rec.prompt)
        for item in score.items:
            assert subdimension(item) in KNOWN_SUBDIMS[item.pillar], item
        bench = t2i_image_score(score)
        assert bench.native == score.overall
        assert 0 <= bench.overall <= 100


def test_subdimension_level_changes_the_weights_by_hand():
    items = [
        Item(ALIGNMENT, "red circle#1: shape", 2), Item(ALIGNMENT, "blue square#1: shape", 2),
        Item(ALIGNMENT, "red circle#1: colour", 2), Item(ALIGNMENT, "blue square#1: colour", 2),
        Item(ALIGNMENT, "red circle left of blue square", 0),
        Item(ALIGNMENT, "extra object: small green circle", 0), Item(ALIGNMENT, "extra object: large red square", 0),
        Item(ALIGNMENT, "background", None),
        Item(QUALITY, "no_stray_marks", 1),
        Item(CREATIVE, "novel combination", None),
    ]
    s = t2i_image_score(OracleScore(0.0, {}, items))
    # shape 100, colour 100, relation 0, extra objects 0 -> 50 (item level would be 400 / 7 = 57.1).
    assert s.pillars[ALIGNMENT] == pytest.approx(50.0)
    assert s.subdims[ALIGNMENT] == {"shape": 100.0, "colour": 100.0, "relation": 0.0, "extra objects": 0.0,
                                    "background": None}
    assert s.pillars[QUALITY] == 60.0 and s.pillars[CREATIVE] is None and s.pillars[FIDELITY] is None
    assert s.overall == pytest.approx((50.0 + 60.0) / 2)  # mean of the pillars that apply


def test_edit_overall_is_sqrt_success_times_quality():
    items = [
        Item(SUCCESS, "recolour", 1),  # 60
        Item(PRESERVATION, "keep red circle#1", 2), Item(PRESERVATION, "keep blue square#2", 0),  # objects 50
        Item(PRESERVATION, "background", 2),  # 100
        Item(PRESERVATION, "no_new_objects", 2),  # 100
        Item(QUALITY, "no_stray_marks", 2), Item(QUALITY, "sharp_edges", 1),  # Quality 80
        Item(FIDELITY, "regular_geometry", 1), Item(FIDELITY, "intact_objects", 1),  # Fidelity 60
    ]
    s = edit_image_score(EditScore(12.3, 0, 0, 0, items))
    assert s.pillars == {"Success": 60.0, "Preservation": pytest.approx(250 / 3), "Quality": 70.0}
    assert s.overall == pytest.approx(math.sqrt(60.0 * 70.0))
    assert s.native == 12.3  # the oracle's own geometric mean, kept for arenas


def test_summarise_means_intervals_and_na():
    scores = [ImageScore(o, {"A": a, "B": None}) for o, a in ((10, 20), (30, None), (50, 60), (70, 80))]
    jobs = [(0, 0), (0, 1), (1, 0), (1, 1)]
    r = summarise(scores, jobs, ["A", "B"], n_boot=100)
    assert r["overall"] == 40.0 and r["pillars"]["A"] == pytest.approx(160 / 3, abs=0.01)
    assert r["pillars"]["B"] is None and r["pillars_ci"]["B"] is None
    lo, hi = r["overall_ci"]
    assert 20.0 <= lo <= 40.0 <= hi <= 60.0  # per-prompt means are 20 and 60
    assert (r["images"], r["prompts"], r["seeds"]) == (4, 2, 2)


def test_paired_change_cancels_prompt_difficulty():
    # Two prompts of very different difficulty; the model gains exactly 5 on every image but one N/A.
    jobs = [(0, 0), (0, 1), (1, 0), (1, 1)]
    base = score_matrix([10, 14, 90, 86], jobs)  # [P, S]
    model = score_matrix([15, 19, 95, None], jobs)
    assert base.tolist() == [[10, 14], [90, 86]] and np.isnan(model[1, 1])
    c = paired_change(model, base, n_boot=200)
    assert c["change"] == 5.0 and c["change_ci"] == [5.0, 5.0]  # constant differences: no spread
    lo, hi = summarise([ImageScore(v, {}) for v in (15, 19, 95, 0)], jobs, [], n_boot=200)["overall_ci"]
    assert hi - lo > 30  # while each model's own interval spans the prompts' difficulty


def test_model_specs():
    s = parse_model_spec("cfg1=base@guidance=1@steps=8", Sampling(steps=20, guidance=3.0))
    assert (s.label, s.path, s.sampling) == ("cfg1", "base", Sampling(steps=8, guidance=1.0, shift=1.0))
    assert parse_model_spec("runs/rl").label == "runs/rl"
    assert [m.label for m in parse_models(["base,b=base@guidance=1", "c=base"])] == ["base", "b", "c"]
    for bad, needle in (("base@cfg=1", "must be one of"), ("base@steps=x", "must be a number"),
                        ("=base", "empty model name"), ("base@steps=0", "steps must be")):
        with pytest.raises(UserError, match=needle):
            parse_model_spec(bad)
    with pytest.raises(UserError, match="given twice"):
        parse_models(["base,base"])


def test_same_noise_per_prompt_and_seed_whatever_the_batch(policy):
    records = bench_records("t2i", n_prompts=3)
    opts = Sampling(steps=2)
    full = generate_images(policy, records, [(0, 0), (1, 0), (2, 1)], opts, batch_size=3)  # [3, 3, 32, 32]
    one = generate_images(policy, records, [(2, 1)], opts, batch_size=1)  # [1, 3, 32, 32]
    torch.testing.assert_close(full[2], one[0])
    assert not torch.equal(full[0], generate_images(policy, records, [(0, 1)], opts)[0])  # another seed


def test_bench_policy_hook(policy):
    policy.train()
    r = bench_policy(policy, "t2i", n_prompts=3, seeds=[0], sampling=Sampling(steps=3), n_boot=20)
    assert policy.training  # given back in the mode it had
    policy.eval()
    assert set(r["pillars"]) == set(KNOWN_SUBDIMS) and r["images"] == 3
    assert 0 <= r["overall"] <= 100 and r["overall_ci"][0] <= r["overall"] <= r["overall_ci"][1]
    e = bench_policy(policy, "edit", n_prompts=2, seeds=1, sampling=Sampling(steps=3))
    assert list(e["pillars"]) == ["Success", "Preservation", "Quality"] and e["images"] == 2
    # A reward model as judge: one pillar per reward, scaled to 0-100.
    j = bench_policy(policy, "t2i", n_prompts=2, seeds=1, judge=make_judge(["oracle_alignment"]),
                     sampling=Sampling(steps=3))
    assert list(j["pillars"]) == ["oracle_alignment"] and 0 <= j["overall"] <= 100


def test_bench_policy_rejects_bad_task(policy):
    with pytest.raises(UserError, match="task must be"):
        bench_policy(policy, "video")


def test_votes_from_scores():
    quiet = VotePolicy(noise=0.0, tie_margin=2.0)
    assert cast_vote(50.0, 40.0, quiet, None) == "a"
    assert cast_vote(40.0, 50.0, quiet, None) == "b"
    assert cast_vote(50.0, 49.0, quiet, None) == "tie"
    assert cast_vote(float("nan"), 10.0, quiet, None) == "b"
    noisy = VotePolicy(noise=8.0, tie_margin=2.0)
    rng = np.random.default_rng(0)
    wins = [cast_vote(55.0, 45.0, noisy, rng) for _ in range(2000)]
    # Perceived difference ~ N(10, 8^2 * 2): P(a) = P(d > 2) = Phi(8 / 11.31) = 0.76.
    assert wins.count("a") / 2000 == pytest.approx(0.76, abs=0.03)
