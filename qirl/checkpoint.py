"""Checkpoints: safetensors + JSON, written atomically, with everything an exact resume needs.

Layout of a run directory:

    run/checkpoints/step_00000100/   one complete checkpoint
        <name>.safetensors           one file per tensor group (model, ema, optimizer, rng)
        state.json                   step, data position, RNG states, recipe, and the non-tensor
                                     leaves of nested states (optimizer param_groups, ...)
    run/checkpoints/latest           the name of the newest complete checkpoint

A checkpoint is first written to a temporary folder beside its final place, fsynced, then renamed (a
rename is atomic on POSIX) and only then is `latest` replaced (also by rename). A kill or a full disk at
any moment leaves the previous checkpoint and `latest` intact. No pickle: nested states such as an
optimizer's `state_dict()` are flattened into tensors (safetensors) and a JSON tree of the rest.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qirl.data import atomic_write_text, publish_mode
from qirl.errors import UserError
from qirl.files import read_json, read_text

_TENSOR_REF = "__tensor__"


def flatten_state(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (dicts, lists, tensors, scalars) into flat tensors and a JSON skeleton.

    Each tensor is replaced in the skeleton by `{"__tensor__": key}`; dict keys become strings, with
    integer keys (optimizer state is keyed by parameter index) marked so they come back as ints.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[path] = node.detach().cpu().contiguous()
            return {_TENSOR_REF: path}
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                key = f"int:{k}" if isinstance(k, int) else str(k)
                out[key] = walk(v, f"{path}.{key}" if path else key)
            return out
        if isinstance(node, (list, tuple)):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(node)]
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"cannot checkpoint a {type(node).__name__} at '{path}'")

    return tensors, walk(obj, prefix)


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `flatten_state`."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {_TENSOR_REF}:
            return tensors[skeleton[_TENSOR_REF]]
        return {
            (int(k[4:]) if k.startswith("int:") else k): unflatten_state(v, tensors) for k, v in skeleton.items()
        }
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    return skeleton


@dataclass
class Checkpoint:
    """A loaded checkpoint: tensor groups by name and the JSON state."""

    path: Path
    tensors: dict[str, dict[str, torch.Tensor]]
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def nested(self, name: str) -> Any:
        """A nested state saved with `nested=` (e.g. an optimizer state_dict), rebuilt."""
        return unflatten_state(self.state["nested"][name], self.tensors[name])


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    tensors: dict[str, dict[str, torch.Tensor]],
    state: dict[str, Any],
    nested: dict[str, Any] | None = None,
    keep: int = 2,
    into: Path | None = None,
) -> Path:
    """Write checkpoint `step` atomically under `run_dir/checkpoints`, prune to the newest `keep`.

    `tensors` maps a group name to a flat `{name: tensor}` dict (a model's state_dict); `nested` maps a
    group name to any nested state (optimizer state_dict) that is flattened here. ``into``: a temporary
    folder (from `sharded_tmp_dir`) that already holds other files of this checkpoint (the shards every
    rank wrote); it is published with the rest.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final = root / name
    tmp = into if into is not None else Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.", suffix=".tmp"))
    try:
        groups = dict(tensors)
        skeletons = {}
        for group, obj in (nested or {}).items():
            groups[group], skeletons[group] = flatten_state(obj)
        for group, flat in groups.items():
            file = tmp / f"{group}.safetensors"
            # safetensors refuses shared storage; clone views so each entry owns its bytes.
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in flat.items()}, str(file))
            _fsync(file)
        full_state = {**state, "step": step, "groups": sorted(groups), "nested": skeletons}
        (tmp / "state.json").write_text(json.dumps(full_state, indent=1))
        _fsync(tmp / "state.json")
        if final.exists():  # a re-save of the same step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        publish_mode(tmp)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / "latest", name + "\n")
    _prune(root, keep)
    return final


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step_*.tmp"):  # left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None when the run has none."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / read_text(pointer, "checkpoint pointer").strip()
    if not path.is_dir():
        raise UserError(f"{pointer}: points to missing checkpoint {path.name}")
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a checkpoint folder; a missing or corrupt file is a `UserError` naming it."""
    path = Path(path)
    state_file = path / "state.json"
    if not state_file.is_file():
        raise UserError(f"{path}: not a qirl checkpoint (no state.json)")
    state = read_json(state_file, "checkpoint state")
    tensors = {}
    for group in state.get("groups", []):
        file = path / f"{group}.safetensors"
        if not file.is_file():
            raise UserError(f"{file}: missing checkpoint file")
        try:
            tensors[group] = load_file(str(file))
        except (SafetensorError, OSError, ValueError) as err:
            raise UserError(f"{file}: corrupt checkpoint file ({err})") from None
    return Checkpoint(path=path, tensors=tensors, state=state)


def sharded_tmp_dir(run_dir: str | Path, step: int) -> Path:
    """The temporary folder every rank writes its shards of checkpoint `step` into (a fixed name: the
    ranks must agree on it without talking); `save_checkpoint(into=...)` publishes it."""
    return Path(run_dir) / "checkpoints" / f".step_{step:08d}.sharded.tmp"


def consolidate(checkpoint: str | Path, out_file: str | Path, group: str = "model") -> Path:
    """Gather a sharded checkpoint's ``group`` tensors into one safetensors file, in one process.

    The shards are a `torch.distributed.checkpoint` folder (``<checkpoint>/dcp``) whose metadata gives
    every tensor's global shape; full tensors are allocated from it and filled by `dcp.load`, whatever
    the number of processes that wrote them. The file is written atomically.
    """
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(checkpoint) / "dcp"
    if not (path / ".metadata").is_file():
        raise UserError(f"{checkpoint}: not a sharded checkpoint (no dcp/.metadata)")
    meta = FileSystemReader(str(path)).read_metadata()
    prefix = f"{group}."
    template = {
        key[len(prefix) :]: torch.empty(md.size, dtype=md.properties.dtype)
        for key, md in meta.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(md, TensorStorageMetadata)
    }
    if not template:
        raise UserError(f"{checkpoint}: no {group!r} tensors in the sharded checkpoint")
    with warnings.catch_warnings():  # "no process group: loading in this process" is the point here
        warnings.simplefilter("ignore")
        dcp.load({group: template}, checkpoint_id=str(path), no_dist=True)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.tmp")
    save_file({k: v.contiguous() for k, v in template.items()}, str(tmp))
    os.replace(tmp, out_file)
    return out_file
