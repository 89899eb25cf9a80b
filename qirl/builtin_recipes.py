"""The recipes shipped inside the package (`qirl.recipes`, the repository's `recipes/` folder), by name.

torchtune's pattern: configs ship in the package, run by name, list, copy out for editing. A recipe
argument resolves as a path first, then as a built-in name: ``t2i``, ``qwen-image/t2i``, ``t2i.yaml`` or
``recipes/t2i.yaml`` (so the commands in the docs work from any folder). Paths inside recipes that start
with ``recipes/`` (curated prompt files) resolve the same way (`shipped_path`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from qirl.errors import UserError

PREFIX = "recipes/"


def builtin_dir() -> Path:
    """The installed recipes folder (the repository's `recipes/` in an editable install)."""
    return Path(str(files("qirl.recipes")))


def builtin_recipes() -> dict[str, Path]:
    """{name: file} of every built-in recipe: its path under the folder without ``.yaml`` (``t2i``,
    ``qwen-image/t2i``, ``ablations/t2i_3r_uniform``); ``data/`` holds files recipes include, not recipes."""
    root = builtin_dir()
    return {
        p.relative_to(root).with_suffix("").as_posix(): p
        for p in sorted(root.rglob("*.yaml"))
        if p.relative_to(root).parts[0] != "data"
    }


def _name(arg: str) -> str:
    name = arg.removeprefix("./").removeprefix(PREFIX)
    return name[: -len(".yaml")] if name.endswith(".yaml") else name


def resolve_recipe(arg: str | Path) -> Path:
    """``arg`` as a path if that file exists, else the built-in recipe it names; a `UserError` listing the
    built-in names otherwise."""
    path = Path(arg)
    if path.is_file():
        return path
    known = builtin_recipes()
    found = known.get(_name(str(arg)))
    if found is not None:
        return found
    raise UserError(f"{arg}: recipe file not found, and not a built-in recipe (built-in: {', '.join(known)})")


def shipped_path(value: str) -> str:
    """A file path from a recipe: as given when it exists; else, when it starts with ``recipes/``, the
    packaged file (so a built-in recipe's data resolves from any folder)."""
    if Path(value).exists() or not value.startswith(PREFIX):
        return value
    packaged = builtin_dir() / value[len(PREFIX) :]
    return str(packaged) if packaged.exists() else value


@dataclass
class RecipeInfo:
    name: str
    runs: str  # the qirl command it is for (grpo, distill, curate, pretrain, score train)
    command: str  # the first command in its header
    about: str  # the header's first sentence


_COMMAND = re.compile(r"^#\s+(qirl\s+(score\s+train|grpo|distill|curate|pretrain)\b.*)$")


def recipe_info(name: str, path: Path) -> RecipeInfo:
    """What the recipe's header says: its command (the first naming its file, else the first) and its first
    sentence."""
    header = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    commands = [m for m in map(_COMMAND.match, header) if m]
    # the first command that names this recipe's file (a header may first show how to make its inputs)
    whole = [m for m in commands if not m.group(1).endswith("\\")]  # not the first line of a continued one
    mine = [m for m in whole if f"{name}.yaml" in m.group(1)] or whole or commands
    command = re.sub(r"\s{2,}#.*$", "", mine[0].group(1)).strip() if mine else ""
    runs = mine[0].group(2) if mine else ""
    text = " ".join(line.lstrip("# ").strip() for line in header if line.strip("# ") and not _COMMAND.match(line))
    about = text.split(". ")[0].split(": ")[0].rstrip(".") if text else ""
    return RecipeInfo(name, runs, command, about)


def list_recipes() -> list[RecipeInfo]:
    return [recipe_info(name, path) for name, path in builtin_recipes().items()]


def copy_recipe(name: str, dest: str | Path) -> Path:
    """Copy built-in recipe ``name`` to ``dest`` (a file, or a folder to copy into) for editing; an
    existing file is not overwritten. Includes (``include: data/...``) are rewritten to the packaged files'
    absolute paths, so the copy works where it lands."""
    known = builtin_recipes()
    src = known.get(_name(name))
    if src is None:
        raise UserError(f"{name}: not a built-in recipe (built-in: {', '.join(known)})")
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists():
        raise UserError(f"{dest}: exists; choose another destination")
    dest.parent.mkdir(parents=True, exist_ok=True)
    text = src.read_text(encoding="utf-8")
    text = re.sub(
        r"^(\s*include:\s*)(\S+)", lambda m: m.group(1) + str((src.parent / m.group(2)).resolve()), text, flags=re.M
    )
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(dest)
    return dest


__all__ = [
    "RecipeInfo", "builtin_dir", "builtin_recipes", "copy_recipe", "list_recipes", "recipe_info",
    "resolve_recipe", "shipped_path",
]
