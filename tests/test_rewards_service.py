"""RewardService: futures, column order, faults as NaN, real overlap, one thread at a time per reward."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest
import torch

from qirl.rewards.base import RewardModel, RewardRecord
from qirl.rewards.service import RewardService

SLOW = 0.3  # seconds a slow reward sleeps; overlap tests compare ~SLOW against ~n * SLOW


class Brightness(RewardModel):
    name = "brightness"

    def score(self, images, prompts, records):
        return images.float().mean(dim=(1, 2, 3))


class Constant(RewardModel):
    def __init__(self, value: float) -> None:
        self.value = value

    def score(self, images, prompts, records):
        return torch.full((images.shape[0],), self.value)


class Slow(RewardModel):
    """Sleeps (releasing the GIL, like a torch op or a socket) and records how many calls overlap."""

    def __init__(self, seconds: float = SLOW, thread_safe: bool = False) -> None:
        self.seconds, self.thread_safe = seconds, thread_safe
        self.inside = 0
        self.max_inside = 0
        self._lock = threading.Lock()

    def score(self, images, prompts, records):
        with self._lock:
            self.inside += 1
            self.max_inside = max(self.max_inside, self.inside)
        time.sleep(self.seconds)
        with self._lock:
            self.inside -= 1
        return torch.ones(images.shape[0])


class Raising(RewardModel):
    def score(self, images, prompts, records):
        raise RuntimeError("scorer exploded")


class WrongShape(RewardModel):
    def score(self, images, prompts, records):
        return torch.zeros(images.shape[0] + 1)


def batch(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), [f"p{i}" for i in range(n)]


def test_future_gives_columns_in_mapping_order():
    images, prompts = batch(5)
    with RewardService({"c": Constant(0.25), "b": Brightness(), "a": Constant(0.75)}) as svc:
        assert svc.names == ("c", "b", "a")
        out = svc.submit(images, prompts).result(timeout=10)
    assert out.shape == (5, 3) and out.dtype == torch.float32
    torch.testing.assert_close(out[:, 0], torch.full((5,), 0.25))
    torch.testing.assert_close(out[:, 1], images.mean(dim=(1, 2, 3)))
    torch.testing.assert_close(out[:, 2], torch.full((5,), 0.75))


def test_many_batches_keep_their_own_rows():
    with RewardService({"b": Brightness(), "c": Constant(1.0)}, workers=3) as svc:
        batches = [batch(3, seed) for seed in range(8)]
        futs = [svc.submit(imgs, prompts) for imgs, prompts in batches]
        for (imgs, _), fut in zip(batches, futs, strict=True):
            torch.testing.assert_close(fut.result(timeout=10)[:, 0], imgs.mean(dim=(1, 2, 3)))


def test_names_subset_and_records_passed_through():
    seen: list[Sequence[RewardRecord]] = []

    class Recorder(RewardModel):
        def score(self, images, prompts, records):
            seen.append(records)
            return torch.zeros(images.shape[0])

    images, prompts = batch(2)
    src = images[0]
    recs = [RewardRecord(task="edit", category="portrait", source=src), RewardRecord()]
    with RewardService({"r": Recorder(), "b": Brightness()}) as svc:
        out = svc.score(images, prompts, recs, names=["b"])
        assert out.shape == (2, 1) and not seen
        svc.score(images, prompts, recs)
    assert seen[0][0].category == "portrait" and seen[0][0].source is src


def test_raising_reward_gives_nan_column_and_counts_faults(caplog):
    images, prompts = batch(3)
    with RewardService({"ok": Constant(0.5), "bad": Raising(), "shape": WrongShape()}) as svc:
        for _ in range(3):
            out = svc.submit(images, prompts).result(timeout=10)
            assert torch.all(out[:, 0] == 0.5)
            assert torch.isnan(out[:, 1]).all() and torch.isnan(out[:, 2]).all()
        assert svc.faults == {"ok": 0, "bad": 3, "shape": 3}
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2  # the first fault of each reward only


def test_submit_returns_at_once_and_batches_overlap():
    slow = Slow(thread_safe=True)
    images, prompts = batch(2)
    with RewardService({"slow": slow}, workers=4) as svc:
        t0 = time.perf_counter()
        futs = [svc.submit(images, prompts) for _ in range(4)]
        assert time.perf_counter() - t0 < SLOW / 2  # the trainer is free to roll out meanwhile
        for f in futs:
            f.result(timeout=10)
        elapsed = time.perf_counter() - t0
    assert slow.max_inside > 1
    assert elapsed < 2.5 * SLOW, elapsed  # ~max, not ~sum (4 * SLOW)


def test_rewards_of_one_batch_run_side_by_side():
    images, prompts = batch(2)
    with RewardService({"a": Slow(), "b": Slow(), "c": Slow()}, workers=3) as svc:
        t0 = time.perf_counter()
        svc.submit(images, prompts).result(timeout=10)
        assert time.perf_counter() - t0 < 2 * SLOW


def test_non_thread_safe_reward_is_entered_by_one_thread_at_a_time():
    slow = Slow(seconds=0.05)
    images, prompts = batch(2)
    with RewardService({"slow": slow}, workers=4) as svc:
        for f in [svc.submit(images, prompts) for _ in range(4)]:
            f.result(timeout=10)
    assert slow.max_inside == 1


def test_scoring_runs_without_grad():
    class GradProbe(RewardModel):
        def score(self, images, prompts, records):
            return torch.full((images.shape[0],), float(torch.is_grad_enabled()))

    images, prompts = batch(2)
    with RewardService({"g": GradProbe()}) as svc:
        assert torch.all(svc.score(images, prompts) == 0)


def test_caller_bugs_raise_and_closed_service_refuses():
    images, prompts = batch(2)
    svc = RewardService({"b": Brightness()})
    with pytest.raises(ValueError, match="records"):
        svc.submit(images, prompts[:1])
    with pytest.raises(KeyError, match="nope"):
        svc.submit(images, prompts, names=["nope"])
    fut = svc.submit(images, prompts)
    svc.close()
    assert fut.done() and fut.result().shape == (2, 1)
    with pytest.raises(RuntimeError, match="closed"):
        svc.submit(images, prompts)
    with pytest.raises(ValueError):
        RewardService({})
