"""Tests for qirl.sampling: time grid and shift, sign conventions of the Euler ODE, CFG, determinism."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import Tensor

from qirl.errors import UserError
from qirl.models.policy import Condition, FlowPolicy
from qirl.models.text import build_tokenizer
from qirl.models.tiny_dit import TinyDiT, TinyDiTConfig
from qirl.sampling import (
    add_noise,
    euler_step,
    flow_matching_loss,
    guided_velocity,
    sample_images,
    sample_ode,
    shift_time,
    timesteps,
)

SHAPE = (3, 8, 8)


class OraclePolicy:
    """A policy whose velocity is exactly the flow-matching target for one known x0 per row.

    On the straight path ``x_t = (1 - t) x0 + t eps`` the target ``eps - x0`` equals ``(x_t - x0) / t``;
    the conditional branch aims at ``x0`` and the unconditional one at ``-x0``, so CFG is checkable.
    """

    def __init__(self, x0: Tensor) -> None:
        self.x0 = x0  # [B, C, H, W]
        self.calls: list[int] = []

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.x0.shape[1:])  # type: ignore[return-value]

    @property
    def image_size(self) -> int:
        return int(self.x0.shape[-1])

    @property
    def device(self) -> torch.device:
        return self.x0.device

    @property
    def dtype(self) -> torch.dtype:
        return self.x0.dtype

    def encode(self, prompts: Sequence[str], sources: Sequence[Tensor | None] | None = None) -> Condition:
        b = len(prompts)
        return Condition(
            text=torch.ones(b, 1, 1),
            is_edit=torch.zeros(b, dtype=torch.bool),
            extras={"row": torch.arange(b)},
        )

    def null_condition(self, cond: Condition) -> Condition:
        return Condition(text=-torch.ones_like(cond.text), is_edit=cond.is_edit, extras=dict(cond.extras))

    def velocity(self, x_t: Tensor, t: Tensor, cond: Condition) -> Tensor:
        self.calls.append(x_t.shape[0])
        target = self.x0[cond.extras["row"]] * cond.text[:, 0, 0].view(-1, 1, 1, 1)  # [B, C, H, W]
        return (x_t - target) / t.view(-1, 1, 1, 1)

    def encode_images(self, images: Tensor) -> Tensor:
        return images * 2 - 1

    def decode(self, latents: Tensor) -> Tensor:
        return ((latents + 1) / 2).clamp(0, 1)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return []


@pytest.fixture()
def oracle() -> OraclePolicy:
    return OraclePolicy(torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(3)))


# ------------------------------------------------------------------------------------------ timesteps


def test_timesteps_endpoints_and_monotone() -> None:
    for shift in (1.0, 0.5, 3.0):
        t = timesteps(10, shift)
        assert t.shape == (11,) and t.dtype == torch.float32
        assert t[0] == 1.0 and t[-1] == 0.0
        assert (t[1:] < t[:-1]).all()
    torch.testing.assert_close(timesteps(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


def test_shift_formula() -> None:
    t = torch.linspace(0, 1, 11)
    torch.testing.assert_close(shift_time(t, 3.0), 3.0 * t / (1 + 2.0 * t))
    torch.testing.assert_close(shift_time(t, 1.0), t)
    assert (shift_time(t, 3.0) >= t).all()  # shift > 1 spends more steps near noise
    torch.testing.assert_close(timesteps(4, 3.0), shift_time(timesteps(4), 3.0))
    with pytest.raises(UserError, match="num_steps"):
        timesteps(0)
    with pytest.raises(UserError, match="shift"):
        timesteps(4, shift=0.0)


def test_shift_matches_diffusers() -> None:
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(sigmas=timesteps(8)[:-1].tolist())
    torch.testing.assert_close(scheduler.sigmas.float(), timesteps(8, 3.0))


# ------------------------------------------------------------------------------------------ ODE


def test_euler_step_sign() -> None:
    x, v = torch.zeros(2, *SHAPE), torch.ones(2, *SHAPE)
    # moving from t = 1 towards t = 0.75 subtracts 0.25 v (v points from data to noise)
    torch.testing.assert_close(euler_step(x, v, 1.0, 0.75), x - 0.25)
    torch.testing.assert_close(euler_step(x, v, torch.tensor([1.0, 0.5]), torch.tensor([0.5, 0.5]))[1], x[1])


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_ode_lands_on_data(oracle: OraclePolicy, shift: float) -> None:
    """With the exact velocity the path is a straight line, Euler is exact, and x_0 is reached."""
    assert isinstance(oracle, FlowPolicy)
    cond = oracle.encode(["p"] * 4)
    noise = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(0))
    latents, traj = sample_ode(oracle, cond, 6, shift=shift, noise=noise, return_trajectory=True)
    assert traj.shape == (7, 4, *SHAPE)
    torch.testing.assert_close(traj[0], noise)
    torch.testing.assert_close(latents, oracle.x0, atol=1e-5, rtol=1e-5)
    assert torch.equal(traj[-1], latents)
    for n, t in enumerate(timesteps(6, shift)):
        torch.testing.assert_close(traj[n], add_noise(oracle.x0, noise, t.expand(4)), atol=1e-5, rtol=1e-5)


def test_flow_matching_loss_zero_for_exact_velocity(oracle: OraclePolicy) -> None:
    cond = oracle.encode(["p"] * 4)
    loss = flow_matching_loss(oracle, oracle.x0, cond, generator=torch.Generator().manual_seed(0))
    assert loss.item() < 1e-8


# ------------------------------------------------------------------------------------------ CFG


def test_guidance_one_is_conditional(oracle: OraclePolicy) -> None:
    cond = oracle.encode(["p"] * 4)
    uncond = oracle.null_condition(cond)
    x, t = torch.randn(4, *SHAPE), torch.full((4,), 0.5)
    v_c = oracle.velocity(x, t, cond)
    oracle.calls.clear()
    torch.testing.assert_close(guided_velocity(oracle, x, t, cond, uncond, 1.0), v_c)
    torch.testing.assert_close(guided_velocity(oracle, x, t, cond, None, 5.0), v_c)
    assert oracle.calls == [4, 4]  # one conditional pass each
    v_u = oracle.velocity(x, t, uncond)
    oracle.calls.clear()
    torch.testing.assert_close(guided_velocity(oracle, x, t, cond, uncond, 4.0), v_u + 4.0 * (v_c - v_u))
    assert oracle.calls == [8]  # both branches in one batch


def test_guided_ode_follows_formula(oracle: OraclePolicy) -> None:
    """Target x0 for cond and -x0 for uncond: guided target is -x0 + s (2 x0) at every step."""
    cond = oracle.encode(["p"] * 4)
    latents = sample_ode(oracle, cond, 5, guidance=2.5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(latents, (-1 + 2.5 * 2) * oracle.x0, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------ tiny DiT


@pytest.fixture(scope="module")
def model() -> TinyDiT:
    tokenizer = build_tokenizer(
        ["a red circle left of a blue square", "make the circle green", "remove the square"]
    )
    torch.manual_seed(0)
    m = TinyDiT(TinyDiTConfig(dim=32, depth=2, heads=2, text_dim=32, text_depth=1, text_heads=2), tokenizer)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if ("ada" in name or name.startswith("out.")) and p.abs().sum() == 0:
                p.normal_(std=0.05)
    return m.eval()


def test_batched_cfg_matches_two_passes(model: TinyDiT) -> None:
    src = torch.rand(3, 32, 32)
    with torch.no_grad():
        cond = model.encode(["a red circle left of a blue square", "make the circle green"], [None, src])
        uncond = model.null_condition(cond)
        x, t = torch.randn(2, 3, 32, 32), torch.tensor([0.9, 0.3])
        v_c, v_u = model.velocity(x, t, cond), model.velocity(x, t, uncond)
        v = guided_velocity(model, x, t, cond, uncond, 3.0)
    torch.testing.assert_close(v, v_u + 3.0 * (v_c - v_u), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided_velocity(model, x, t, cond, uncond, 1.0), v_c)


def test_sampling_is_deterministic(model: TinyDiT) -> None:
    prompts = ["a red circle left of a blue square", "remove the square"]
    sources = [None, torch.rand(3, 32, 32)]

    def run(seed: int) -> Tensor:
        return sample_images(
            model,
            prompts,
            sources,
            num_steps=3,
            guidance=2.0,
            shift=2.0,
            generator=torch.Generator().manual_seed(seed),
        )

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (2, 3, 32, 32) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sample_ode_checks_noise_shape(model: TinyDiT) -> None:
    cond = model.encode(["remove the square"])
    with pytest.raises(ValueError, match="noise"):
        sample_ode(model, cond, 2, noise=torch.randn(2, 3, 32, 32))
