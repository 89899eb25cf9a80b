"""The Shapes world: qirl's embedded default, where every part of the pipeline runs on a CPU.

Coloured shapes on a plain background (scene.py), rendered anti-aliased (render.py), described by
captions (captions.py) and edited by instructions (edits.py), and an oracle (oracle.py) that scores
images against text the way Qwen-Image-Bench does, so RL gains are measured against known truth.
"""

from __future__ import annotations

from qirl.shapes.captions import (
    CATEGORIES,
    CaptionSpec,
    ObjectSpec,
    RelationSpec,
    make_caption,
    parse_caption,
    random_t2i_record,
    spec_matches_scene,
)
from qirl.shapes.detect import Analysis, Detection, analyse, detect
from qirl.shapes.edit_oracle import EditScore, aggregate_edits, score_edit, score_edit_batch
from qirl.shapes.edits import (
    EDIT_KINDS,
    EditSpec,
    ObjectRef,
    apply_edit,
    parse_instruction,
    random_edit_record,
)
from qirl.shapes.oracle import PILLARS, OracleScore, aggregate, score_t2i, score_t2i_batch
from qirl.shapes.render import render, render_batch
from qirl.shapes.scene import (
    BACKGROUNDS,
    COLORS,
    HELDOUT,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    is_heldout,
    random_scene,
)

__all__ = [
    "BACKGROUNDS", "CATEGORIES", "COLORS", "EDIT_KINDS", "HELDOUT", "PILLARS", "SHAPES", "SIZES",
    "Analysis", "CaptionSpec", "Detection", "EditScore", "EditSpec", "ObjectRef", "ObjectSpec",
    "OracleScore", "RelationSpec", "Scene", "ShapeObject",
    "aggregate", "aggregate_edits", "analyse", "apply_edit", "detect", "is_heldout", "make_caption",
    "parse_caption", "parse_instruction", "random_edit_record", "random_scene", "random_t2i_record",
    "render", "render_batch", "score_edit", "score_edit_batch", "score_t2i", "score_t2i_batch",
    "spec_matches_scene",
]
