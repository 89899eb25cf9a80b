"""The reward wire format: JSON with images as base64 8-bit PNG, so no pickle ever crosses the network.

Request (POST /score):

    {"prompts": ["a red circle", ...],
     "records": [{"task": "t2i" | "edit", "category": "...", "source": <b64 PNG> | null}, ...],
     "images":  [<b64 PNG>, ...],
     "names":   ["oracle", ...]}            # optional: the rewards to compute (default: all)

Response: `{"names": [...], "rewards": {name: [float | null, ...]}}`, null where the reward is NaN
(JSON has no NaN).

Images travel as 8-bit RGB PNG (lossless): an image in [0, 1] is quantised once,
`u8 = floor(x * 255 + 0.5)` (the rule of `qirl.data.to_pil`), and decoded as `u8 / 255` in float32, so an
image that already lies on the 8-bit grid round-trips exactly and the remote score of any image equals
the in-process score of its 8-bit quantisation (`quantize_8bit`). PNG is written at compression level 1:
on 512 px images it is several times faster than the default level 6 for ~10 % more bytes.

Decoding is defensive because its input comes from the network: bad base64, bytes that are not a PNG,
a non-RGB mode or an image over `max_pixels` raise `CodecError` with a one-line message (the server
answers 400, or 413 for a too-large image) before any pixel buffer is allocated.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from qirl.rewards.base import TASKS, RewardRecord

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DEFAULT_MAX_PIXELS = 4096 * 4096


class CodecError(ValueError):
    """A malformed payload; `status` is the HTTP status the server answers with (400 or 413)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def quantize_8bit(images: Tensor) -> Tensor:
    """What the wire keeps of an image: the nearest point of the 8-bit grid, as float32 in [0, 1]."""
    return torch.floor(images.detach().float().clamp(0, 1) * 255.0 + 0.5) / 255.0


def to_uint8_hwc(image: Tensor) -> np.ndarray:
    """`[3, H, W]` in [0, 1] -> contiguous `[H, W, 3]` uint8, the rounding of `quantize_8bit`.

    In numpy, not torch: these are small ops, and torch's intra-op thread pool costs more than the work
    on a busy CPU (~8 ms an op with 2 threads on a loaded 2-core box, 1 ms in numpy). float32
    throughout, so the values are those `quantize_8bit` computes."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image [3, H, W], got shape {tuple(image.shape)}")
    arr = image.detach().to("cpu", torch.float32).numpy()  # [3, H, W]
    u8 = np.floor(np.clip(arr, 0.0, 1.0) * np.float32(255.0) + np.float32(0.5)).astype(np.uint8)
    return np.ascontiguousarray(u8.transpose(1, 2, 0))


def encode_image(image: Tensor) -> str:
    """`[3, H, W]` in [0, 1] -> base64 text of an 8-bit RGB PNG."""
    arr = to_uint8_hwc(image)  # [H, W, 3]
    buf = io.BytesIO()
    Image.fromarray(arr, mode="RGB").save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_image(text: Any, where: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS) -> Tensor:
    """base64 PNG text -> `[3, H, W]` float32 in [0, 1]; anything else is a `CodecError` naming `where`."""
    if not isinstance(text, str):
        raise CodecError(f"{where}: expected a base64 PNG string, got {type(text).__name__}")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise CodecError(f"{where}: invalid base64") from None
    if not raw.startswith(PNG_MAGIC):
        raise CodecError(f"{where}: not a PNG image")
    try:
        with Image.open(io.BytesIO(raw), formats=["PNG"]) as img:
            w, h = img.size
            if w * h > max_pixels:  # checked on the header, before the pixels are decoded
                raise CodecError(f"{where}: {w}x{h} image exceeds the {max_pixels}-pixel limit", status=413)
            if img.mode != "RGB":
                raise CodecError(f"{where}: image mode must be 8-bit RGB, got {img.mode}")
            img.load()
            arr = np.asarray(img, dtype=np.uint8)  # [H, W, 3]
    except CodecError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise CodecError(f"{where}: not a readable PNG image") from None
    chw = np.ascontiguousarray(arr.transpose(2, 0, 1))  # [3, H, W]
    return torch.from_numpy(chw.astype(np.float32) / np.float32(255.0))


def encode_request(
    images: Tensor,
    prompts: Sequence[str],
    records: Sequence[RewardRecord],
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """A batch -> the JSON-able request. A source tensor shared by several records (a GRPO group)
    is encoded once and its text reused."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(images.shape)}")
    if not (images.shape[0] == len(prompts) == len(records)):
        raise ValueError(f"{images.shape[0]} images, {len(prompts)} prompts, {len(records)} records")
    sources: dict[int, str] = {}
    out_records = []
    for rec in records:
        src = None
        if rec.source is not None:
            key = id(rec.source)
            if key not in sources:
                sources[key] = encode_image(rec.source)
            src = sources[key]
        out_records.append({"task": rec.task, "category": rec.category, "source": src})
    payload: dict[str, Any] = {
        "prompts": list(prompts),
        "records": out_records,
        "images": [encode_image(img) for img in images],
    }
    if names is not None:
        payload["names"] = list(names)
    return payload


def decode_request(
    obj: Any, max_batch: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[Tensor, list[str], list[RewardRecord], list[str] | None]:
    """A decoded JSON request -> (images [B, 3, H, W], prompts, records, names or None).

    Every check names the field and index at fault (`CodecError`); too many images is status 413.
    `records` may be omitted (all T2I, default category).
    """
    if not isinstance(obj, dict):
        raise CodecError(f"request: expected a JSON object, got {type(obj).__name__}")
    for key in ("prompts", "images"):
        if key not in obj:
            raise CodecError(f"request: missing required key {key!r}")
        if not isinstance(obj[key], list):
            raise CodecError(f"request: {key!r} must be a list")
    prompts, images = obj["prompts"], obj["images"]
    if len(images) > max_batch:
        raise CodecError(f"request: {len(images)} images exceed the batch limit of {max_batch}", status=413)
    if not images:
        raise CodecError("request: 'images' is empty")
    if len(prompts) != len(images):
        raise CodecError(f"request: {len(images)} images but {len(prompts)} prompts")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise CodecError(f"prompts[{i}]: expected a string, got {type(p).__name__}")
    raw_records = obj.get("records")
    if raw_records is None:
        raw_records = [{}] * len(images)
    if not isinstance(raw_records, list) or len(raw_records) != len(images):
        raise CodecError(f"request: 'records' must be a list of {len(images)} objects")
    decoded_sources: dict[str, Tensor] = {}  # a group's shared source is decoded once
    records = []
    for i, rec in enumerate(raw_records):
        if not isinstance(rec, dict):
            raise CodecError(f"records[{i}]: expected a JSON object, got {type(rec).__name__}")
        task, category, src = rec.get("task", "t2i"), rec.get("category", "default"), rec.get("source")
        if task not in TASKS:
            raise CodecError(f"records[{i}].task: must be one of {', '.join(TASKS)}, got {task!r}")
        if not isinstance(category, str):
            raise CodecError(f"records[{i}].category: expected a string")
        source = None
        if src is not None:
            if not isinstance(src, str):
                raise CodecError(f"records[{i}].source: expected a base64 PNG string or null")
            if src not in decoded_sources:
                decoded_sources[src] = decode_image(src, f"records[{i}].source", max_pixels)
            source = decoded_sources[src]
        records.append(RewardRecord(task=task, category=category, source=source))
    tensors = [decode_image(img, f"images[{i}]", max_pixels) for i, img in enumerate(images)]
    shape = tensors[0].shape
    for i, t in enumerate(tensors):
        if t.shape != shape:
            raise CodecError(f"images[{i}]: shape {tuple(t.shape)} differs from images[0] {tuple(shape)}")
    names = obj.get("names")
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
        raise CodecError("request: 'names' must be a list of reward names")
    return torch.stack(tensors), list(prompts), records, names


def encode_response(names: Sequence[str], rewards: Tensor) -> dict[str, Any]:
    """`rewards [B, K]` -> `{"names": [...], "rewards": {name: [float | null]}}` (NaN, and a buggy
    reward's inf, -> null: JSON has neither)."""
    cols = rewards.detach().float().cpu().T.tolist()  # [K][B]
    return {
        "names": list(names),
        "rewards": {
            n: [v if math.isfinite(v) else None for v in col] for n, col in zip(names, cols, strict=True)
        },
    }


def decode_response(obj: Any, names: Sequence[str], batch: int) -> Tensor:
    """The server's JSON -> `rewards [B, K]` in the order of `names`; a malformed answer is a
    `CodecError` (the client turns it into NaN and a counted fault)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("rewards"), Mapping):
        raise CodecError("response: expected an object with a 'rewards' mapping")
    out = torch.empty(batch, len(names), dtype=torch.float32)
    for k, name in enumerate(names):
        col = obj["rewards"].get(name)
        if not isinstance(col, list) or len(col) != batch:
            raise CodecError(f"response: rewards[{name!r}] must be a list of {batch} numbers")
        for b, v in enumerate(col):
            if v is None:
                out[b, k] = math.nan
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[b, k] = float(v)
            else:
                raise CodecError(f"response: rewards[{name!r}][{b}] is not a number")
    return out
