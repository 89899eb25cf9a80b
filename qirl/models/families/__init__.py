"""The diffusers pipeline families `DiffusersPolicy` supports, one adapter module each (`base.Family`).

A new family is one module with a `Family` subclass, added to `FAMILIES` here.
"""

from __future__ import annotations

from qirl.models.families.base import Family
from qirl.models.families.flux import Flux
from qirl.models.families.qwen_image import QwenImage, QwenImageEdit
from qirl.models.families.sd3 import SD3

FAMILIES: dict[str, Family] = {f.name: f for f in (QwenImage(), QwenImageEdit(), Flux(), SD3())}
# model_index.json `_class_name` -> family name
PIPELINE_FAMILIES: dict[str, str] = {f.pipeline_class: name for name, f in FAMILIES.items()}

__all__ = ["FAMILIES", "PIPELINE_FAMILIES", "Family"]
