"""Prompt records: the JSONL schema every command reads, validated line by line.

One JSON object per line. `prompt` is required; `task` is `t2i` (default) or `edit`; an edit needs its
source image, either as a file (`source`, a path relative to the JSONL file) or as a Shapes scene
(`source_scene`, rendered on the fly). Everything else a record carries (`scene`, `target_scene`, ids)
is kept in `extra` and written back unchanged, so nothing a user put in is lost.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from qirl.errors import UserError
from qirl.files import read_text

TASKS = ("t2i", "edit")


@dataclass
class PromptRecord:
    """One prompt (T2I) or instruction + source (edit)."""

    prompt: str
    task: str = "t2i"
    category: str = "default"
    id: str | None = None
    source: str | None = None  # image path (resolved against the JSONL's folder)
    source_scene: dict[str, Any] | None = None  # Shapes scene to render as the source
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt": self.prompt, "task": self.task, "category": self.category}
        for key in ("id", "source", "source_scene"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out.update(self.extra)
        return out


_KNOWN = {"prompt", "task", "category", "id", "source", "source_scene"}


def record_from_dict(obj: Any, where: str, base_dir: Path | None = None) -> PromptRecord:
    """Validate one decoded JSON object; `where` ('file:line') prefixes every error."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "prompt" not in obj:
        raise UserError(f"{where}: missing required key 'prompt'")
    prompt = obj["prompt"]
    if not isinstance(prompt, str):
        raise UserError(f"{where}: 'prompt' must be a string, got {type(prompt).__name__}")
    task = obj.get("task", "t2i")
    if task not in TASKS:
        raise UserError(f"{where}: 'task' must be one of {', '.join(TASKS)}, got {task!r}")
    category = obj.get("category", "default")
    if not isinstance(category, str):
        raise UserError(f"{where}: 'category' must be a string, got {type(category).__name__}")
    rec_id = obj.get("id")
    if rec_id is not None and not isinstance(rec_id, (str, int)):
        raise UserError(f"{where}: 'id' must be a string or integer")
    source = obj.get("source")
    if source is not None:
        if not isinstance(source, str):
            raise UserError(f"{where}: 'source' must be an image path string")
        if base_dir is not None and not os.path.isabs(source):
            source = str(base_dir / source)
    source_scene = obj.get("source_scene")
    if source_scene is not None and not isinstance(source_scene, dict):
        raise UserError(f"{where}: 'source_scene' must be a JSON object (a Shapes scene)")
    if task == "edit" and source is None and source_scene is None:
        raise UserError(f"{where}: an edit record needs 'source' (image path) or 'source_scene'")
    extra = {k: v for k, v in obj.items() if k not in _KNOWN}
    return PromptRecord(
        prompt=prompt,
        task=task,
        category=category,
        id=None if rec_id is None else str(rec_id),
        source=source,
        source_scene=source_scene,
        extra=extra,
    )


def read_json_lines(path: str | Path, what: str = "JSONL file") -> list[tuple[int, Any]]:
    """(line number, decoded object) of every non-blank line; a bad line is a `UserError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    rows = []
    for lineno, line in enumerate(read_text(path, what).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{lineno}: malformed JSON ({err.msg})") from None
    return rows


def read_jsonl(path: str | Path) -> list[PromptRecord]:
    """Read and validate a prompt file; any bad line is a `UserError` naming file and line."""
    path = Path(path)
    records = [
        record_from_dict(obj, f"{path}:{lineno}", base_dir=path.parent)
        for lineno, obj in read_json_lines(path, "prompt file")
    ]
    if not records:
        raise UserError(f"{path}: no prompts in file")
    return records


def iter_json_lines(rows: Iterable[dict[str, Any]]) -> Iterator[str]:
    for row in rows:
        yield json.dumps(row, ensure_ascii=False) + "\n"


def publish_mode(path: str | Path) -> None:
    """Give a temporary file or folder the mode a plain `open` / `mkdir` would have.

    `mkstemp` and `mkdtemp` create private entries (0600 / 0700) so that nobody reads a half-written
    output; once complete and about to be renamed into place, it gets the umask's usual mode.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)


def atomic_write_text(path: str | Path, text: str | Iterable[str]) -> None:
    """Write a text file so that readers see the old file or the whole new one, never a part.

    Written to a temporary file in the same folder, flushed and fsynced, then `os.replace`d (atomic on
    POSIX), so a crash or a full disk leaves at most a stray temporary file, which is removed on error.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            if isinstance(text, str):
                fh.write(text)
            else:
                fh.writelines(text)
            fh.flush()
            os.fsync(fh.fileno())
        publish_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, iter_json_lines(rows))


def load_image(path: str | Path, size: int | None = None) -> torch.Tensor:
    """An RGB image file as a `[3, H, W]` float tensor in [0, 1].

    Mode and size are checked rather than silently converted (diffusers' rule: a concise error beats a
    silent fix): an RGBA or greyscale file, or one of the wrong size, is a `UserError`.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: image file not found")
    try:
        with Image.open(path) as img:
            img.load()
            mode, (w, h) = img.mode, img.size
            if mode != "RGB":
                raise UserError(f"{path}: image mode must be RGB, got {mode}")
            if size is not None and (w, h) != (size, size):
                raise UserError(f"{path}: image must be {size}x{size}, got {w}x{h}")
            arr = np.asarray(img, dtype=np.float32) / 255.0  # [H, W, 3]
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"{path}: not a readable image ({type(err).__name__})") from None
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # [3, H, W]


def to_pil(image: torch.Tensor) -> Image.Image:
    """`[3, H, W]` tensor in [0, 1] -> 8-bit RGB PIL image."""
    arr = (image.detach().float().clamp(0, 1) * 255.0 + 0.5).to(torch.uint8)  # [3, H, W]
    return Image.fromarray(arr.permute(1, 2, 0).cpu().numpy(), mode="RGB")


def save_image_atomic(image: torch.Tensor, path: str | Path) -> None:
    """Save a PNG via a temporary file + rename, so no half-written image is ever left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        to_pil(image).save(tmp, format="PNG")
        publish_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_grid(images: torch.Tensor, ncol: int, pad: int = 2, upscale: int = 1) -> torch.Tensor:
    """Tile `[N, 3, H, W]` images into one `[3, H', W']` grid on a mid-grey canvas."""
    n, c, h, w = images.shape
    if upscale > 1:
        images = images.repeat_interleave(upscale, dim=2).repeat_interleave(upscale, dim=3)
        h, w = h * upscale, w * upscale
    nrow = (n + ncol - 1) // ncol
    grid = torch.full((c, nrow * (h + pad) + pad, ncol * (w + pad) + pad), 0.5)  # [3, H', W']
    for i in range(n):
        r, col = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, y : y + h, x : x + w] = images[i].float()
    return grid
