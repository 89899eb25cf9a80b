"""Recipes: YAML files plus `key=value` overrides, loaded into typed dataclasses.

A recipe is the single description of a run (torchtune style): the YAML file holds the defaults a user
edits, the command line holds the few keys changed for one run (`qirl pretrain recipes/pretrain.yaml
train.lr=3e-4`). OmegaConf does the merging and type checking against the dataclass schema; this module
only turns its exceptions into one-line `UserError`s that name the file and the key.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qirl.errors import UserError
from qirl.files import read_text

T = TypeVar("T")


def _omegaconf_message(err: OmegaConfBaseException) -> str:
    """The first line of OmegaConf's message, which already names the key and the expected type."""
    key = getattr(err, "full_key", None)
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"{first} (key '{key}')" if key and key not in first else first


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(read_text(path, "recipe"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}{where}: malformed YAML ({getattr(err, 'problem', err)})") from None
    if data is None:
        # An empty file would silently run every default (a full-length run nobody asked for).
        raise UserError(f"{path}: empty recipe (no sections); copy one from recipes/ or give key=value overrides")
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


def _resolve_includes(data: Any, base_dir: Path, chain: tuple[Path, ...]) -> Any:
    """Expand ``include: file.yaml`` (or a list of files) inside any mapping of a recipe.

    The included mapping is merged at the position of the ``include`` key, under the mapping's own keys
    (which win), so a section can pull in a generated file, e.g. ``rewards: {include: weights.yaml}``
    with the ``category_weights`` written by ``qirl curate``. Paths are relative to the including file.
    """
    if isinstance(data, list):
        return [_resolve_includes(v, base_dir, chain) for v in data]
    if not isinstance(data, dict):
        return data
    own = {k: _resolve_includes(v, base_dir, chain) for k, v in data.items() if k != "include"}
    if "include" not in data:
        return own
    files = data["include"] if isinstance(data["include"], list) else [data["include"]]
    layers = []
    for name in files:
        if not isinstance(name, str):
            raise UserError(f"{chain[-1]}: include must be a file name or a list of them, got {name!r}")
        path = (base_dir / name).resolve()
        if path in chain:
            raise UserError(f"{chain[-1]}: include cycle through {path}")
        layers.append(OmegaConf.create(_resolve_includes(_read_yaml(path), path.parent, (*chain, path))))
    merged = OmegaConf.merge(*layers, OmegaConf.create(own))
    return OmegaConf.to_container(merged)


def load_recipe(schema: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Load `path` (YAML; a file, else a built-in recipe name such as ``t2i``) over the defaults of
    `schema`, then apply `key=value` overrides.

    Unknown keys, wrong types, a missing file and malformed YAML all raise `UserError` naming the file
    and the key, so the CLI can print one line and exit 2.
    """
    base = OmegaConf.structured(schema)
    layers = [base]
    if path is not None:
        from qirl.builtin_recipes import resolve_recipe

        path = resolve_recipe(path)  # a file, else a built-in recipe's name (`qirl recipes list`)
        data = _resolve_includes(_read_yaml(path), path.parent, (path.resolve(),))
        try:
            layers.append(OmegaConf.create(data))
            merged = OmegaConf.merge(*layers)
        except OmegaConfBaseException as err:
            raise UserError(f"{path}: {_omegaconf_message(err)}") from None
    else:
        merged = base
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"override '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        try:
            if any(part.isdigit() for part in key.split(".")):
                # A list element (`rewards.models.0.args.path=...`): a dotlist would build a dict {"0": ...}
                # that cannot merge into the list, so set the element in place.
                if OmegaConf.select(merged, key.rsplit(".", 1)[0], throw_on_missing=False) is None:
                    raise UserError(f"override '{key}': no such list element in the recipe")
                OmegaConf.update(merged, key, OmegaConf.from_dotlist([f"v={value}"]).v, merge=True)
            else:
                merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except (OmegaConfBaseException, ValueError, TypeError, IndexError) as err:
            message = _omegaconf_message(err) if isinstance(err, OmegaConfBaseException) else str(err)
            raise UserError(f"override '{key}': {message.splitlines()[0] if message else type(err).__name__}") from None
    try:
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        where = str(path) if path is not None else "recipe"
        raise UserError(f"{where}: {_omegaconf_message(err)}") from None


def to_dict(recipe: Any) -> dict[str, Any]:
    """Plain dict of a recipe dataclass, for run directories (`recipe.yaml`) and checkpoints."""
    return dataclasses.asdict(recipe)


def dump_recipe(recipe: Any) -> str:
    """YAML text of a loaded recipe; written beside every run so it can be rerun exactly."""
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)
