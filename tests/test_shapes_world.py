"""The Shapes world's generators: scenes, rendering, captions and edit instructions."""

from __future__ import annotations

import itertools
import json
import time

import numpy as np
import pytest
import torch

from qirl.errors import UserError
from qirl.shapes import (
    BACKGROUNDS,
    CATEGORIES,
    COLORS,
    EDIT_KINDS,
    HELDOUT,
    SHAPES,
    CaptionSpec,
    EditSpec,
    ObjectRef,
    ObjectSpec,
    RelationSpec,
    Scene,
    ShapeObject,
    apply_edit,
    make_caption,
    parse_caption,
    parse_instruction,
    random_edit_record,
    random_scene,
    random_t2i_record,
    render,
    render_batch,
    spec_matches_scene,
)
from qirl.shapes.edits import instruction_text
from qirl.shapes.render import render_shape_labels
from qirl.shapes.scene import SIZES, is_valid, position_margin


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------------------- vocabulary


def test_palette_is_well_separated():
    cols = np.array(list(COLORS.values()))
    bgs = np.array(list(BACKGROUNDS.values()))
    pair = np.linalg.norm(cols[:, None] - cols[None], axis=-1)
    assert pair[~np.eye(len(cols), dtype=bool)].min() > 0.35
    assert np.linalg.norm(cols[:, None] - bgs[None], axis=-1).min() > 0.45
    assert 6 <= len(COLORS) <= 8 and {"circle", "square", "triangle"} <= set(SHAPES)
    assert SIZES["small"] * 32 >= 4.0


def test_heldout_is_about_a_sixth_and_leaves_every_shape_and_colour_in_training():
    pairs = set(itertools.product(SHAPES, COLORS))
    assert HELDOUT <= pairs
    assert 0.12 <= len(HELDOUT) / len(pairs) <= 0.22
    train = pairs - HELDOUT
    assert {s for s, _ in train} == set(SHAPES) and {c for _, c in train} == set(COLORS)


# ---------------------------------------------------------------------------------------------- scenes


def test_random_scenes_are_valid_and_respect_splits():
    rng = _rng(1)
    for _ in range(1500):
        s = random_scene(rng)
        assert 1 <= len(s.objects) <= 4 and is_valid(s)
        assert not any((o.shape, o.color) in HELDOUT for o in s.objects)
    for _ in range(300):
        s = random_scene(rng, split="creative")
        assert is_valid(s) and any((o.shape, o.color) in HELDOUT for o in s.objects)
    assert len(random_scene(rng, 4).objects) == 4
    with pytest.raises(UserError):
        random_scene(rng, 5)
    with pytest.raises(UserError):
        random_scene(rng, split="test")


def test_random_scene_is_deterministic_given_the_generator():
    assert [random_scene(_rng(7)) for _ in range(3)] == [random_scene(_rng(7)) for _ in range(3)]


def test_scene_dict_round_trip_through_json():
    rng = _rng(2)
    for _ in range(200):
        s = random_scene(rng)
        assert Scene.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    with pytest.raises(UserError, match="unknown colour"):
        Scene.from_dict({"background": "black", "objects": [{"shape": "circle", "color": "teal", "size": "small",
                                                             "x": 0.5, "y": 0.5}]})
    with pytest.raises(UserError, match="malformed"):
        Scene.from_dict({"objects": []})


# ------------------------------------------------------------------------------------------- rendering


def test_render_is_deterministic_float32_in_range():
    scenes = [random_scene(_rng(3)) for _ in range(8)]
    a, b = render_batch(scenes), render_batch(scenes)
    assert a.shape == (8, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
    one = render(scenes[0])
    assert one.shape == (32, 32, 3) and one.dtype == np.float32
    np.testing.assert_array_equal(one, a[0].permute(1, 2, 0).numpy())
    assert render(scenes[0], 64).shape == (64, 64, 3)
    with pytest.raises(UserError):
        render(scenes[0], 4)


def test_render_is_anti_aliased_between_object_and_background():
    scene = Scene((ShapeObject("circle", "red", "large", 0.5, 0.5),), "black")
    img = render(scene)  # [32, 32, 3]
    red = np.array(COLORS["red"], dtype=np.float32)
    alpha = (img @ red) / (red @ red)  # [32, 32] coverage along the black -> red line
    partial = (alpha > 0.05) & (alpha < 0.95)
    assert partial.sum() >= 20  # a ring of edge pixels
    np.testing.assert_allclose(img[partial], alpha[partial, None] * red, atol=1e-5)  # exact mixes
    area = alpha.sum() / 32**2
    assert abs(area - np.pi * SIZES["large"] ** 2) < 0.01


def test_shape_labels_mark_the_pixels_each_object_mostly_covers():
    scene = Scene(
        (ShapeObject("triangle", "red", "large", 0.3, 0.3), ShapeObject("square", "blue", "small", 0.75, 0.7)),
        "black",
    )
    labels = render_shape_labels([scene, Scene((), "white")])  # [2, 32, 32]
    assert labels.shape == (2, 32, 32) and labels.dtype == torch.int64
    assert set(labels[0].unique().tolist()) == {0, 1 + SHAPES.index("triangle"), 1 + SHAPES.index("square")}
    assert not labels[1].any()  # no object: all background
    img = render(scene)  # [32, 32, 3]
    for obj in scene.objects:
        colour = np.array(COLORS[obj.color], dtype=np.float32)
        alpha = (img @ colour) / (colour @ colour)  # coverage along black -> the object's colour
        mine = (labels[0] == 1 + SHAPES.index(obj.shape)).numpy()
        near = np.abs(img - colour).sum(-1) < 1.0  # pixels of this object's colour, not the other's
        np.testing.assert_array_equal(mine, near & (alpha >= 0.5 - 1e-6))


def test_render_batch_is_fast():
    scenes = [random_scene(_rng(4)) for _ in range(1000)]
    t0 = time.perf_counter()
    render_batch(scenes)
    assert time.perf_counter() - t0 < 3.0  # ~0.2 s on one laptop core; generous for shared CI


# -------------------------------------------------------------------------------------------- captions


def test_caption_round_trip_for_thousands_of_records():
    rng = _rng(5)
    seen = set()
    for i in range(3000):
        split = "creative" if i % 6 == 0 else "train"
        r = random_t2i_record(rng, split)
        assert r["task"] == "t2i" and r["category"] in CATEGORIES
        spec, scene = parse_caption(r["prompt"]), Scene.from_dict(r["scene"])
        assert spec_matches_scene(spec, scene), r
        assert bool(spec.heldout) == (split == "creative")
        seen.add(r["category"])
    assert seen == set(CATEGORIES)


def test_make_caption_describes_any_scene_in_every_style():
    rng = _rng(6)
    for _ in range(1000):
        scene = random_scene(rng)
        for category in (None, "multi", "spatial", "attribute") if len(scene.objects) > 1 else (None, "single"):
            assert spec_matches_scene(parse_caption(make_caption(scene, rng, category)), scene)
    with pytest.raises(UserError, match="single"):
        make_caption(random_scene(rng, 3), rng, "single")
    with pytest.raises(UserError, match="creative"):
        make_caption(random_scene(rng, 2), rng, "creative")
    with pytest.raises(UserError):
        random_t2i_record(rng, "train", "creative")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a red circle", CaptionSpec((ObjectSpec("circle", "red"),))),
        ("One small violet disc on a grey background.",
         CaptionSpec((ObjectSpec("circle", "purple", "small"),), (), "gray")),
        ("an image of a circle that is red, against black", CaptionSpec((ObjectSpec("circle", "red"),), (), "black")),
        ("a big square in turquoise with a white background",
         CaptionSpec((ObjectSpec("square", "cyan", "large"),), (), "white")),
        ("a picture of two blue squares and a rhombus coloured orange",
         CaptionSpec((ObjectSpec("square", "blue", None, 2), ObjectSpec("diamond", "orange")))),
        ("there are three little green triangles. The background is black",
         CaptionSpec((ObjectSpec("triangle", "green", "small", 3),), (), "black")),
        ("a yellow triangle that is medium-sized at the top left",
         CaptionSpec((ObjectSpec("triangle", "yellow", "medium", 1, "top left"),))),
        ("a red circle to the left of a blue square, and a green diamond beneath the blue square",
         CaptionSpec((ObjectSpec("circle", "red"), ObjectSpec("square", "blue"), ObjectSpec("diamond", "green")),
                     (RelationSpec(0, "left of", 1), RelationSpec(2, "below", 1)))),
        ("a red circle and a blue square; the red circle is higher than the blue square",
         CaptionSpec((ObjectSpec("circle", "red"), ObjectSpec("square", "blue")), (RelationSpec(0, "above", 1),))),
        ("a large red circle on the right side of a small red circle, on a plain white backdrop",
         CaptionSpec((ObjectSpec("circle", "red", "large"), ObjectSpec("circle", "red", "small")),
                     (RelationSpec(0, "right of", 1),), "white")),
        ("a red square in the center and a cyan disc in the lower right",
         CaptionSpec((ObjectSpec("square", "red", None, 1, "centre"), ObjectSpec("circle", "cyan", None, 1,
                                                                                  "bottom right")))),
    ],
)
def test_parse_caption_paraphrases(text: str, expected: CaptionSpec):
    assert parse_caption(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "   ", "hello world", "a red", "a red circle left of", "a red blue circle", "a red circle near a square",
     "a circle on black on white", "two red circles above a blue square", "a red circle a blue square",
     "on the left", "the circle is above the circle and a circle and the circle"],
)
def test_parse_caption_rejects_garbage(text: str):
    with pytest.raises(UserError, match="caption"):
        parse_caption(text)


def test_positions_are_regions_with_margins():
    assert position_margin("left", 0.3, 0.5) == pytest.approx(0.2)
    assert position_margin("top right", 0.8, 0.4) == pytest.approx(0.1)
    assert position_margin("centre", 0.55, 0.45) == pytest.approx(0.2)


# ----------------------------------------------------------------------------------------------- edits


def _diff(a: Scene, b: Scene) -> int:
    """Number of changed things between two scenes (objects added/removed/changed, background)."""
    only_a = [o for o in a.objects if o not in b.objects]
    only_b = [o for o in b.objects if o not in a.objects]
    return int(a.background != b.background) + max(len(only_a), len(only_b))


def test_edit_records_apply_exactly_one_valid_change():
    rng = _rng(8)
    kinds = set()
    for i in range(1500):
        split = "creative" if i % 6 == 0 else "train"
        r = random_edit_record(rng, split)
        src, tgt = Scene.from_dict(r["source_scene"]), Scene.from_dict(r["target_scene"])
        spec = parse_instruction(r["prompt"])
        assert r["task"] == "edit" and r["category"] == f"edit_{spec.kind}"
        kinds.add(spec.kind)
        assert is_valid(src) and is_valid(tgt) and _diff(src, tgt) == 1
        if spec.target is not None:  # the reference names exactly one source object
            assert sum(spec.target.matches(o) for o in src.objects) == 1
        assert not any((o.shape, o.color) in HELDOUT for o in src.objects)
        assert any((o.shape, o.color) in HELDOUT for o in tgt.objects) == (split == "creative")
    assert kinds == set(EDIT_KINDS)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("make the red circle blue", EditSpec("recolour", ObjectRef("circle", "red"), color="blue")),
        ("Change the color of the square to violet.", EditSpec("recolour", ObjectRef("square"), color="purple")),
        ("move the small green disc further left", EditSpec("move", ObjectRef("circle", "green", "small"),
                                                            direction="left")),
        ("shift the triangle towards the top", EditSpec("move", ObjectRef("triangle"), direction="up")),
        ("remove the green triangle", EditSpec("remove", ObjectRef("triangle", "green"))),
        ("please get rid of the rhombus", EditSpec("remove", ObjectRef("diamond"))),
        ("add a small yellow circle at the top", EditSpec("add", shape="circle", color="yellow", size="small",
                                                          position="top")),
        ("insert an orange square", EditSpec("add", shape="square", color="orange")),
        ("make the blue square bigger", EditSpec("resize", ObjectRef("square", "blue"), change="bigger")),
        ("shrink the circle", EditSpec("resize", ObjectRef("circle"), change="smaller")),
        ("resize the circle to large", EditSpec("resize", ObjectRef("circle"), size="large")),
        ("change the background to white", EditSpec("background", background="white")),
        ("use a grey background", EditSpec("background", background="gray")),
    ],
)
def test_parse_instruction_paraphrases(text: str, expected: EditSpec):
    assert parse_instruction(text) == expected


def test_instruction_text_round_trips_every_spec():
    rng = _rng(9)
    for kind in EDIT_KINDS:
        for _ in range(200):
            r = random_edit_record(rng, kind=kind)
            spec = parse_instruction(r["prompt"])
            for _ in range(5):  # other paraphrases of the same spec parse to the same spec
                assert parse_instruction(instruction_text(spec, rng)) == spec


@pytest.mark.parametrize(
    "text", ["", "make it nice", "make the circle", "move the red circle diagonally", "add a circle",
             "remove the background", "make the red circle blue and green", 42],
)
def test_parse_instruction_rejects_garbage(text):
    with pytest.raises(UserError, match="instruction"):
        parse_instruction(text)


def test_apply_edit_refuses_ambiguous_targets():
    scene = Scene((ShapeObject("circle", "red", "small", 0.25, 0.25), ShapeObject("circle", "red", "small", 0.75,
                                                                                    0.75)), "black")
    with pytest.raises(UserError, match="exactly one"):
        apply_edit(scene, EditSpec("remove", ObjectRef("circle", "red")), _rng())
