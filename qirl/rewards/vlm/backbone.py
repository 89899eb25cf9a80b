"""The VLM under the reward: the embedded tiny Qwen2.5-VL or a real checkpoint, behind one interface.

Both are a transformers `*ForConditionalGeneration` model plus its processor; everything above this
module (scoring, losses, training) is the same code for a 7B on a cluster and for the embedded default.

The embedded default is `Qwen2_5_VLForConditionalGeneration` built from a tiny `Qwen2_5_VLConfig`
(random init from a seed, trained by `qirl score train`): text decoder 2 layers x 64 wide (4 query /
2 KV heads, head_dim 16, M-RoPE sections [2, 3, 3]), vision tower depth 2 x 64, patch 4, spatial merge 2,
temporal patch 2. A 32x32 image is an 8x8 grid of 4x4 patches in the vision tower and 16 tokens in the
decoder (8x8 / 2^2); the image processor's min = max pixels = 32^2 pins that size, and
`check_token_counts` verifies the processor and the model agree. About 0.25M parameters.

A real checkpoint (Qwen2.5-VL or Qwen3-VL, dense or MoE) loads from a local folder
(`AutoModelForImageTextToText`, `AutoProcessor`, or without torchvision the image-only processor of
tokenizer.py; never the hub). At load, each score digit "1".."5" must be one token of the checkpoint's
tokenizer, and the same token that follows the answer marker, else the score position would read the
wrong logits: a `UserError` in one line, raised before the weights are read. The two families differ
only below this interface: patch 14 vs 16 (both merge 2x2 patches into one decoder token), Qwen3-VL's
DeepStack and interleaved M-RoPE; the 3-D position ids come from the model's own `get_rope_index`,
which reads `mm_token_type_ids` and the attention mask, so padding does not shift them. tiny.py
builds toy checkpoints of both families in this format.

`encode` builds a batch of `chat prompt (processor, images expanded) + completion text` per row and
pads it (left by default); the score is read at each row's last real token, found from the attention
mask, so left and right padding give the same scores.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from qirl.errors import UserError
from qirl.models.qwen_vl import (
    ImageOnlyQwenVLProcessor,
    TinyVLMSpec,
    load_processor,
    qwen_image_processor,
    tiny_config,
)
from qirl.rewards.vlm.data import quiet_progress
from qirl.rewards.vlm.prompting import MARKER
from qirl.rewards.vlm.tokenizer import SCORE_TOKENS, load_embedded_tokenizer

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UserError(f"model.device: unknown device {device!r}") from None


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"model.dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def build_embedded(spec: TinyVLMSpec, seed: int) -> tuple[Any, Any]:
    """(model, processor) of the embedded tiny VLM, randomly initialised from `seed`."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    tokenizer = load_embedded_tokenizer()
    processor = ImageOnlyQwenVLProcessor(
        image_processor=qwen_image_processor(spec.patch_size, spec.merge_size, spec.image_size),
        tokenizer=tokenizer,
    )
    config = tiny_config(spec, tokenizer)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    return model, processor


def load_backbone(path: str | Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """(model, processor) from a local checkpoint folder; a missing or corrupt file is a `UserError`."""
    from transformers import AutoModelForImageTextToText

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: VLM checkpoint folder not found (only local paths are loaded)")
    if not (path / "config.json").is_file():
        raise UserError(f"{path / 'config.json'}: missing model config")
    weights = (
        list(path.glob("*.safetensors"))
        + list(path.glob("*.safetensors.index.json"))
        + list(path.glob("*.bin"))
    )
    if not [w for w in weights if w.name != "head.safetensors"]:
        raise UserError(f"{path}: no model weights (*.safetensors) in the checkpoint folder")
    processor = load_processor(path)
    score_token_ids(processor.tokenizer, str(path))  # fail before loading billions of weights
    try:
        with quiet_progress():
            model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - safetensors, JSON and shape errors all mean a bad folder
        raise UserError(
            f"{path}: cannot load the VLM weights ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from None
    return model, processor


def score_token_ids(tokenizer: Any, where: str) -> list[int]:
    """Ids of "1".."5"; each must be one token, not the unknown token, and the token that follows the
    answer marker (so the logits at the score position are the digits' logits)."""
    ids = []
    for digit in SCORE_TOKENS:
        enc = tokenizer.encode(digit, add_special_tokens=False)
        after = tokenizer.encode(MARKER + digit, add_special_tokens=False)
        if len(enc) != 1:
            pieces = tokenizer.convert_ids_to_tokens(enc)
            raise UserError(
                f"{where}: score token {digit!r} is not a single token of this tokenizer (it splits into {pieces})"
            )
        if enc[0] == tokenizer.unk_token_id and tokenizer.unk_token_id is not None:
            raise UserError(f"{where}: score token {digit!r} is unknown to this tokenizer")
        if not after or after[-1] != enc[0]:
            raise UserError(f"{where}: after {MARKER!r} the digit {digit!r} tokenizes differently than alone")
        ids.append(enc[0])
    return ids


def check_token_counts(model: Any, processor: Any, size: int) -> int:
    """Decoder tokens per `size`x`size` image, after checking that processor and vision tower agree on
    the patch geometry (patch 14 for Qwen2.5-VL, 16 for Qwen3-VL; spatial merge 2 and temporal patch 2
    in both): a mismatch would otherwise surface as a shape error deep inside the vision tower."""
    ip = processor.image_processor
    vc = model.config.vision_config
    ours = (ip.patch_size, ip.merge_size, ip.temporal_patch_size)
    theirs = (vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size)
    if ours != theirs:
        raise UserError(
            "image processor (patch {}, merge {}, temporal patch {}) disagrees with the model's vision "
            "tower (patch {}, merge {}, temporal patch {})".format(*ours, *theirs)
        )
    # The processor turns an image into grid_h x grid_w patches; the merger fuses merge^2 of them into
    # one decoder token (processing_qwen2_5_vl.py / processing_qwen3_vl.py `replace_image_token`).
    return int(ip.get_number_of_image_patches(size, size, {}) // ip.merge_size**2)


def encode(
    processor: Any,
    images: Sequence[Sequence[Image.Image]],
    prompt_texts: Sequence[str],
    completions: Sequence[str],
    padding_side: str = "left",
) -> dict[str, Tensor]:
    """Tokenise `prompt_text (images expanded) + completion` per row and pad the batch.

    The prompt goes through the processor (which expands `<|image_pad|>` to the image's token count);
    the completion is tokenised alone and appended as ids, so the boundary is exact for any tokenizer.
    Returns the model inputs plus `completion_mask` [B, L] (completion tokens) and `score_pos` [B]
    (each row's last real token: its next-token logits are the score distribution).
    """
    tokenizer = processor.tokenizer
    flat = [img for row in images for img in row]
    enc = processor(text=list(prompt_texts), images=flat or None, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"].bool()  # [B, L0]
    per_token = [
        k
        for k, v in enc.items()
        if k not in ("input_ids", "attention_mask") and isinstance(v, Tensor) and v.shape == ids.shape
    ]
    rows = []
    for i, completion in enumerate(completions):
        comp = tokenizer(completion, add_special_tokens=False)["input_ids"] if completion else []
        comp_t = torch.tensor(comp, dtype=ids.dtype)
        row = {"input_ids": torch.cat([ids[i][mask[i]], comp_t])}
        for k in per_token:
            row[k] = torch.cat([enc[k][i][mask[i]], torch.zeros(len(comp), dtype=enc[k].dtype)])
        row["completion_mask"] = torch.cat(
            [torch.zeros(int(mask[i].sum()), dtype=torch.bool), torch.ones(len(comp), dtype=torch.bool)]
        )
        rows.append(row)
    length = max(len(r["input_ids"]) for r in rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: dict[str, Tensor] = {}
    for k in ["input_ids", *per_token, "completion_mask"]:
        fill = pad_id if k == "input_ids" else 0
        out[k] = torch.stack([_pad(r[k], length, fill, padding_side) for r in rows])
    out["attention_mask"] = torch.stack(
        [_pad(torch.ones(len(r["input_ids"]), dtype=torch.long), length, 0, padding_side) for r in rows]
    )
    for k, v in enc.items():
        if k not in out and k != "attention_mask":
            out[k] = v
    out["score_pos"] = last_positions(out["attention_mask"])
    return out


def _pad(x: Tensor, length: int, fill: int, side: str) -> Tensor:
    pad = torch.full((length - len(x),), fill, dtype=x.dtype)
    return torch.cat([pad, x]) if side == "left" else torch.cat([x, pad])


def last_positions(attention_mask: Tensor) -> Tensor:
    """[B, L] mask -> [B] index of each row's last real token (left, right or no padding)."""
    idx = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # [L]
    return (attention_mask.bool() * (idx + 1)).argmax(dim=1)


EXTRA_KEYS = ("completion_mask", "score_pos")


def model_inputs(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items() if k not in EXTRA_KEYS}


def hidden_states(model: Any, batch: dict[str, Tensor], device: torch.device) -> Tensor:
    """Last-layer hidden states [B, L, H] (after the final norm, i.e. what the LM head reads)."""
    out = model.base_model(**model_inputs(batch, device), use_cache=False)
    return out.last_hidden_state


def completion_token_logits(model: Any, hidden: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """[B, L, H] hidden states of an `encode` batch -> (logits [N, V], targets [N]) of its completion
    tokens under teacher forcing: position t predicts token t + 1, for every completion token."""
    target_mask = batch["completion_mask"][:, 1:].to(hidden.device)  # [B, L-1]
    logits = model.get_output_embeddings()(hidden[:, :-1][target_mask])  # [N, V]
    targets = batch["input_ids"][:, 1:].to(hidden.device)[target_mask]  # [N]
    return logits, targets
