"""The real-checkpoint VLM reward path, on tiny Qwen2.5-VL and Qwen3-VL folders (qirl.rewards.vlm.tiny).

Each folder is loaded by path, as a 7B would be: AutoModelForImageTextToText plus the processor (the
image-only fallback here, where torchvision is absent), score tokens checked before the weights load.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText
from vlm_cases import one_thread, shapes_batch  # noqa: F401  (one_thread: autouse)

from qirl.errors import UserError
from qirl.models.qwen_vl import ImageOnlyQwen3VLProcessor, ImageOnlyQwenVLProcessor
from qirl.rewards.base import _REGISTRY, RewardRecord
from qirl.rewards.vlm import VLMReward, VLMRewardConfig
from qirl.rewards.vlm.prompting import MARKER, chat_text, simple_chat
from qirl.rewards.vlm.tiny import FAMILIES, build_tiny_checkpoint, build_tiny_vlm

PROCESSORS = {"qwen2.5-vl": ImageOnlyQwenVLProcessor, "qwen3-vl": ImageOnlyQwen3VLProcessor}
MODEL_TYPES = {"qwen2.5-vl": "qwen2_5_vl", "qwen3-vl": "qwen3_vl"}
TOL = {"atol": 1e-5, "rtol": 1e-5}



@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {family: build_tiny_checkpoint(family, root / family, seed=0) for family in FAMILIES}


@pytest.fixture(scope="module")
def pointwise(folders: dict[str, Path]) -> dict[str, VLMReward]:
    return {family: VLMReward(cfg(path=str(folder))) for family, folder in folders.items()}


def cfg(**kw) -> VLMRewardConfig:  # noqa: ANN003
    return VLMRewardConfig(device="cpu", dtype="float32", **kw)


def batch(n: int, seed: int = 0) -> tuple[torch.Tensor, list[str], list[RewardRecord]]:
    """`shapes_batch` with row 0's prompt much shorter than the rest, so a batch is padded."""
    images, prompts, records = shapes_batch(n, seed)
    prompts[0] = "a circle"
    return images, prompts, records


def last_token_hidden(  # noqa: ANN001
    rm: VLMReward, images, prompts, records, padding_side: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, H] final hidden state, [B, V] logits) at each row's last real token, found by hand from the
    attention mask, through the full `*ForConditionalGeneration` forward (not the reward's plumbing)."""
    rows = rm._rows(images, records)
    enc = rm.encode(
        rows, prompts, [r.task for r in records], [MARKER] * len(prompts), padding_side=padding_side
    )
    inputs = {k: v for k, v in enc.items() if k not in ("completion_mask", "score_pos")}
    with torch.no_grad():
        out = rm.model(**inputs, use_cache=False, output_hidden_states=True)
    mask = enc["attention_mask"]
    assert not mask.all(), "the batch must be padded for this check to mean anything"
    pos = [int(mask[i].nonzero().max()) for i in range(len(prompts))]
    assert pos == ([mask.shape[1] - 1] * len(pos) if padding_side == "left" else (mask.sum(1) - 1).tolist())
    logits = out.logits[torch.arange(len(pos)), pos]  # [B, V]
    return out.hidden_states[-1][torch.arange(len(pos)), pos], logits


# ------------------------------------------------------------------------------------------ the folder


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_checkpoint_is_a_hub_style_folder(family: str, folders: dict[str, Path]) -> None:
    folder = folders[family]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (folder / name).is_file(), name
    assert json.loads((folder / "config.json").read_text())["model_type"] == MODEL_TYPES[family]
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    assert pre["patch_size"] == {"qwen2.5-vl": 14, "qwen3-vl": 16}[family] and pre["merge_size"] == 2
    a, _ = build_tiny_vlm(family, seed=0)
    b, _ = build_tiny_vlm(family, seed=1)
    loaded = AutoModelForImageTextToText.from_pretrained(str(folder), local_files_only=True)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, a.state_dict()[k]), k  # the seed fixes the weights
    assert not torch.equal(a.lm_head.weight, b.lm_head.weight)
    with pytest.raises(UserError, match="tiny VLM family"):
        build_tiny_vlm("llava")


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_by_path_with_the_familys_processor(family: str, pointwise: dict[str, VLMReward]) -> None:
    rm = pointwise[family]
    assert type(rm.processor) is PROCESSORS[family]
    assert rm.model.config.model_type == MODEL_TYPES[family]
    assert rm.visual_tokens(32) == 4  # upsampled to 2x2 merged tokens (56 px / 64 px)
    assert rm.visual_tokens(128) == {"qwen2.5-vl": 25, "qwen3-vl": 16}[family]  # 140 px / 128 px
    images, prompts, records = batch(2)
    enc = rm.encode(rm._rows(images, records), prompts, ["t2i", "edit"], [MARKER] * 2)
    assert (enc["input_ids"] == rm.model.config.image_token_id).sum(1).tolist() == [4, 8]
    assert "mm_token_type_ids" in enc  # what get_rope_index builds the 3-D positions from
    for task in ("t2i", "edit"):  # the checkpoint's chat template is used, and renders ChatML
        assert chat_text(rm.processor, "a red circle", "quality", task) == simple_chat(
            "a red circle", "quality", task
        )


# ------------------------------------------------------------------------------------------ scoring


@pytest.mark.parametrize("family", FAMILIES)
def test_scores_a_batch_in_range(family: str, pointwise: dict[str, VLMReward]) -> None:
    rm = pointwise[family]
    images, prompts, records = batch(5)
    s = rm(images, prompts, records)
    assert s.shape == (5,) and s.dtype == torch.float32 and bool(s.isfinite().all())
    dist = rm.score_distribution(images, prompts, records)  # [5, 5]
    torch.testing.assert_close(dist.sum(1), torch.ones(5))
    expected_score = (dist * torch.arange(1.0, 6.0)).sum(1)  # E in [1, 5]
    assert bool(((expected_score >= 1) & (expected_score <= 5)).all())
    torch.testing.assert_close(s, (expected_score - 1) / 4)  # the reward is E mapped to [0, 1]
    assert len(set(s.tolist())) == 5  # the images and prompts really reach the score


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_score_is_read_at_each_rows_last_real_token(
    family: str, padding_side: str, pointwise: dict[str, VLMReward]
) -> None:
    rm = pointwise[family]
    images, prompts, records = batch(4, seed=3)
    _, logits = last_token_hidden(rm, images, prompts, records, padding_side)
    expected = torch.softmax(logits[:, rm.score_ids], dim=-1)  # [B, 5]
    torch.testing.assert_close(rm.score_distribution(images, prompts, records), expected, **TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_rows_score_as_they_would_alone(family: str, pointwise: dict[str, VLMReward]) -> None:
    """Left padding, rows of different prompt lengths and image counts: no row sees another's tokens,
    and the 3-D positions of a padded row equal those of the row alone."""
    rm = pointwise[family]
    images, prompts, records = batch(4, seed=1)
    together = rm(images, prompts, records)
    alone = torch.cat([rm(images[i : i + 1], prompts[i : i + 1], records[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, **TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_micro_batches_equal_one_batch(family: str, folders: dict[str, Path], monkeypatch) -> None:  # noqa: ANN001
    """`batch_size` bounds the rows per forward (256 images on a 7B stay in memory); the split does not
    change the scores."""
    small = VLMReward(cfg(path=str(folders[family]), batch_size=3))
    large = VLMReward(cfg(path=str(folders[family]), batch_size=16))
    sizes: list[int] = []
    forward = VLMReward._forward_rows

    def counted(self, rows, prompts, tasks):  # noqa: ANN001, ANN202
        sizes.append(len(rows))
        return forward(self, rows, prompts, tasks)

    monkeypatch.setattr(VLMReward, "_forward_rows", counted)
    images, prompts, records = batch(7, seed=2)
    split = small(images, prompts, records)
    assert sizes == [3, 3, 1]
    torch.testing.assert_close(split, large(images, prompts, records), **TOL)
    assert sizes[3:] == [7]


@pytest.mark.parametrize("family", FAMILIES)
def test_pairwise_by_path_reads_the_last_real_token(family: str, folders: dict[str, Path]) -> None:
    rm = _REGISTRY["vlm_pairwise"](path=str(folders[family]), device="cpu", dtype="float32")
    assert rm.config.mode == "pairwise" and rm.head is not None
    images, prompts, records = batch(4, seed=4)
    s = rm(images, prompts, records)
    assert s.shape == (4,) and bool(((s > 0) & (s < 1)).all())
    hidden, _ = last_token_hidden(rm, images, prompts, records, "left")
    with torch.no_grad():
        expected = torch.sigmoid(rm.head(hidden).squeeze(-1))  # head_mean 0, head_std 1
    torch.testing.assert_close(s, expected, **TOL)
    alone = torch.cat([rm(images[i : i + 1], prompts[i : i + 1], records[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(s, alone, **TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_chain_of_thought_generates_then_scores(family: str, folders: dict[str, Path]) -> None:
    """Greedy generation on the real model class (Qwen3-VL keeps its M-RoPE offsets across steps),
    left-padded, then the distribution after the reasoning."""
    rm = _REGISTRY["vlm_pointwise_cot"](
        path=str(folders[family]), device="cpu", dtype="float32", max_cot_tokens=3
    )
    images, prompts, records = batch(3, seed=5)
    reasons = rm.explain(images, prompts, records)
    assert all(isinstance(r, str) and r for r in reasons)
    s = rm(images, prompts, records)
    assert s.shape == (3,) and bool(((s >= 0) & (s <= 1)).all())
    assert rm.explain(images[2:], prompts[2:], records[2:]) == reasons[2:]  # padding-free alone: same text


@pytest.mark.parametrize("family", FAMILIES)
def test_registry_and_save_round_trip_keep_the_family(
    family: str, folders: dict[str, Path], pointwise: dict[str, VLMReward], tmp_path: Path
) -> None:
    rm = _REGISTRY["vlm_pointwise"](path=str(folders[family]), device="cpu", dtype="float32")
    images, prompts, records = batch(3)
    scores = pointwise[family](images, prompts, records)
    assert torch.equal(rm(images, prompts, records), scores)
    back = VLMReward.load(rm.save(tmp_path / "rm"), device="cpu", dtype="float32")
    assert type(back.processor) is PROCESSORS[family] and back.processor.chat_template
    assert torch.equal(back(images, prompts, records), scores)


# ------------------------------------------------------------------------------------------ load errors


def copy_folder(folder: Path, dest: Path) -> Path:
    return Path(shutil.copytree(folder, dest))


def no_weights_loaded(monkeypatch) -> None:  # noqa: ANN001
    def boom(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("weights were loaded before the tokenizer was checked")

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", boom)


@pytest.mark.parametrize("family", FAMILIES)
def test_split_score_digit_is_a_one_line_error_before_the_weights(
    family: str, folders: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:  # noqa: ANN001
    folder = copy_folder(folders[family], tmp_path / "ckpt")
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["normalizer"] = {"type": "Replace", "pattern": {"String": "3"}, "content": "1 2"}
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    no_weights_loaded(monkeypatch)
    with pytest.raises(UserError, match=r"score token '3' is not a single token") as err:
        VLMReward(cfg(path=str(folder)))
    assert "\n" not in str(err.value) and str(folder) in str(err.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_unknown_score_digit_is_a_one_line_error_before_the_weights(
    family: str, folders: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:  # noqa: ANN001
    folder = copy_folder(folders[family], tmp_path / "ckpt")
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["model"]["vocab"]["<|three|>"] = tok["model"]["vocab"].pop("3")  # "3" now encodes as <|unk|>
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    no_weights_loaded(monkeypatch)
    with pytest.raises(UserError, match=r"score token '3' is unknown to this tokenizer") as err:
        _REGISTRY["vlm_pointwise"](path=str(folder), device="cpu")
    assert "\n" not in str(err.value)


def test_missing_folder_config_or_weights_are_user_errors(folders: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UserError, match="checkpoint folder not found"):
        VLMReward(cfg(path=str(tmp_path / "nowhere")))
    folder = copy_folder(folders["qwen3-vl"], tmp_path / "ckpt")
    (folder / "model.safetensors").unlink()
    with pytest.raises(UserError, match=r"no model weights \(\*\.safetensors\)"):
        VLMReward(cfg(path=str(folder)))
    (folder / "config.json").unlink()
    with pytest.raises(UserError, match="missing model config") as err:
        VLMReward(cfg(path=str(folder)))
    assert "\n" not in str(err.value)


def test_processor_disagreeing_with_the_vision_tower_is_a_user_error(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    folder = copy_folder(folders["qwen3-vl"], tmp_path / "ckpt")
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps(pre | {"patch_size": 14}))  # Qwen2.5-VL's
    with pytest.raises(UserError, match=r"image processor \(patch 14, .*vision tower \(patch 16"):
        VLMReward(cfg(path=str(folder)))
