"""Tests for qirl.models: attention dispatch, tokenizer/text encoder, Condition, the tiny DiT, checkpoints."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qirl.errors import UserError
from qirl.models import attention as attn_mod
from qirl.models.attention import attention, attention_backend, attention_math, set_attention_backend
from qirl.models.policy import Condition, FlowPolicy
from qirl.models.text import CLS_ID, PAD_ID, UNK_ID, build_tokenizer, load_tokenizer, save_tokenizer, tokenize
from qirl.models.tiny_dit import TinyDiT, TinyDiTConfig
from qirl.sampling import flow_matching_loss

CORPUS = [
    "a red circle left of a small blue square on a black background.",
    "make the red circle green",
    "remove the square",
    "change the background to white",
    "a large yellow triangle above a purple star",
]
SMALL = TinyDiTConfig(dim=32, depth=2, heads=2, text_dim=32, text_depth=1, text_heads=2, max_text_len=16)


@pytest.fixture(autouse=True)
def _reset_backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("QIRL_ATTENTION", raising=False)
    set_attention_backend(None)
    yield
    set_attention_backend(None)


@pytest.fixture(scope="module")
def tokenizer():  # noqa: ANN201 - tokenizers.Tokenizer
    return build_tokenizer(CORPUS)


def make_model(tokenizer, config: TinyDiTConfig = SMALL, seed: int = 0, randomize: bool = True) -> TinyDiT:  # noqa: ANN001
    """A small model; ``randomize`` replaces the zero-initialised layers so the output depends on inputs."""
    torch.manual_seed(seed)
    model = TinyDiT(config, tokenizer)
    if randomize:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ("ada" in name or name.startswith("out.")) and p.abs().sum() == 0:
                    p.normal_(std=0.05)
    return model


def images(b: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, 32, 32, generator=g)  # [B, 3, 32, 32]


# ------------------------------------------------------------------------------------------ attention


def qkv(b: int = 2, h: int = 3, lq: int = 7, lk: int = 7, dh: int = 8) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randn(b, h, n, dh, generator=g) for n in (lq, lk, lk))


class TestAttention:
    def test_cpu_auto_chooses_sdpa(self) -> None:
        q, _, _ = qkv()
        assert attention_backend(q) == "sdpa"

    def test_env_and_override(self, monkeypatch: pytest.MonkeyPatch) -> None:
        q, _, _ = qkv()
        monkeypatch.setenv("QIRL_ATTENTION", "math")
        set_attention_backend(None)
        assert attention_backend(q) == "math"
        set_attention_backend("sdpa")
        assert attention_backend(q) == "sdpa"

    def test_bad_names_are_user_errors(self, monkeypatch: pytest.MonkeyPatch) -> None:
        with pytest.raises(UserError, match="not an attention backend"):
            set_attention_backend("xformers")
        monkeypatch.setenv("QIRL_ATTENTION", "fast")
        set_attention_backend(None)
        with pytest.raises(UserError, match="QIRL_ATTENTION"):
            attention_backend(qkv()[0])

    def test_flash_on_cpu_is_user_error(self) -> None:
        q, k, v = qkv()
        with pytest.raises(UserError, match="flash"):
            set_attention_backend("flash")  # raises here when flash_attn is missing
            attention(q, k, v)  # or here, on CPU float32

    def test_logged_once(self, caplog: pytest.LogCaptureFixture) -> None:
        q, k, v = qkv()
        with caplog.at_level(logging.INFO, logger=attn_mod.__name__):
            attention(q, k, v)
            attention(q, k, v)
        assert sum("attention backend" in r.getMessage() for r in caplog.records) == 1

    @pytest.mark.parametrize("masked", [False, True])
    def test_math_matches_sdpa(self, masked: bool) -> None:
        q, k, v = qkv(lq=5, lk=9)
        mask = torch.zeros(2, 9, dtype=torch.bool)
        mask[0, 6:] = True
        mask[1, 2] = True
        mask = mask if masked else None
        set_attention_backend("sdpa")
        out_sdpa = attention(q, k, v, mask)
        set_attention_backend("math")
        out_math = attention(q, k, v, mask)
        assert out_sdpa.shape == (2, 3, 5, 8)
        torch.testing.assert_close(out_sdpa, out_math, atol=1e-5, rtol=1e-5)

    @pytest.mark.parametrize("backend", ["sdpa", "math"])
    def test_padding_is_ignored(self, backend: str) -> None:
        set_attention_backend(backend)
        q, k, v = qkv(lk=6)
        mask = torch.tensor([[False] * 4 + [True] * 2, [False] * 6])
        out = attention(q, k, v, mask)
        k2, v2 = k.clone(), v.clone()
        k2[0, :, 4:] = 100.0
        v2[0, :, 4:] = -100.0
        torch.testing.assert_close(attention(q, k2, v2, mask), out)
        # and it equals attention over the unpadded keys alone
        torch.testing.assert_close(
            out[:1], attention_math(q[:1], k[:1, :, :4], v[:1, :, :4]), atol=1e-5, rtol=1e-5
        )

    @pytest.mark.gpu
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_cuda_auto_matches_math(self, dtype: torch.dtype) -> None:
        if not torch.cuda.is_available():
            pytest.skip("needs CUDA")
        q, k, v = (x.cuda() for x in qkv(b=3, h=4, lq=37, lk=37, dh=64))
        mask = torch.zeros(3, 37, dtype=torch.bool, device="cuda")
        mask[0, 30:] = True
        mask[2, 5:] = True
        ref = attention_math(q, k, v, mask)
        out = attention(q.to(dtype), k.to(dtype), v.to(dtype), mask)
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------------------------------ tokenizer


class TestText:
    def test_unknown_words_and_case(self, tokenizer) -> None:  # noqa: ANN001
        ids = tokenizer.encode("A Red hexagon.").ids
        vocab = tokenizer.get_vocab()
        assert ids == [CLS_ID, vocab["a"], vocab["red"], UNK_ID, vocab["."]]

    def test_round_trip_and_stable_ids(self, tokenizer, tmp_path: Path) -> None:  # noqa: ANN001
        text = "make the red circle green"
        assert tokenizer.decode(tokenizer.encode(text).ids) == text
        assert build_tokenizer(reversed(CORPUS)).get_vocab() == tokenizer.get_vocab()
        save_tokenizer(tokenizer, tmp_path / "tokenizer.json")
        loaded = load_tokenizer(tmp_path / "tokenizer.json")
        assert loaded.encode(text).ids == tokenizer.encode(text).ids

    def test_load_errors(self, tmp_path: Path) -> None:
        with pytest.raises(UserError, match="tokenizer.json"):
            load_tokenizer(tmp_path / "tokenizer.json")
        (tmp_path / "tokenizer.json").write_text("{not json")
        with pytest.raises(UserError, match="tokenizer.json"):
            load_tokenizer(tmp_path / "tokenizer.json")

    def test_tokenize_pads_to_longest(self, tokenizer) -> None:  # noqa: ANN001
        ids, mask = tokenize(tokenizer, ["remove the square", ""], max_len=16)
        assert ids.shape == mask.shape == (2, 4)
        assert ids[1, 0] == CLS_ID and (ids[1, 1:] == PAD_ID).all()
        assert mask.tolist() == [[False] * 4, [False, True, True, True]]
        ids, _ = tokenize(tokenizer, [CORPUS[0]], max_len=5)
        assert ids.shape == (1, 5)


# ------------------------------------------------------------------------------------------ condition


def test_condition_helpers() -> None:
    cond = Condition(
        text=torch.randn(3, 4, 8),
        is_edit=torch.tensor([True, False, True]),
        key_padding_mask=torch.tensor([[False, False, True, True]] * 3),
        pooled=torch.randn(3, 8),
        source=torch.randn(3, 3, 32, 32),
        extras={"ids": torch.arange(3)},
    )
    rep = cond.repeat_interleave(2)
    assert rep.batch_size == 6 and rep.is_edit.tolist() == [True, True, False, False, True, True]
    assert rep.extras["ids"].tolist() == [0, 0, 1, 1, 2, 2]
    one = cond.index(1)
    assert one.batch_size == 1 and one.source is not None and one.source.shape == (1, 3, 32, 32)
    assert cond.index([2, 0]).extras["ids"].tolist() == [2, 0]
    assert cond.to(dtype=torch.float16).text.dtype == torch.float16
    assert cond.to(dtype=torch.float16).key_padding_mask.dtype == torch.bool  # type: ignore[union-attr]

    short = Condition(
        text=torch.randn(3, 1, 8),
        is_edit=torch.zeros(3, dtype=torch.bool),
        pooled=torch.randn(3, 8),
        extras={"ids": torch.arange(3)},
    )
    both = Condition.cat([cond, short])
    assert both.text.shape == (6, 4, 8)
    assert (
        both.key_padding_mask is not None
        and both.key_padding_mask[3:].tolist() == [[False, True, True, True]] * 3
    )
    assert both.source is not None and both.source[3:].abs().sum() == 0
    with pytest.raises(ValueError, match="batch"):
        Condition(text=torch.randn(3, 4, 8), is_edit=torch.zeros(2, dtype=torch.bool))


# ------------------------------------------------------------------------------------------ tiny DiT


class TestTinyDiT:
    def test_is_flow_policy_and_default_size(self, tokenizer) -> None:  # noqa: ANN001
        model = TinyDiT(TinyDiTConfig(), tokenizer)
        assert isinstance(model, FlowPolicy)
        assert model.latent_shape == (3, 32, 32)
        assert 1_000_000 <= model.num_parameters() <= 4_000_000
        names = {id(p) for p in model.trainable_parameters()}
        assert not any(id(p) in names for p in model.text_encoder.parameters())
        assert len(model.trainable_parameters(include_text_encoder=True)) == len(list(model.parameters()))

    def test_zero_init_velocity(self, tokenizer) -> None:  # noqa: ANN001
        model = make_model(tokenizer, randomize=False)
        cond = model.encode(["a red circle", "make the red circle green"], [None, images(1)[0]])
        v = model.velocity(torch.randn(2, 3, 32, 32), torch.rand(2), cond)
        assert v.shape == (2, 3, 32, 32)
        assert v.abs().max() == 0

    def test_shapes_t2i_edit_mixed(self, tokenizer) -> None:  # noqa: ANN001
        model = make_model(tokenizer)
        src = images(2)
        x, t = torch.randn(3, 3, 32, 32), torch.rand(3)
        t2i = model.encode(["a red circle", "remove the square", "a blue star"])
        assert t2i.source is None and not t2i.is_edit.any()
        assert t2i.text.shape[:2] == t2i.key_padding_mask.shape and t2i.pooled.shape == (3, 32)  # type: ignore[union-attr]
        mixed = model.encode(
            ["make the red circle green", "a red circle", "remove the square"], [src[0], None, src[1]]
        )
        assert mixed.is_edit.tolist() == [True, False, True]
        assert mixed.source is not None and mixed.source[1].abs().sum() == 0
        torch.testing.assert_close(mixed.source[2], src[1] * 2 - 1)
        for cond in (t2i, mixed):
            v = model.velocity(x, t, cond)
            assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
        # the source image and the task reach the output
        assert not torch.allclose(model.velocity(x, t, mixed)[1], model.velocity(x, t, t2i)[1])
        other = model.encode(["make the red circle green"] * 3, [images(1, seed=5)[0], None, src[1]])
        assert not torch.allclose(model.velocity(x, t, mixed)[0], model.velocity(x, t, other)[0])
        # scalar t broadcasts
        assert model.velocity(x, torch.tensor(0.5), t2i).shape == x.shape

    @pytest.mark.parametrize("conditioning", ["channel", "sequence"])
    def test_mixed_batch_equals_rows_one_by_one(self, tokenizer, conditioning: str) -> None:  # noqa: ANN001
        """Either edit conditioning: a mixed T2I + edit batch gives each row what it gives alone, the
        source reaches only the edit rows, and gradients reach the source projection."""
        model = make_model(tokenizer, replace(SMALL, edit_conditioning=conditioning))
        src = images(2)
        prompts, sources = ["make the red circle green", "a red circle", "remove the square"], [src[0], None, src[1]]
        x, t = torch.randn(3, 3, 32, 32), torch.rand(3)
        v = model.velocity(x, t, model.encode(prompts, sources))  # [3, 3, 32, 32]
        for i in range(3):
            alone = model.velocity(x[i : i + 1], t[i : i + 1], model.encode([prompts[i]], [sources[i]]))
            torch.testing.assert_close(alone, v[i : i + 1], atol=1e-5, rtol=1e-5)
        other = model.velocity(x, t, model.encode(prompts, [images(1, seed=9)[0], None, src[1]]))
        assert not torch.allclose(other[0], v[0]) and torch.allclose(other[1:], v[1:], atol=1e-6)
        v[0].sum().backward()
        source_proj = model.source_embed if conditioning == "sequence" else model.patch_embed
        assert source_proj.weight.grad is not None and source_proj.weight.grad.abs().sum() > 0

    def test_unknown_edit_conditioning_is_user_error(self, tokenizer) -> None:  # noqa: ANN001
        with pytest.raises(UserError, match="edit_conditioning"):
            TinyDiTConfig.from_dict({"edit_conditioning": "film"})

    def test_null_condition_keeps_source(self, tokenizer) -> None:  # noqa: ANN001
        model = make_model(tokenizer)
        cond = model.encode(["make the red circle green", "a red circle"], [images(1)[0], None])
        null = model.null_condition(cond)
        assert null.text.shape[:2] == (2, 1) and null.source is cond.source
        assert null.is_edit.tolist() == [True, False]
        empty = model.encode(["", ""], [images(1)[0], None])
        x, t = torch.randn(2, 3, 32, 32), torch.rand(2)
        torch.testing.assert_close(model.velocity(x, t, null), model.velocity(x, t, empty))

    def test_padded_text_tokens_change_nothing(self, tokenizer) -> None:  # noqa: ANN001
        model = make_model(tokenizer)
        cond = model.encode(["a red circle left of a small blue square", "remove the square"])
        assert cond.key_padding_mask is not None and cond.key_padding_mask[1].any()
        x, t = torch.randn(2, 3, 32, 32), torch.rand(2)
        v = model.velocity(x, t, cond)
        text = cond.text.clone()
        text[1, cond.key_padding_mask[1]] = 50.0
        changed = Condition(
            text=text,
            is_edit=cond.is_edit,
            key_padding_mask=cond.key_padding_mask,
            pooled=cond.pooled,
            source=cond.source,
        )
        torch.testing.assert_close(model.velocity(x, t, changed), v)
        # and the padded row equals the same prompt encoded alone (no padding)
        alone = model.encode(["remove the square"])
        torch.testing.assert_close(model.velocity(x[1:], t[1:], alone), v[1:], atol=1e-5, rtol=1e-5)

    def test_user_errors(self, tokenizer) -> None:  # noqa: ANN001
        model = make_model(tokenizer)
        with pytest.raises(UserError, match="source image 0"):
            model.encode(["make it green"], [torch.rand(3, 64, 64)])
        with pytest.raises(UserError, match="source images"):
            model.encode(["a", "b"], [None])
        with pytest.raises(UserError, match="single string"):
            model.encode("a red circle")
        with pytest.raises(UserError, match="shape"):
            model.encode_images(torch.rand(2, 3, 16, 16))
        with pytest.raises(UserError, match="vocab_size"):
            TinyDiT(TinyDiTConfig(vocab_size=7), tokenizer)

    def test_encode_decode_round_trip(self, tokenizer) -> None:  # noqa: ANN001
        model = make_model(tokenizer)
        x = images(2)
        z = model.encode_images(x)
        assert z.min() >= -1 and z.max() <= 1
        torch.testing.assert_close(model.decode(z), x)


# ------------------------------------------------------------------------------------------ checkpoints


class TestCheckpoint:
    def _setup(self, tokenizer, tmp_path: Path, dtype: torch.dtype | None = None):  # noqa: ANN001, ANN202
        model = make_model(tokenizer)
        model.save_pretrained(tmp_path / "ckpt", dtype=dtype)
        cond = model.encode(["make the red circle green", "a blue star"], [images(1)[0], None])
        return model, cond, torch.randn(2, 3, 32, 32), torch.rand(2)

    def test_round_trip_identical(self, tokenizer, tmp_path: Path) -> None:  # noqa: ANN001
        model, cond, x, t = self._setup(tokenizer, tmp_path)
        assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {
            "model.safetensors",
            "config.json",
            "tokenizer.json",
        }
        loaded = TinyDiT.from_pretrained(tmp_path / "ckpt")
        assert loaded.config == model.config
        cond2 = loaded.encode(["make the red circle green", "a blue star"], [images(1)[0], None])
        assert torch.equal(loaded.velocity(x, t, cond2), model.velocity(x, t, cond))

    def test_bf16_weights(self, tokenizer, tmp_path: Path) -> None:  # noqa: ANN001
        model, cond, x, t = self._setup(tokenizer, tmp_path, dtype=torch.bfloat16)
        stored = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
        assert all(v.dtype == torch.bfloat16 for v in stored.values())
        loaded = TinyDiT.from_pretrained(tmp_path / "ckpt")
        assert loaded.dtype == torch.float32
        v = model.velocity(x, t, cond)
        v2 = loaded.velocity(
            x, t, loaded.encode(["make the red circle green", "a blue star"], [images(1)[0], None])
        )
        torch.testing.assert_close(v2, v, atol=5e-2, rtol=5e-2)

    def test_missing_and_corrupt_files(self, tokenizer, tmp_path: Path) -> None:  # noqa: ANN001
        self._setup(tokenizer, tmp_path)
        ckpt = tmp_path / "ckpt"
        with pytest.raises(UserError, match="not found"):
            TinyDiT.from_pretrained(tmp_path / "nope")
        weights = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(weights[: len(weights) // 2])
        with pytest.raises(UserError, match="model.safetensors"):
            TinyDiT.from_pretrained(ckpt)
        (ckpt / "model.safetensors").unlink()
        with pytest.raises(UserError, match="model.safetensors"):
            TinyDiT.from_pretrained(ckpt)
        (ckpt / "config.json").write_text("{")
        with pytest.raises(UserError, match="config.json"):
            TinyDiT.from_pretrained(ckpt)
        (ckpt / "tokenizer.json").unlink()
        (ckpt / "config.json").unlink()
        with pytest.raises(UserError, match="config.json"):
            TinyDiT.from_pretrained(ckpt)

    def test_config_mismatch(self, tokenizer, tmp_path: Path) -> None:  # noqa: ANN001
        self._setup(tokenizer, tmp_path)
        config_path = tmp_path / "ckpt" / "config.json"
        config = json.loads(config_path.read_text())
        config_path.write_text(json.dumps({**config, "depth": 3}))
        with pytest.raises(UserError, match="do not match config.json"):
            TinyDiT.from_pretrained(tmp_path / "ckpt")
        config_path.write_text(json.dumps({**config, "depht": 3}))
        with pytest.raises(UserError, match="unknown TinyDiT config key"):
            TinyDiT.from_pretrained(tmp_path / "ckpt")
        config_path.write_text(json.dumps({**config, "vocab_size": 5}))
        with pytest.raises(UserError, match="vocab_size"):
            TinyDiT.from_pretrained(tmp_path / "ckpt")


# ------------------------------------------------------------------------------------------ training


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """One intra-op thread: as fast for a model this small, and immune to spin-waiting when the
    shared CPU is oversubscribed (two OpenMP threads on a busy core once made this test 30x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_overfit_one_image(tokenizer, one_thread: None) -> None:  # noqa: ANN001
    """Flow-matching on one (image, prompt) pair: the loss on a fixed evaluation batch must fall."""
    torch.manual_seed(0)
    model = TinyDiT(SMALL, tokenizer)
    image = torch.zeros(1, 3, 32, 32)
    image[:, 0, 8:24, 8:24] = 1.0  # a red square on black
    x0 = model.encode_images(image).expand(16, -1, -1, -1)  # [16, 3, 32, 32]
    g = torch.Generator().manual_seed(0)
    eval_noise = torch.randn(16, 3, 32, 32, generator=g)
    eval_t = torch.linspace(0.05, 0.95, 16)

    def eval_loss() -> float:
        with torch.no_grad():
            cond = model.encode(["a red square"] * 16)
            return flow_matching_loss(model, x0, cond, t=eval_t, noise=eval_noise).item()

    before = eval_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(120):
        loss = flow_matching_loss(model, x0, model.encode(["a red square"] * 16), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.5 * before, (before, after)
