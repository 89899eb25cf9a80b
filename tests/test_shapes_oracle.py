"""The Shapes oracle: detection, the T2I checklist and edit scoring must be right on known truth."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from qirl.errors import UserError
from qirl.shapes import (
    PILLARS,
    Scene,
    ShapeObject,
    aggregate,
    aggregate_edits,
    detect,
    parse_instruction,
    random_edit_record,
    random_t2i_record,
    render,
    render_batch,
    score_edit,
    score_edit_batch,
    score_t2i,
    score_t2i_batch,
)
from qirl.shapes.checklist import Item, assign
from qirl.shapes.oracle import OracleScore
from qirl.shapes.scene import COLORS

N_T2I = 2000


@pytest.fixture(scope="module")
def t2i():
    """2000 records (1 in 6 creative), their clean 32 px renders, and their scores."""
    rng = np.random.default_rng(0)
    recs = [random_t2i_record(rng, "creative" if i % 6 == 0 else "train") for i in range(N_T2I)]
    images = render_batch([Scene.from_dict(r["scene"]) for r in recs])  # [B, 3, 32, 32]
    prompts = [r["prompt"] for r in recs]
    return recs, images, prompts, score_t2i_batch(images, prompts)


def _items(score: OracleScore, name: str, pillar: str = "Alignment") -> list[int | None]:
    """Values of the items of `pillar` whose name contains `name`."""
    return [i.value for i in score.items if i.pillar == pillar and name in i.name]


# ------------------------------------------------------------------------------------------ detection


def test_detection_recovers_every_object_of_clean_renders(t2i):
    recs, images, _, _ = t2i
    for r, img in zip(recs[:500], images[:500], strict=True):
        scene = Scene.from_dict(r["scene"])
        dets = detect(img.permute(1, 2, 0).numpy())
        assert len(dets) == len(scene.objects)
        for o in scene.objects:
            d = min(dets, key=lambda d: (d.x - o.x) ** 2 + (d.y - o.y) ** 2)
            assert (d.shape, d.color, d.size) == (o.shape, o.color, o.size)
            assert abs(d.x - o.x) < 0.01 and abs(d.y - o.y) < 0.01 and d.confidence > 0.95


def test_detection_works_at_64_px():
    rng = np.random.default_rng(1)
    for _ in range(30):
        scene = Scene.from_dict(random_t2i_record(rng)["scene"])
        dets = detect(render(scene, 64))
        assert sorted((d.shape, d.color, d.size) for d in dets) == sorted((o.shape, o.color, o.size)
                                                                          for o in scene.objects)


@pytest.mark.parametrize(
    "bad",
    [np.zeros((32, 32)), np.zeros((32, 32, 4)), np.zeros((3, 32, 32)), np.zeros((32, 16, 3)),
     np.zeros((32, 32, 3), dtype=np.uint8), np.full((32, 32, 3), np.nan)],
)
def test_wrong_images_raise_user_error(bad):
    with pytest.raises(UserError, match="image"):
        score_t2i(bad, "a red circle")


def test_wrong_batches_raise_user_error():
    with pytest.raises(UserError, match="B, 3, H, W"):
        score_t2i_batch(torch.zeros(2, 32, 32), ["a red circle"] * 2)
    with pytest.raises(UserError, match="prompts"):
        score_t2i_batch(torch.zeros(2, 3, 32, 32), ["a red circle"])
    with pytest.raises(UserError, match="caption"):
        score_t2i(np.zeros((32, 32, 3), dtype=np.float32), "a teal blob")


# --------------------------------------------------------------------------------------- T2I checklist


def test_clean_renders_of_their_own_caption_score_near_100(t2i):
    _, _, _, scores = t2i
    overall = np.array([s.overall for s in scores])
    assert overall.mean() >= 95 and (overall >= 90).mean() >= 0.99
    agg = aggregate(scores)
    assert agg["n"] == N_T2I and agg["Alignment"] >= 95 and agg["Creative Generation"] >= 95


def test_renders_of_another_caption_score_far_lower(t2i):
    _, images, prompts, scores = t2i
    shuffled = score_t2i_batch(images[torch.roll(torch.arange(N_T2I), 1)], prompts)
    agg = aggregate(shuffled)
    assert agg["Alignment"] < 50 and agg["overall"] < aggregate(scores)["overall"] - 25
    # Fidelity is asked per requested object: a clean picture of the wrong thing does not pass it.
    assert agg["Real-world Fidelity"] < 75


def test_not_applicable_items_are_none_and_excluded(t2i):
    recs, _, prompts, scores = t2i
    for r, p, s in zip(recs, prompts, scores, strict=True):
        assert (s.pillars["Creative Generation"] is None) == (r["category"] != "creative")
        named_bg = any(w in p for w in ("black", "white", "gray", "grey"))
        assert (_items(s, "background")[0] is None) == (not named_bg)
        present = [v for v in s.pillars.values() if v is not None]
        assert s.overall == pytest.approx(np.mean(present))
    s = score_t2i(render(Scene((ShapeObject("circle", "red", "small", 0.5, 0.5),), "black")), "a circle")
    assert _items(s, "colour") == [None] and _items(s, "size") == [None] and s.overall == pytest.approx(100)


def test_aggregate_means_images_then_excludes_na_pillars():
    a = OracleScore(50.0, {p: 50.0 for p in PILLARS[:4]} | {PILLARS[4]: None}, [])
    b = OracleScore(90.0, {p: 100.0 for p in PILLARS}, [])
    agg = aggregate([a, b])
    assert agg["overall"] == 70.0 and agg["Quality"] == 75.0 and agg["Creative Generation"] == 100.0
    assert agg["n"] == 2


def test_blank_image_scores_low():
    img = np.zeros((32, 32, 3), dtype=np.float32)
    s = score_t2i(img, "a large red circle on a black background")
    assert s.overall < 40 and s.pillars["Alignment"] < 50 and s.pillars["Real-world Fidelity"] == 0


def test_noise_lowers_quality_and_blur_lowers_fidelity():
    scene = Scene((ShapeObject("square", "blue", "medium", 0.3, 0.3), ShapeObject("circle", "yellow", "small", 0.7,
                                                                                  0.7)), "gray")
    prompt = "a blue square and a yellow circle on a gray background"
    img = render(scene)
    clean = score_t2i(img, prompt)
    noisy = np.clip(img + np.random.default_rng(0).normal(0, 0.1, img.shape), 0, 1).astype(np.float32)
    assert score_t2i(noisy, prompt).pillars["Quality"] < clean.pillars["Quality"] - 30
    t = torch.from_numpy(img).permute(2, 0, 1)[None]  # [1, 3, 32, 32]
    blurred = torch.nn.functional.interpolate(torch.nn.functional.interpolate(t, scale_factor=0.5, mode="bilinear",
                                                                              antialias=True), scale_factor=2,
                                              mode="bilinear")
    b = score_t2i_batch(blurred, [prompt])[0]
    assert b.pillars["Quality"] < clean.pillars["Quality"] and b.pillars["Real-world Fidelity"] < 100


def test_clipped_object_lowers_aesthetics():
    inside = Scene((ShapeObject("circle", "green", "large", 0.5, 0.5),), "black")
    clipped = Scene((ShapeObject("circle", "green", "large", 0.1, 0.5),), "black")
    a, b = score_t2i(render(inside), "a green circle"), score_t2i(render(clipped), "a green circle")
    assert _items(b, "inside_frame", "Aesthetics") == [0] and b.pillars["Aesthetics"] < a.pillars["Aesthetics"] - 20


def test_alignment_catches_wrong_colour_count_relation_and_background():
    base = [ShapeObject("circle", "red", "small", 0.25, 0.5), ShapeObject("square", "blue", "small", 0.75, 0.5)]
    prompt = "a red circle to the left of a blue square on a black background"
    assert score_t2i(render(Scene(tuple(base), "black")), prompt).pillars["Alignment"] == 100
    swapped = Scene((replace(base[0], x=0.75), replace(base[1], x=0.25)), "black")
    assert _items(score_t2i(render(swapped), prompt), "left of") == [0]
    recoloured = Scene((replace(base[0], color="green"), base[1]), "black")
    assert _items(score_t2i(render(recoloured), prompt), "colour") == [0, 2]
    assert _items(score_t2i(render(Scene(tuple(base), "white")), prompt), "background") == [0]
    three = Scene((ShapeObject("circle", "red", "small", 0.2, 0.2), ShapeObject("circle", "red", "small", 0.8, 0.2),
                   ShapeObject("circle", "red", "small", 0.5, 0.8)), "black")
    s = score_t2i(render(three), "two red circles")
    assert _items(s, "count") == [1] and _items(s, "extra object") == [0]


def test_creative_item_needs_the_heldout_pair():
    prompt = "a purple circle"  # held out
    good = score_t2i(render(Scene((ShapeObject("circle", "purple", "medium", 0.5, 0.5),), "black")), prompt)
    fallback = score_t2i(render(Scene((ShapeObject("circle", "blue", "medium", 0.5, 0.5),), "black")), prompt)
    assert good.pillars["Creative Generation"] == 100 and fallback.pillars["Creative Generation"] == 0


def test_assign_finds_the_best_one_to_one_matching():
    sim = np.array([[5.0, 4.0, 0.0], [5.0, 0.0, 0.0]])
    assert assign(sim) == [1, 0]
    assert assign(np.zeros((2, 0))) == [-1, -1]


# --------------------------------------------------------------------------------------------- editing


@pytest.fixture(scope="module")
def edits():
    rng = np.random.default_rng(2)
    recs = [random_edit_record(rng, "creative" if i % 6 == 0 else "train") for i in range(600)]
    src = [render(Scene.from_dict(r["source_scene"])) for r in recs]
    tgt = [render(Scene.from_dict(r["target_scene"])) for r in recs]
    return recs, src, tgt


def test_clean_target_edits_score_full_success_and_preservation(edits):
    recs, src, tgt = edits
    scores = score_edit_batch(src, [r["prompt"] for r in recs], tgt)
    assert min(s.success for s in scores) == 100 and min(s.preservation for s in scores) == 100
    assert aggregate_edits(scores)["overall"] == pytest.approx(100)


def test_unchanged_source_fails_success(edits):
    recs, src, _ = edits
    scores = score_edit_batch(src, [r["prompt"] for r in recs], src)
    assert max(s.success for s in scores) == 0 and max(s.overall for s in scores) == 0


def test_unrelated_change_lowers_preservation(edits):
    recs, src, tgt = edits
    done = 0
    for r, s_img in zip(recs, src, strict=True):
        source, target = Scene.from_dict(r["source_scene"]), Scene.from_dict(r["target_scene"])
        untouched = [i for i, o in enumerate(target.objects) if o in source.objects]
        if not untouched:
            continue
        objs = list(target.objects)
        o = objs[untouched[0]]
        objs[untouched[0]] = replace(o, color=next(c for c in COLORS if c not in (o.color, "red", "orange")))
        spoiled = score_edit(s_img, r["prompt"], render(Scene(tuple(objs), target.background)))
        assert spoiled.preservation < 90, r
        done += 1
        if done == 100:
            break
    assert done == 100


def test_wrong_recolour_gets_partial_success():
    source = Scene((ShapeObject("circle", "red", "medium", 0.3, 0.3), ShapeObject("square", "blue", "small", 0.7,
                                                                                  0.7)), "white")
    wrong = Scene((replace(source.objects[0], color="green"), source.objects[1]), "white")
    s = score_edit(render(source), "make the red circle yellow", render(wrong))
    assert s.success == 60 and s.preservation == 100
    with pytest.raises(UserError, match="instruction"):
        score_edit(render(source), "do something", render(wrong))
    assert parse_instruction("make the red circle yellow").kind == "recolour"


def test_edit_items_are_named_and_graded(edits):
    recs, src, tgt = edits
    s = score_edit(src[0], recs[0]["prompt"], tgt[0])
    assert all(isinstance(i, Item) and i.value in (0, 1, 2, None) for i in s.items)
    assert {i.pillar for i in s.items} >= {"Success", "Preservation", "Quality"}


def test_graded_success_follows_how_far_a_move_went():
    # "move the red circle to the right": full credit at 0.08 along; the item is a step function of it.
    source = Scene((ShapeObject("circle", "red", "medium", 0.3, 0.5), ShapeObject("square", "blue", "small", 0.7,
                                                                                 0.2)), "white")
    graded, items = [], []
    for dx in (0.0, 0.02, 0.05, 0.12):
        moved = Scene((replace(source.objects[0], x=0.3 + dx), source.objects[1]), "white")
        s = score_edit(render(source), "move the red circle to the right", render(moved))
        graded.append(s.graded_success)
        items.append(s.success)
    assert items[0] == 0 and items[-1] == 100
    assert graded[0] < 15 and graded[-1] == 100  # nothing done / past the threshold
    assert graded == sorted(graded) and graded[1] < graded[2] < 100  # rises with the distance
    assert graded[1] > items[1]  # a move short of the first threshold still earns credit


def test_graded_success_agrees_with_the_item_at_the_ends(edits):
    recs, src, tgt = edits
    done = score_edit_batch(src[:60], [r["prompt"] for r in recs[:60]], tgt[:60])
    assert all(s.graded_success == 100 for s in done)  # the clean targets
    kept = score_edit_batch(src[:60], [r["prompt"] for r in recs[:60]], src[:60])
    assert max(s.graded_success for s in kept) < 20  # an unchanged source did (almost) nothing


def test_graded_success_of_a_background_is_the_colour_distance_closed():
    source = Scene((ShapeObject("circle", "red", "medium", 0.3, 0.5),), "white")
    graded = {bg: score_edit(render(source), "make the background black", render(Scene(source.objects, bg)))
              for bg in ("white", "gray", "black")}
    assert [graded[b].success for b in ("white", "gray", "black")] == [0, 0, 100]
    assert [graded[b].graded_success for b in ("white", "gray", "black")] == pytest.approx([0, 50, 100], abs=2)
