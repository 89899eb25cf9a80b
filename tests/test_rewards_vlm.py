"""VLM reward models on the embedded tiny Qwen2.5-VL: tokenizer, positions, losses, training, save/load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, normalizers
from vlm_cases import one_thread, shapes_batch  # noqa: F401  (one_thread: autouse)

from qirl.checkpoint import latest_checkpoint, load_checkpoint
from qirl.config import load_recipe
from qirl.errors import UserError
from qirl.models.qwen_vl import SPECIAL_TOKENS, wrap
from qirl.rewards.base import _REGISTRY, RewardRecord
from qirl.rewards.vlm import (
    RewardTrainRecipe,
    VLMReward,
    VLMRewardConfig,
    bradley_terry_loss,
    evaluate_reward_model,
    pointwise_loss,
    spearman,
    train_reward_model,
)
from qirl.rewards.vlm.backbone import last_positions, score_token_ids
from qirl.rewards.vlm.data import load_annotations
from qirl.rewards.vlm.losses import within_group_rank_loss
from qirl.rewards.vlm.model import MarkerStop
from qirl.rewards.vlm.prompting import (
    MARKER,
    answer_prefix,
    chat_text,
    reasoning_text,
    simple_chat,
    split_at_marker,
)
from qirl.rewards.vlm.tokenizer import ASSET_DIR, SCORE_TOKENS, load_embedded_tokenizer
from qirl.rewards.vlm.train import _grouped_batch
from qirl.shapes import random_edit_record, random_t2i_record
from qirl.shapes.scene import Scene
from qirl.stats import rankdata

ROOT = Path(__file__).resolve().parents[1]



def cfg(**kw) -> VLMRewardConfig:  # noqa: ANN003
    return VLMRewardConfig(device="cpu", dtype="float32", **kw)


@pytest.fixture(scope="module")
def pointwise() -> VLMReward:
    return VLMReward(cfg())


def easy_annotations(out: Path, n_prompts: int, test_fraction: float) -> Path:
    """Clean renders vs blank canvases (T2I only, noiseless labels): an easy signal a few dozen steps learn.

    Built by the annotation pipeline itself (`qirl score annotate`) with only the opt-in `blank` perturbation.
    A blank canvas is an invalid sample, whose pairs evaluation skips; this set drops the `valid` flag so the
    clean-vs-blank pairs are scored (subtler perturbations give no signal a tiny VLM learns in 100 steps).
    """
    from qirl.rewards.annotate import AnnotateConfig, annotate

    config = AnnotateConfig(
        out_dir=str(out), n_prompts=n_prompts, samples_per_prompt=2, perturbed_fraction=1.0,
        perturbations=["blank"], edit_fraction=0.0, test_fraction=test_fraction, pairs_per_prompt=1,
        likert_noise=0.0, slip_rate=0.0, flip_rate=0.0,
    )
    list(annotate(config))
    data = load_annotations(out)
    for split in ("pairwise", "pairwise_test"):
        data[split] = data[split].remove_columns("valid")
    data.save_to_disk(str(out.with_name(out.name + ".easy")))
    return out.with_name(out.name + ".easy")


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return easy_annotations(tmp_path_factory.mktemp("easy") / "annotations", n_prompts=28, test_fraction=0.43)


def hand_distribution(
    rm: VLMReward,
    images: torch.Tensor,
    prompts: list[str],
    records: list[RewardRecord],
    completions: list[str],
    padding_side: str,
) -> torch.Tensor:
    """softmax over the "1".."5" logits of the full LM head, at the last real token found by hand."""
    rows = rm._rows(images, records)
    batch = rm.encode(rows, prompts, [r.task for r in records], completions, padding_side=padding_side)
    inputs = {k: v for k, v in batch.items() if k not in ("completion_mask", "score_pos")}
    with torch.no_grad():
        logits = rm.model(**inputs, use_cache=False).logits  # [B, L, V]
    mask = batch["attention_mask"]
    out = []
    for i in range(len(prompts)):
        real = mask[i].nonzero().flatten()
        pos = int(real.max())
        if padding_side == "left":
            assert pos == mask.shape[1] - 1
        else:
            assert pos == len(real) - 1
        out.append(torch.softmax(logits[i, pos, rm.score_ids], dim=-1))
    return torch.stack(out)


# ------------------------------------------------------------------------------------------ tokenizer


def test_embedded_tokenizer_has_single_token_digits_and_qwen_specials() -> None:
    tok = load_embedded_tokenizer()
    for i, special in enumerate(SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(special) == i
    ids = score_token_ids(tok, "embedded")
    assert [tok.convert_ids_to_tokens(i) for i in ids] == list(SCORE_TOKENS)
    assert tok("Score: 345", add_special_tokens=False)["input_ids"][-3:] == ids[2:5]
    # Every word the Shapes grammar says is in the shipped vocabulary (fails when the grammar grows:
    # rebuild with `python -m qirl.rewards.vlm`).
    rng = np.random.default_rng(123)
    texts = [
        f(rng, split=s)["prompt"]
        for _ in range(150)
        for f in (random_t2i_record, random_edit_record)
        for s in ("train", "creative")
    ]
    unknown = {
        w
        for t in texts
        for w, i in zip(tok.tokenize(t), tok(t)["input_ids"], strict=True)
        if i == tok.unk_token_id
    }
    assert not unknown, f"words missing from {ASSET_DIR}/tokenizer.json: {sorted(unknown)}"


def test_annotation_reasons_are_in_the_vocabulary() -> None:
    """The CoT targets are the annotation generator's reason phrases: the model must be able to say them."""
    from qirl.shapes.judge import judge_t2i
    from qirl.shapes.perturb import perturb

    tok = load_embedded_tokenizer()
    rng = np.random.default_rng(7)
    phrases = set()
    for _ in range(6):
        rec = random_t2i_record(rng)
        scene = Scene.from_dict(rec["scene"])
        for kind in ("wrong_object", "missing_object", "extra_object", "blur", "noise", "distorted_shape"):
            img = np.clip(perturb(scene, kind, 32, rng), 0, 1)
            phrases.update(judge_t2i(img, rec["prompt"]).reasons)
    assert phrases
    unknown = {
        w
        for p in phrases
        for w, i in zip(tok.tokenize(p), tok(p)["input_ids"], strict=True)
        if i == tok.unk_token_id
    }
    assert not unknown, f"reason words missing from the embedded vocabulary: {sorted(unknown)}"


def test_score_digit_that_splits_is_a_user_error(tmp_path: Path) -> None:
    backend = Tokenizer.from_file(str(ASSET_DIR / "tokenizer.json"))
    backend.normalizer = normalizers.Sequence([normalizers.Replace("3", "1 2"), normalizers.Lowercase()])
    with pytest.raises(UserError, match=r"score token '3' is not a single token"):
        score_token_ids(wrap(backend), "bad tokenizer")
    # ... and it is caught at load, before the weights are read.
    folder = VLMReward(cfg()).save(tmp_path / "rm")
    backend.save(str(folder / "tokenizer.json"))
    with pytest.raises(UserError, match=r"rm: score token '3'"):
        VLMReward.load(folder, device="cpu")


def test_processor_and_model_agree_on_visual_tokens(pointwise: VLMReward) -> None:
    assert pointwise.visual_tokens(32) == 16
    assert pointwise.visual_tokens(64) == 16  # larger renders are resized to the pinned 32x32
    images, prompts, records = shapes_batch(4)
    batch = pointwise.encode(
        pointwise._rows(images, records), prompts, [r.task for r in records], [MARKER] * 4
    )
    pads = (batch["input_ids"] == pointwise.model.config.image_token_id).sum(1)
    assert pads.tolist() == [16, 32, 16, 32]  # an edit shows the source and the edited image
    assert tuple(batch["pixel_values"].shape) == (6 * 64, 3 * 2 * 4 * 4)  # 8x8 patches of 2x4x4x3


# ------------------------------------------------------------------------------------------ scoring


def test_scores_shape_range_and_distribution(pointwise: VLMReward) -> None:
    images, prompts, records = shapes_batch(5)
    s = pointwise(images, prompts, records)
    assert s.shape == (5,) and s.dtype == torch.float32
    assert bool(((s >= 0) & (s <= 1)).all())
    dist = pointwise.score_distribution(images, prompts, records)
    assert dist.shape == (5, 5)
    torch.testing.assert_close(dist.sum(1), torch.ones(5))
    torch.testing.assert_close(s, ((dist * torch.arange(1.0, 6.0)).sum(1) - 1) / 4)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_pointwise_reward_is_the_expectation_at_the_score_position(
    pointwise: VLMReward, padding_side: str
) -> None:
    images, prompts, records = shapes_batch(4, seed=3)
    prompts[0] = "a circle"  # lengths differ a lot, so padding is substantial
    probs = hand_distribution(pointwise, images, prompts, records, [MARKER] * 4, padding_side)
    expected = ((probs * torch.arange(1.0, 6.0)).sum(1) - 1) / 4
    torch.testing.assert_close(pointwise(images, prompts, records), expected, atol=1e-5, rtol=1e-5)
    # Row by row (no padding at all) agrees with the batch.
    for i in range(4):
        one = pointwise(images[i : i + 1], prompts[i : i + 1], records[i : i + 1])
        torch.testing.assert_close(one, expected[i : i + 1], atol=1e-5, rtol=1e-5)


def test_last_positions_for_any_padding() -> None:
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 1, 0]])
    assert last_positions(mask).tolist() == [3, 2, 3, 2]


def test_cot_reads_the_distribution_after_the_generated_reasoning() -> None:
    rm = VLMReward(cfg(cot=True, max_cot_tokens=6))
    images, prompts, records = shapes_batch(3, seed=5)
    rows = rm._rows(images, records)
    reasoning = rm.generate_reasoning(rows, prompts, [r.task for r in records])
    assert all(r for r in reasoning)  # an untrained model never writes the marker: cut at 6 tokens
    assert all(len(rm.tokenizer.tokenize(r)) <= 6 for r in reasoning)
    expected = hand_distribution(rm, images, prompts, records, [answer_prefix(r) for r in reasoning], "left")
    torch.testing.assert_close(
        rm.score_distribution(images, prompts, records), expected, atol=1e-5, rtol=1e-5
    )
    assert rm.explain(images, prompts, records) == reasoning
    plain = hand_distribution(rm, images, prompts, records, [MARKER] * 3, "left")
    assert not torch.allclose(plain, expected)  # the reasoning is really in the context


def test_cot_marker_stops_generation_and_splits_text() -> None:
    tok = load_embedded_tokenizer()
    ids = tok(
        ["the image is blank . score : 2", "the image is blank . edges are"],
        add_special_tokens=False,
        padding=True,
        return_tensors="pt",
    )["input_ids"]
    prompt = torch.zeros(2, 5, dtype=torch.long)
    done = MarkerStop(tok, start=5)(torch.cat([prompt, ids], 1), torch.zeros(2, 4))
    assert done.tolist() == [True, False]
    assert split_at_marker("edges are blurry. Score: 4") == ("edges are blurry.", True)
    assert split_at_marker("edges are") == ("edges are", False)
    assert (
        reasoning_text(["the red circle is missing", "edges are blurry."])
        == "the red circle is missing; edges are blurry."
    )
    assert answer_prefix("edges are blurry.") == "edges are blurry. Score: "


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_checkpoint_chat_template_is_used_when_present() -> None:
    """Real checkpoints carry a chat template: the prompt goes through it (here a ChatML one, which
    must reproduce the built-in template the embedded tokenizer uses)."""
    rm = VLMReward(cfg())
    images, prompts, records = shapes_batch(2)
    plain = rm(images, prompts, records)
    rm.processor.chat_template = CHATML
    for task in ("t2i", "edit"):
        assert chat_text(rm.processor, "a red circle", "quality", task) == simple_chat(
            "a red circle", "quality", task
        )
    rm.processor.chat_template = CHATML.replace("{{ m['role'] }}", "{{ m['role'] }} rater")
    assert "<|im_start|>user rater" in chat_text(rm.processor, "a red circle", "quality", "t2i")
    assert not torch.equal(rm(images, prompts, records), plain)


def test_change_image_is_the_signed_difference_around_mid_grey() -> None:
    """`change_image` = 127.5 + (result - source) / 2 per channel: 128 where nothing changed."""
    from PIL import Image

    from qirl.rewards.vlm.model import change_image

    src = np.zeros((4, 4, 3), np.uint8)
    src[0, 0] = (200, 0, 0)  # a red pixel ...
    out = src.copy()
    out[0, 0] = (0, 0, 200)  # ... recoloured blue
    out[3, 3] = (255, 255, 255)  # and a white one added
    change = np.asarray(change_image(Image.fromarray(src), Image.fromarray(out)))
    assert change.shape == (4, 4, 3) and change.dtype == np.uint8
    assert change[1, 1].tolist() == [128, 128, 128]  # np.rint(127.5) rounds half to even
    assert change[0, 0].tolist() == [28, 128, 228] and change[3, 3].tolist() == [255, 255, 255]


def test_the_change_view_shows_edits_a_third_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`edit_view: pair_diff`: an edit row reads three images, the third the change from its source to
    its result, and the prompt that names it; T2I rows are as before; the setting is saved with the
    model; a bad view is a user error."""
    from qirl.rewards.vlm import model as vlm_model
    from qirl.rewards.vlm.prompting import EDIT_DIFF_QUESTION

    pair, diff = VLMReward(cfg()), VLMReward(cfg(edit_view="pair_diff"))
    images, prompts, records = shapes_batch(4)  # rows 1 and 3 are edits
    rows, tasks = pair._rows(images, records), [r.task for r in records]
    vision = diff.processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    n_pair = (pair.encode(rows, prompts, tasks, [MARKER] * 4)["input_ids"] == vision).sum(dim=1)  # [4]
    shown = []
    change = vlm_model.change_image
    monkeypatch.setattr(vlm_model, "change_image", lambda s, r: shown.append((s, r)) or change(s, r))
    n_diff = (diff.encode(rows, prompts, tasks, [MARKER] * 4)["input_ids"] == vision).sum(dim=1)  # [4]
    monkeypatch.undo()
    assert n_pair.tolist() == [1, 2, 1, 2] and n_diff.tolist() == [1, 3, 1, 3]
    assert [(s, r) for s, r in shown] == [tuple(rows[1]), tuple(rows[3])]  # (source, result) of each edit
    assert "image three is the change" in simple_chat("a red circle", "quality", "edit", diff=True)
    assert "three" not in simple_chat("a red circle", "quality", "t2i", diff=True)
    tok = load_embedded_tokenizer()
    assert tok.unk_token_id not in tok(EDIT_DIFF_QUESTION)["input_ids"]
    scores_pair, scores_diff = pair(images, prompts, records), diff(images, prompts, records)
    assert torch.equal(scores_pair[0::2], scores_diff[0::2])  # same weights (seed): T2I rows unchanged
    assert not torch.equal(scores_pair[1::2], scores_diff[1::2])
    assert VLMReward.load(diff.save(tmp_path / "rm"), device="cpu").config.edit_view == "pair_diff"
    with pytest.raises(UserError, match="edit_view"):
        VLMReward(cfg(edit_view="triple"))


def test_nan_for_tasks_not_judged() -> None:
    rm = VLMReward(cfg(tasks=["t2i"]))
    images, prompts, records = shapes_batch(4)
    records[2] = RewardRecord(task="edit", source=None)
    s = rm(images, prompts, records)
    assert s[[0]].isfinite().all() and s[[1, 2, 3]].isnan().all()
    both = VLMReward(cfg())
    s = both(images, prompts, records)
    assert s[[0, 1, 3]].isfinite().all() and s[2].isnan()  # an edit without its source cannot be judged
    assert both.score_distribution(images, prompts, records)[2].isnan().all()


# ------------------------------------------------------------------------------------------ losses, metrics


def test_bradley_terry_loss_by_hand_with_ties() -> None:
    r_a, r_b = torch.tensor([2.0, -1.0, 0.5, 0.0]), torch.tensor([0.5, 1.0, 0.5, 3.0])
    label = torch.tensor([1.0, 0.0, 0.5, 0.5])
    d = [1.5, -2.0, 0.0, -3.0]
    ls = [lambda x: float(np.log(1 / (1 + np.exp(-x))))][0]
    by_hand = [-ls(d[0]), -ls(2.0), -0.5 * (ls(0.0) + ls(0.0)), -0.5 * (ls(-3.0) + ls(3.0))]
    torch.testing.assert_close(bradley_terry_loss(r_a, r_b, label), torch.tensor(float(np.mean(by_hand))))
    # A tie is minimal where the two rewards are equal.
    d_grid = torch.linspace(-2, 2, 41)
    tie = torch.stack([bradley_terry_loss(x[None], torch.zeros(1), torch.tensor([0.5])) for x in d_grid])
    assert int(tie.argmin()) == 20


def test_pointwise_loss_by_hand() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.5, -1.0], [3.0, 0.0, 0.0, 0.0, 0.0]])
    labels = torch.tensor([3, 5])
    p = torch.softmax(logits, -1)
    ce = -(torch.log(p[0, 2]) + torch.log(p[1, 4])) / 2
    e = (p * torch.arange(1.0, 6.0)).sum(1)
    reg = (((e - labels) / 4) ** 2).mean()
    loss, parts = pointwise_loss(logits, labels, regression_weight=0.7)
    torch.testing.assert_close(loss, ce + 0.7 * reg)
    torch.testing.assert_close(parts["ce"], ce)


def test_within_group_rank_loss_by_hand() -> None:
    e = torch.tensor([3.0, 2.0, 4.0, 1.0, 1.5])
    labels = torch.tensor([4, 2, 4, 1, 3])
    groups = torch.tensor([0, 0, 0, 1, 1])
    # Group 0: pairs with differing labels (0 over 1) and (2 over 1); the tie (0, 2) is skipped.
    # Group 1: 4 over 3. Image 3 and image 1 are in different groups: never compared.
    expected = -(
        torch.nn.functional.logsigmoid(torch.tensor(2.0 * (3.0 - 2.0)))
        + torch.nn.functional.logsigmoid(torch.tensor(2.0 * (4.0 - 2.0)))
        + torch.nn.functional.logsigmoid(torch.tensor(2.0 * (1.5 - 1.0)))
    ) / 3
    torch.testing.assert_close(within_group_rank_loss(e, labels, groups), expected)
    assert within_group_rank_loss(e, torch.full((5,), 3), groups) is None  # all tied


def test_grouped_batches_are_runs_of_one_prompt() -> None:
    by_prompt = [np.array([0, 1, 2]), np.array([3, 4]), np.array([5, 6, 7, 8])]
    prompt_of = {i: g for g, rows in enumerate(by_prompt) for i in rows.tolist()}
    idx = _grouped_batch(by_prompt, n_groups=3, group_size=4, rng=np.random.default_rng(0))
    assert len(idx) == 12
    runs = [{prompt_of[i] for i in idx[k : k + 4]} for k in range(0, 12, 4)]
    assert all(len(r) == 1 for r in runs)  # each run of 4 is one prompt (drawn with replacement if short)
    assert sorted(next(iter(r)) for r in runs) == [0, 1, 2]  # three distinct prompts


def test_spearman_with_ties() -> None:
    assert rankdata(torch.tensor([10.0, 20.0, 20.0, 5.0])).tolist() == [2.0, 3.5, 3.5, 1.0]
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    # Ranks [1, 2.5, 2.5, 4, 5] and [1, 2, 3.5, 5, 3.5]: centred products sum to 7.25, both norms^2 9.5.
    assert spearman(torch.tensor([1.0, 2, 2, 4, 5]), torch.tensor([5.0, 6, 7, 8, 7])) == pytest.approx(
        7.25 / 9.5
    )


# ------------------------------------------------------------------------------------------ data, training


def test_missing_split_or_column_is_a_user_error(tmp_path: Path) -> None:
    data = load_annotations(easy_annotations(tmp_path / "easy", n_prompts=2, test_fraction=0.5))
    data["pointwise"] = data["pointwise"].remove_columns("alignment")
    del data["pairwise"]
    data.save_to_disk(str(tmp_path / "ann"))
    base = [
        "train.steps=1",
        f"data.path={tmp_path / 'ann'}",
        f"run.out_dir={tmp_path / 'run'}",
        "model.device=cpu",
    ]
    with pytest.raises(UserError, match=r"lacks column\(s\) alignment"):
        next(train_reward_model(load_recipe(RewardTrainRecipe, None, base)))
    with pytest.raises(UserError, match=r"missing split 'pairwise'"):
        next(train_reward_model(load_recipe(RewardTrainRecipe, None, [*base, "model.mode=pairwise"])))
    with pytest.raises(UserError, match="not found"):
        load_annotations(tmp_path / "nowhere")


def test_annotation_rounds_load_as_their_union(tmp_path: Path) -> None:
    """`data.path=a,b`: the splits of several rounds concatenated (on-policy annotation rounds)."""
    one = easy_annotations(tmp_path / "r1", n_prompts=2, test_fraction=0.5)
    data = load_annotations(one)
    union = load_annotations(f"{one}, {one}")
    assert set(union) == set(data)
    for split in data:
        assert union[split].num_rows == 2 * data[split].num_rows
    data["pointwise"] = data["pointwise"].remove_columns("alignment")
    data.save_to_disk(str(tmp_path / "other"))
    with pytest.raises(UserError, match="do not share one schema"):
        load_annotations(f"{one},{tmp_path / 'other'}")
    with pytest.raises(UserError, match="not found"):
        load_annotations(f"{one},{tmp_path / 'nowhere'}")


def test_trains_on_the_annotation_generators_output(tmp_path: Path) -> None:
    """The schema as `qirl.rewards.annotate` writes it (edits with source images, its reasons)."""
    from qirl.rewards import annotate

    config = annotate.AnnotateConfig(
        out_dir=str(tmp_path / "ann"),
        n_prompts=8,
        samples_per_prompt=3,
        perturbed_fraction=1.0,
        pairs_per_prompt=2,
        test_fraction=0.25,
        edit_fraction=0.5,
    )
    list(annotate.annotate(config))
    for mode in ("pointwise", "pairwise"):
        recipe = tiny_train(
            tmp_path / "ann",
            tmp_path / mode,
            f"model.mode={mode}",
            "train.steps=2",
            f"model.cot={'true' if mode == 'pointwise' else 'false'}",
            "model.max_cot_tokens=4",
        )
        done = list(train_reward_model(recipe))[-1]
        assert done["done"] and done["pairwise_n"] > 0 and done["spearman_n"] > 0


def tiny_train(toy: Path, out: Path, *extra: str) -> RewardTrainRecipe:
    return load_recipe(
        RewardTrainRecipe,
        None,
        [
            f"data.path={toy}",
            f"run.out_dir={out}",
            "model.device=cpu",
            "model.dtype=float32",
            "model.dimension=quality",
            "data.dimensions=[quality]",
            "train.batch_size=8",
            "train.warmup_steps=5",
            "run.log_every=5",
            *extra,
        ],
    )


def test_pointwise_training_learns_an_easy_signal(toy_dir: Path, tmp_path: Path) -> None:
    before = evaluate_reward_model(VLMReward(cfg(dimension="quality")), toy_dir)
    rows = list(train_reward_model(tiny_train(toy_dir, tmp_path / "run", "train.steps=100", "train.lr=1e-3")))
    losses = [r["loss"] for r in rows if "loss" in r]
    done = rows[-1]
    assert done["done"] and done["steps"] == 100
    assert np.mean(losses[-2:]) < losses[0]
    assert done["pairwise_accuracy"] > 0.8 and done["pairwise_accuracy"] > before["pairwise_accuracy"]
    assert done["spearman"] > 0.5
    rm = VLMReward.load(done["model"], device="cpu")
    assert evaluate_reward_model(rm, toy_dir) == {k: v for k, v in done.items() if k in before}
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


def test_pairwise_training_learns_and_normalises(toy_dir: Path, tmp_path: Path) -> None:
    recipe = tiny_train(toy_dir, tmp_path / "run", "model.mode=pairwise", "train.steps=30", "train.lr=1e-3")
    rows = list(train_reward_model(recipe))
    losses = [r["loss"] for r in rows if "loss" in r]
    done = rows[-1]
    assert np.mean(losses[-2:]) < losses[0]
    assert done["pairwise_accuracy"] > 0.8
    meta = json.loads((Path(done["model"]) / "vlm_reward.json").read_text())["config"]
    assert meta["head_std"] > 0 and meta["head_mean"] != 0.0  # calibrated on the training images

    # train.init_from continues from the trained folder, head included (an on-policy round's start)
    more = tiny_train(toy_dir, tmp_path / "more", "model.mode=pairwise", "train.steps=1", "train.lr=1e-9",
                      f"train.init_from={done['model']}")
    again = list(train_reward_model(more))[-1]
    assert again["pairwise_accuracy"] == pytest.approx(done["pairwise_accuracy"], abs=0.02)
    with pytest.raises(UserError, match="a pairwise reward model"):
        next(train_reward_model(tiny_train(toy_dir, tmp_path / "x", f"train.init_from={done['model']}")))
    with pytest.raises(UserError, match="set one"):
        next(train_reward_model(tiny_train(toy_dir, tmp_path / "y", f"train.init_from={done['model']}",
                                           f"model.path={done['model']}")))


def test_cot_training_step_runs_and_resumes_exactly(toy_dir: Path, tmp_path: Path) -> None:
    args = (
        "model.cot=true",
        "model.max_cot_tokens=8",
        "train.steps=6",
        "run.checkpoint_every=3",
        "run.log_every=1",
        "data.max_eval=4",
    )
    full = list(train_reward_model(tiny_train(toy_dir, tmp_path / "full", *args)))
    assert "lm" in full[0] and full[-1]["done"]
    cut = tiny_train(toy_dir, tmp_path / "cut", *args)
    for row in train_reward_model(cut):
        if row.get("step") == 4:
            break
    assert latest_checkpoint(tmp_path / "cut").name == "step_00000003"
    with pytest.raises(UserError, match="--resume"):
        next(train_reward_model(cut))
    resumed = list(train_reward_model(cut, resume=True))
    assert resumed[-1]["resumed_from"] == 3
    a = load_checkpoint(latest_checkpoint(tmp_path / "full")).tensors["model"]
    b = load_checkpoint(latest_checkpoint(tmp_path / "cut")).tensors["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_grouped_batch_asks_each_prompt_one_dimension(toy_dir: Path, tmp_path: Path) -> None:
    """The ranking term compares images within a group, so a group must share its question; across
    groups the dimensions still vary."""
    from qirl.rewards.vlm.train import _pointwise_step

    recipe = tiny_train(toy_dir, tmp_path / "run", "data.dimensions=[quality,fidelity,alignment]",
                        "train.group_size=4", "train.rank_weight=1.0", "train.batch_size=32")
    rm = VLMReward(cfg())
    asked: list[list[str]] = []
    encode = rm.encode
    rm.encode = lambda images, prompts, tasks, completions, dims: (asked.append(list(dims)),  # type: ignore[method-assign]
                                                                   encode(images, prompts, tasks, completions, dims))[1]
    rows = [load_annotations(toy_dir)["pointwise"][i] for i in range(32)]
    _, parts = _pointwise_step(rm, rows, recipe, np.random.default_rng(0))
    groups = [asked[0][k : k + 4] for k in range(0, 32, 4)]
    assert all(len(set(g)) == 1 for g in groups)
    assert len({g[0] for g in groups}) > 1  # 8 draws of 3 dimensions
    assert "rank" in parts


def test_grouped_ranking_training_runs_resumes_and_checks_its_settings(toy_dir: Path, tmp_path: Path) -> None:
    args = ("train.group_size=4", "train.rank_weight=1.0", "train.steps=4", "run.checkpoint_every=2",
            "run.log_every=1", "data.max_eval=4")
    full = list(train_reward_model(tiny_train(toy_dir, tmp_path / "full", *args)))
    assert full[-1]["done"] and any("rank" in r for r in full[:-1])
    cut = tiny_train(toy_dir, tmp_path / "cut", *args)
    for row in train_reward_model(cut):
        if row.get("step") == 3:
            break
    list(train_reward_model(cut, resume=True))
    a = load_checkpoint(latest_checkpoint(tmp_path / "full")).tensors["model"]
    b = load_checkpoint(latest_checkpoint(tmp_path / "cut")).tensors["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    for bad, match in [
        (("train.group_size=3",), "divide"),
        (("train.rank_weight=1.0",), "group_size >= 2"),
        (("train.group_size=2", "model.mode=pairwise"), "pointwise reward models"),
    ]:
        with pytest.raises(UserError, match=match):
            next(train_reward_model(tiny_train(toy_dir, tmp_path / "bad", *bad)))


# ------------------------------------------------------------------------------------------ save / load, registry


@pytest.mark.parametrize("mode", ["pointwise", "pairwise"])
def test_save_load_round_trip_gives_identical_scores(mode: str, tmp_path: Path) -> None:
    rm = VLMReward(cfg(mode=mode, dimension="fidelity", head_mean=0.3, head_std=2.0))
    images, prompts, records = shapes_batch(4)
    folder = rm.save(tmp_path / "rm")
    back = VLMReward.load(folder, device="cpu")
    assert back.config.dimension == "fidelity" and back.config.head_std == 2.0
    assert torch.equal(rm(images, prompts, records), back(images, prompts, records))
    rm.save(folder)  # overwriting an existing folder is atomic too
    assert not list(tmp_path.glob(".rm.*"))


def test_checkpoint_folder_loads_zero_shot_by_path(tmp_path: Path, pointwise: VLMReward) -> None:
    """A folder given as `path` goes through AutoModel / processor loading, like a 7B checkpoint would."""
    folder = pointwise.save(tmp_path / "ckpt")
    (folder / "vlm_reward.json").unlink()  # a plain transformers checkpoint folder
    again = VLMReward(cfg(path=str(folder)))
    images, prompts, records = shapes_batch(3)
    assert torch.equal(again(images, prompts, records), pointwise(images, prompts, records))


def test_missing_or_corrupt_files_are_user_errors(tmp_path: Path) -> None:
    folder = VLMReward(cfg(mode="pairwise")).save(tmp_path / "rm")
    (folder / "head.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="head.safetensors: corrupt"):
        VLMReward.load(folder, device="cpu")
    (folder / "head.safetensors").unlink()
    with pytest.raises(UserError, match="head.safetensors: missing"):
        VLMReward.load(folder, device="cpu")
    folder = VLMReward(cfg()).save(tmp_path / "rm2")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserError, match="cannot load the VLM weights"):
        VLMReward.load(folder, device="cpu")
    (folder / "vlm_reward.json").write_text("{not json")
    with pytest.raises(UserError, match="vlm_reward.json:1: malformed JSON"):
        VLMReward.load(folder)
    with pytest.raises(UserError, match="not found"):
        VLMReward(cfg(path=str(tmp_path / "nowhere")))


def test_registered_by_name_and_recipes_load(tmp_path: Path) -> None:
    for name in ("vlm_pointwise", "vlm_pointwise_cot", "vlm_pairwise"):
        assert name in _REGISTRY
    rm = _REGISTRY["vlm_pointwise_cot"](path=None, device="cpu")
    assert rm.config.cot and rm.name == "vlm_pointwise_cot_alignment"
    saved = _REGISTRY["vlm_pairwise"](device="cpu").save(tmp_path / "pair")
    assert _REGISTRY["vlm_pairwise"](path=str(saved), device="cpu").config.mode == "pairwise"
    with pytest.raises(UserError, match="is a pairwise VLM reward"):
        _REGISTRY["vlm_pointwise"](path=str(saved))
    for name in ("rm_pointwise", "rm_pairwise", "rm_pointwise_cot"):
        path = ROOT / "recipes" / f"{name}.yaml"
        assert f"qirl score train recipes/{name}.yaml" in path.read_text()
        recipe = load_recipe(RewardTrainRecipe, path)
        recipe.model.validate()
    with pytest.raises(UserError, match="model.cot"):
        VLMReward(cfg(mode="pairwise", cot=True))


def test_dimension_mean_is_the_weighted_mean_of_the_answers(pointwise: VLMReward) -> None:
    from qirl.rewards.vlm import DimensionMean

    images, prompts, records = shapes_batch(4)
    rows, tasks = pointwise._rows(images, records), [r.task for r in records]

    def asked(dim: str) -> torch.Tensor:
        pointwise.config.dimension = dim
        try:
            return pointwise.reward_rows(rows, prompts, tasks)
        finally:
            pointwise.config.dimension = "alignment"

    mean = DimensionMean.parse(pointwise, ["alignment", "quality=3"])
    torch.testing.assert_close(mean.reward_rows(rows, prompts, tasks), 0.25 * asked("alignment") + 0.75 * asked("quality"))
    assert pointwise.config.dimension == "alignment"  # the question asked is put back
    for bad, match in ((["beauty"], "unknown beauty"), (["quality=x"], "must be a number"), (["quality=0"], "positive sum")):
        with pytest.raises(UserError, match=match):
            DimensionMean.parse(pointwise, bad)



def _builtin_margins(corrupt):  # noqa: ANN001, ANN202
    """Per T2I row, the built-in pointwise model's mean over its three answers for the clean render of the
    prompt minus that for `corrupt(renders)`."""
    from qirl.rewards.base import build_reward

    images, prompts, records = shapes_batch(24, seed=11)
    t2i = [i for i, r in enumerate(records) if r.task == "t2i"]  # 12 rows
    right, rows, asked = images[t2i], [records[i] for i in t2i], [prompts[i] for i in t2i]
    other = corrupt(right)
    margin = torch.zeros(len(t2i))
    for dim in ("alignment", "fidelity", "quality"):
        rm = build_reward("vlm_pointwise", path="builtin", dimension=dim, device="cpu")
        assert rm.tasks == ("t2i",)
        assert torch.isnan(rm(images[:2], prompts[:2], records[:2])[1])  # row 1 is an edit: not judged
        margin += rm(right, asked, rows) - rm(other, asked, rows)
    return margin


def test_builtin_pointwise_prefers_a_render_to_an_empty_canvas() -> None:
    """The shipped T2I reward model (qirl/assets/rm_pointwise) loads, skips edits, and scores each
    prompt's clean render above the same canvas with the objects gone (background colour only)."""
    empty = lambda x: x[:, :, :1, :1].expand_as(x).clone()  # noqa: E731  (the corner pixel is background)
    margin = _builtin_margins(empty)
    assert float((margin > 0).float().mean()) >= 0.9, margin


def test_builtin_pointwise_prefers_the_asked_scene_to_another_prompts() -> None:
    """It reads the prompt: a clean render of another prompt's scene scores lower than the asked scene.
    (The round-0 model, trained without mismatched captions, was at chance here: docs/rewards.md.)"""
    margin = _builtin_margins(lambda x: x.roll(1, dims=0))
    assert float((margin > 0).float().mean()) >= 0.75, margin
