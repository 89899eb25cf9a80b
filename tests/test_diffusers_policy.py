"""DiffusersPolicy over tiny random-weight Qwen-Image, Qwen-Image-Edit, FLUX and SD3 pipelines (built
offline by `qirl.models.diffusers_tiny`): shapes, parity with each pipeline's own denoising loop, GRPO and
distillation iterations, LoRA export, gradient checkpointing, dtype, copies and load errors."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from qirl.errors import UserError
from qirl.models.diffusers_policy import DiffusersPolicy
from qirl.models.diffusers_tiny import TINY_FAMILIES, build_tiny_pipeline, make_tiny_pipeline
from qirl.models.policy import Condition
from qirl.models.registry import PolicyOptions, load_policy
from qirl.rewards.base import RewardModel, register_reward
from qirl.rewards.composite import RewardSpec
from qirl.sampling import timesteps

RES = 32
OPTS = PolicyOptions(resolution=RES, device="cpu", max_sequence_length=16)
PROMPTS = ["a red circle", "two blue squares left of a big green triangle"]


class _Brightness(RewardModel):
    """Mean brightness: deterministic and meaningful on random images, unlike the Shapes oracles."""

    name = "test_brightness"

    def score(self, images, prompts, records):
        return images.float().mean(dim=(1, 2, 3)).cpu()


register_reward("test_brightness")(lambda **kw: _Brightness())


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: as fast for models this small, and immune to spin-waiting on a shared CPU
    (two OpenMP threads on a busy 2-core machine made this file 4x slower: 45 s instead of 12 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family (and seed) -> folder of its tiny pipeline, built once per module on first use."""
    root = tmp_path_factory.mktemp("pipelines")
    built: dict[tuple[str, int], Path] = {}

    def get(family: str, seed: int = 0) -> Path:
        if (family, seed) not in built:
            built[family, seed] = build_tiny_pipeline(family, root / f"{family}-{seed}", seed=seed)
        return built[family, seed]

    return get


def _sources(family: str, n: int = 2) -> list[torch.Tensor | None] | None:
    """Edit sources for the edit family (uint8-exact, so the pipeline's PIL path sees the same pixels)."""
    if family != "qwen-image-edit":
        return None
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, 256, (3, RES, RES), generator=gen).float() / 255 for _ in range(n)]


# ------------------------------------------------------------------------------------------ interface


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_shapes_cfg_batch_and_roundtrip(tiny, family):
    policy = load_policy(str(tiny(family)), options=OPTS)
    assert isinstance(policy, DiffusersPolicy) and policy.family == family and not policy.training
    c, h, w = policy.latent_shape
    assert (h, w) == (RES // 4, RES // 4)
    with torch.no_grad():
        cond = policy.encode(PROMPTS, _sources(family))
        uncond = policy.null_condition(cond)
        assert cond.batch_size == uncond.batch_size == 2
        assert bool(cond.is_edit.all()) == (family == "qwen-image-edit")
        assert (cond.pooled is not None) == (family in ("flux", "sd3"))
        assert (cond.source is not None) == (family == "qwen-image-edit")
        x = torch.randn(2, c, h, w)
        t = torch.tensor([0.9, 0.4])
        v = policy.velocity(x, t, cond)
        assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
        # [cond ; uncond] as one CFG batch gives the two forwards' velocities
        both = policy.velocity(torch.cat([x, x]), torch.cat([t, t]), Condition.cat([cond, uncond]))
        v_u = policy.velocity(x, t, uncond)
        torch.testing.assert_close(both, torch.cat([v, v_u]), atol=1e-5, rtol=1e-4)
        assert (v - v_u).abs().max() > 1e-4  # the null prompt is a different condition
        images = policy.decode(x)
        assert images.shape == (2, 3, RES, RES) and images.dtype == torch.float32
        assert images.min() >= 0 and images.max() <= 1
        z = policy.encode_images(images)
        assert z.shape == x.shape and policy.decode(z).shape == images.shape


def test_mixed_batch_on_edit_model(tiny):
    """t2i rows of an edit model use Qwen-Image's template and no source tokens; a mixed batch equals its
    two halves run apart."""
    policy = load_policy(str(tiny("qwen-image-edit")), options=OPTS)
    sources = _sources("qwen-image-edit")
    with torch.no_grad():
        mixed = policy.encode(PROMPTS, [sources[0], None])
        assert mixed.is_edit.tolist() == [True, False] and mixed.source[1].abs().max() == 0
        x, t = torch.randn(2, *policy.latent_shape), torch.tensor([0.8, 0.3])
        v = policy.velocity(x, t, mixed)
        edit = policy.velocity(x[:1], t[:1], policy.encode(PROMPTS[:1], sources[:1]))
        t2i = policy.velocity(x[1:], t[1:], policy.encode(PROMPTS[1:]))
        torch.testing.assert_close(v, torch.cat([edit, t2i]), atol=1e-5, rtol=1e-4)
        null = policy.null_condition(mixed)
        assert policy.velocity(x, t, null).shape == x.shape


def _pipeline_latents(pipe, family, noise, prompt, source, monkeypatch, guidance):
    """Two steps of the pipeline's own ``__call__`` from ``noise`` [1, C, h, w] -> [1, C, h, w]."""
    b, c, h, w = noise.shape
    kwargs = dict(prompt=[prompt], height=RES, width=RES, num_inference_steps=2, output_type="latent")
    if family in ("qwen-image", "qwen-image-edit", "flux"):
        kwargs["latents"] = pipe._pack_latents(noise, b, c, h, w)
        if family != "flux":
            kwargs["max_sequence_length"] = 16
    else:
        kwargs["latents"] = noise
    if family == "qwen-image-edit":
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit
        from PIL import Image

        # the pipeline sizes its output (and resizes the source) to ~1024^2; pin it to the test resolution
        monkeypatch.setattr(pipeline_qwenimage_edit, "calculate_dimensions", lambda area, ratio: (RES, RES, None))
        kwargs["image"] = Image.fromarray((source * 255).round().byte().permute(1, 2, 0).numpy())
    if family == "flux":
        kwargs.update(max_sequence_length=16, guidance_scale=3.5)
        if guidance > 1:
            kwargs.update(negative_prompt=[""], true_cfg_scale=guidance)
    if family == "sd3":
        kwargs.update(max_sequence_length=16, guidance_scale=guidance)
    out = pipe(**kwargs)[0]
    if family == "sd3":
        return out
    side = pipe._unpack_latents(out, RES, RES, pipe.vae_scale_factor)
    return side[:, :, 0] if side.dim() == 5 else side


@pytest.mark.parametrize(
    "family,guidance",
    [("qwen-image", 1.0), ("qwen-image-edit", 1.0), ("flux", 1.0), ("flux", 2.0), ("sd3", 1.0), ("sd3", 3.0)],
)
def test_euler_steps_match_the_pipeline(tiny, family, guidance, monkeypatch):
    """The adapter's Euler steps ``x + (t' - t) v`` on the pipeline's own sigmas reproduce two steps of the
    pipeline's ``__call__`` (its encode_prompt, packing, timestep scaling, scheduler.step), which pins the
    sign, timestep and packing conventions; with CFG also the null prompt (SD3 "", FLUX "")."""
    path = tiny(family)
    policy = load_policy(str(path), options=OPTS)
    pipe = policy.pipe
    pipe.set_progress_bar_config(disable=True)
    sources = _sources(family, 1)
    noise = torch.randn(1, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = _pipeline_latents(pipe, family, noise, PROMPTS[1], sources and sources[0], monkeypatch, guidance)
        sigmas = pipe.scheduler.sigmas.tolist()  # the pipeline's shifted grid, ending at 0
        assert len(sigmas) == 3 and 0 < sigmas[1] < sigmas[0] <= 1
        if family == "flux":  # qirl's shifted grid with recommended_shift is the pipeline's dynamic shift
            assert abs(float(timesteps(2, policy.recommended_shift())[1]) - sigmas[1]) < 1e-5
        if family == "sd3":
            assert policy.recommended_shift() == 3.0
        cond = policy.encode(PROMPTS[1:], sources)
        uncond = policy.null_condition(cond)
        x = noise.clone()
        for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            t = torch.full((1,), s)
            v = policy.velocity(x, t, cond)
            if guidance > 1:
                v_u = policy.velocity(x, t, uncond)
                v = v_u + guidance * (v - v_u)
            x = x + (s_next - s) * v
    torch.testing.assert_close(x, expected.float(), atol=2e-5, rtol=1e-4)


def test_lora_targets_are_transformer_block_linears(tiny):
    for family in TINY_FAMILIES:
        policy = load_policy(str(tiny(family)), options=OPTS)
        hits = [n for n, m in policy.named_modules() if re.fullmatch(policy.default_lora_targets, n)]
        assert hits, family
        trainable = {id(p) for p in policy.trainable_parameters()}
        for name in hits:
            assert isinstance(policy.get_submodule(name), torch.nn.Linear), name
            assert id(policy.get_submodule(name).weight) in trainable, name  # no adapter on a dead module
            assert re.match(r"transformer\.(single_)?transformer_blocks\.\d+\.", name), name
        # both streams' attention projections and both MLPs of a double-stream block
        kinds = {n.split(".", 3)[3] for n in hits if ".transformer_blocks.0." in n}
        assert {"attn.to_q", "attn.add_q_proj", "attn.to_out.0"} <= kinds, (family, kinds)


def test_bf16_weights_bf16_velocity_fp32_rollout_and_checkpointing_grads(tiny):
    """bf16 weights give bf16 velocities (the fused SDE kernels read them once, in fp32 inside); the
    rollout's states and log-probs stay fp32."""
    from qirl.sampling import sample_sde

    path = str(tiny("qwen-image"))
    policy = load_policy(path, options=PolicyOptions(resolution=RES, device="cpu", dtype="bfloat16"))
    assert policy.dtype == torch.bfloat16 and policy.text_encoder.dtype == torch.bfloat16
    with torch.no_grad():
        cond = policy.encode(PROMPTS)
        v = policy.velocity(torch.randn(2, *policy.latent_shape), torch.tensor([0.5, 0.5]), cond)
        ro = sample_sde(policy, cond, 2, guidance=2.0, generator=torch.Generator().manual_seed(0))
    assert v.dtype == torch.bfloat16 and torch.isfinite(v).all()
    assert ro.latents.dtype == torch.float32 and ro.logps_old.dtype == torch.float32
    assert torch.isfinite(ro.logps_old).all() and torch.isfinite(ro.latents).all()

    def grads(checkpointing: bool) -> tuple[list[torch.Tensor], int]:
        policy = load_policy(path, options=PolicyOptions(resolution=RES, device="cpu", gradient_checkpointing=checkpointing))
        calls = []
        policy.transformer.transformer_blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
        with torch.no_grad():
            cond = policy.encode(PROMPTS)
        x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(1))
        policy.velocity(x, torch.tensor([0.7, 0.2]), cond).square().mean().backward()
        # every trainable parameter gets a gradient (the dead last-block text stream is not trainable)
        return [p.grad for p in policy.trainable_parameters()], len(calls)

    plain, n_plain = grads(False)
    ckpt, n_ckpt = grads(True)
    assert n_plain == 1 and n_ckpt == 2  # the checkpointed block ran again in backward
    for a, b in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_deepcopy_shares_frozen_parts_and_save_roundtrip(tiny, tmp_path):
    policy = load_policy(str(tiny("flux")), options=PolicyOptions(resolution=RES, device="cpu", embedded_guidance=2.0))
    assert policy.guidance_embeds and policy.embedded_guidance == 2.0
    clone = copy.deepcopy(policy)
    assert clone.text_encoder is policy.text_encoder and clone.text_encoder_2 is policy.text_encoder_2
    assert clone.vae is policy.vae and clone.pipe.tokenizer is policy.pipe.tokenizer
    assert clone.transformer is not policy.transformer and clone.pipe.transformer is clone.transformer
    with torch.no_grad():
        next(clone.transformer.parameters()).add_(1.0)
    assert not torch.equal(next(clone.transformer.parameters()), next(policy.transformer.parameters()))

    out = tmp_path / "saved"
    policy.save_pretrained(out)
    policy.save_pretrained(out)  # replaces the folder whole
    assert sorted(p.name for p in out.iterdir()) == ["qirl_policy.json", "transformer"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    meta = json.loads((out / "qirl_policy.json").read_text())
    assert meta["family"] == "flux" and Path(meta["base"]) == tiny("flux").resolve()
    loaded = load_policy(str(out))  # resolution and embedded guidance come from the saved file
    assert loaded.resolution == RES and loaded.embedded_guidance == 2.0
    with torch.no_grad():
        cond = policy.encode(PROMPTS)
        x, t = torch.randn(2, *policy.latent_shape), torch.tensor([0.6, 0.6])
        torch.testing.assert_close(loaded.velocity(x, t, cond), policy.velocity(x, t, cond))


def test_bad_folders_are_user_errors(tiny, tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        load_policy(str(tmp_path / "missing"))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model_index.json").write_text("{not json")
    with pytest.raises(UserError, match="model_index.json:1: malformed JSON"):
        load_policy(str(corrupt))
    other = tmp_path / "sd15"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(UserError, match="StableDiffusionPipeline.*not supported"):
        load_policy(str(other))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "vae": ["diffusers", "AutoencoderKL"]}))
    with pytest.raises(UserError, match="cannot load the FluxPipeline"):
        load_policy(str(broken))
    orphan = tmp_path / "orphan"
    (orphan / "transformer").mkdir(parents=True)
    (orphan / "transformer" / "config.json").write_text("{}")
    (orphan / "qirl_policy.json").write_text(json.dumps({"format": "qirl-diffusers-policy", "base": str(tmp_path / "gone")}))
    with pytest.raises(UserError, match="base pipeline not found"):
        load_policy(str(orphan))
    with pytest.raises(UserError, match="cannot edit"):
        load_policy(str(tiny("sd3")), options=OPTS).encode(["x"], [torch.rand(3, RES, RES)])


# ------------------------------------------------------------------------------------------- training


def _grpo_recipe(model: Path, family: str, out: Path, lora_rank: int = 0):
    from qirl.rl.grpo import GrpoRecipe

    r = GrpoRecipe()
    r.model = str(model)
    r.policy = PolicyOptions(resolution=RES, device="cpu", max_sequence_length=16)
    r.data.prompts = "shapes-edit" if family == "qwen-image-edit" else "shapes-t2i"
    r.rewards.models = [RewardSpec(name="test_brightness", weight=1.0)]
    r.sampling.num_steps, r.sampling.window_size = 3, 2
    # FLUX.1-dev is guidance-distilled: no CFG (the embedded guidance does it)
    r.sampling.guidance = 1.0 if family == "flux" else 3.0
    r.train.iterations, r.train.prompts_per_iter, r.train.group_size, r.train.micro_batch = 1, 2, 2, 4
    r.train.lr, r.train.reward_workers = 1e-3, 1
    r.train.lora_rank = lora_rank
    r.eval.every = 0
    r.run.out_dir, r.run.checkpoint_every, r.run.tensorboard = str(out), 1, False
    return r


def _transformer_state(policy) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in policy.transformer.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    assert before.keys() == after.keys()
    return any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("family,lora_rank", [(f, 0) for f in TINY_FAMILIES] + [("qwen-image-edit", 2)])
def test_grpo_iteration(tiny, tmp_path, family, lora_rank):
    from qirl.rl.grpo import grpo

    path = tiny(family)
    rows = list(grpo(_grpo_recipe(path, family, tmp_path / "run", lora_rank)))
    first, done = rows[0], rows[-1]
    assert done["done"] and first["step"] == 1
    assert torch.isfinite(torch.tensor(first["loss"])) and first["skipped"] == 0
    assert abs(first["ratio_mean"] - 1) < 1e-5 and first["grad_norm"] > 0
    model = tmp_path / "run" / "model"
    assert (model / "qirl_policy.json").is_file()
    trained = load_policy(str(tmp_path / "run"), options=OPTS)  # a run folder resolves to its model/
    base = load_policy(str(path), options=OPTS)
    after = _transformer_state(trained)
    assert _changed(_transformer_state(base), after)
    if lora_rank:  # exported merged: plain diffusers weights, no adapter keys
        assert not [k for k in after if "lora" in k]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_distill_iteration(tiny, tmp_path, family):
    from qirl.rl.distill import DistillRecipe, distill

    task = "edit" if family == "qwen-image-edit" else "t2i"
    r = DistillRecipe()
    r.student = str(tiny(family))
    r.teachers = {task: str(tiny(family, seed=1))}  # another random model: the loss is not 0
    r.policy = PolicyOptions(resolution=RES, device="cpu", max_sequence_length=16)
    r.data.prompts = f"shapes-{task}"
    r.rollout.num_steps, r.rollout.guidance = 2, 1.0
    r.train.iterations, r.train.prompts_per_iter, r.train.micro_batch, r.train.lr = 1, 2, 2, 1e-3
    r.eval.every = 0
    r.run.out_dir, r.run.tensorboard = str(tmp_path / "d"), False
    rows = list(distill(r))
    first = rows[0]
    assert torch.isfinite(torch.tensor(first["loss"])) and first["loss"] > 0 and first["skipped"] == 0
    trained = load_policy(str(tmp_path / "d" / "model"), options=OPTS)
    assert _changed(_transformer_state(load_policy(r.student, options=OPTS)), _transformer_state(trained))


def test_make_tiny_pipeline_rejects_unknown_family():
    with pytest.raises(UserError, match="tiny pipeline family"):
        make_tiny_pipeline("sdxl")
