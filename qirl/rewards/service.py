"""Asynchronous scoring: the trainer hands a decoded batch over and rolls out the next one meanwhile.

    with RewardService({"oracle": oracle, "face": face}, workers=2) as service:
        fut = service.submit(images, prompts, records)   # returns at once
        ...                                               # roll out the next micro-batch
        rewards = fut.result()                            # [B, K], K in the mapping's order

GRPO (DESIGN.md, data flow step 3) overlaps rollout with scoring this way. A reward that raises, or
returns something other than `[B]` numbers, gives NaN in its column for that batch and one more count in
`service.faults[name]`; the trainer never sees the exception (the advantage drops NaN rewards from the
group statistics, step 4). The first fault of each kind (reward, exception type) is logged with its
traceback, at error level when the exception is one that only a bug raises (`BUG_EXCEPTIONS`: a
`TypeError` in a scorer is not a flaky network), later ones at debug level, so a broken scorer cannot
flood the log. A scorer that keeps failing must still stop the run: `RewardFaultGuard` ends it with one
line once too many rewards are NaN for several iterations in a row.

Why threads and not processes: the rewards that cost time are torch models (VLMs, the face network) or
HTTP calls to a remote scorer, and both release the GIL while they work (torch inside its kernels,
sockets while waiting), so threads overlap them with the trainer. Threads share the reward models
and the image tensors, GPU tensors included, with no pickling, no second CUDA context and no copy of a
multi-gigabyte VLM per process; a pure-Python reward (the Shapes oracle) holds the GIL and gains little,
but it is cheap. For real parallel CPU work, run the reward behind `qirl.rewards.server` instead.

Concurrency rules: each (batch, reward) pair is one task on a pool of `workers` threads, so the rewards
of a batch, and the batches in flight, run side by side. A reward is not assumed to be thread-safe
(a VLM with a cache, dlib's network): a per-reward lock lets one thread at a time into it, unless the
reward sets `thread_safe = True` (the remote client does: its calls are independent requests). Scoring
runs under `torch.no_grad()` (grad mode is per thread in torch). The service keeps references to the
submitted tensors: do not modify them in place before the future is done.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

from qirl.errors import UserError
from qirl.rewards.base import RewardModel, RewardRecord

log = logging.getLogger(__name__)

# Exceptions a scorer raises only when its code is wrong (not when a server is down or an input is odd).
BUG_EXCEPTIONS: tuple[type[BaseException], ...] = (
    TypeError, AttributeError, NameError, AssertionError, IndexError, KeyError, ImportError, ZeroDivisionError,
)


class RewardService:
    """Score batches with K rewards on a thread pool; `submit` returns a `Future[Tensor[B, K]]`."""

    def __init__(self, rewards: Mapping[str, RewardModel], workers: int = 1) -> None:
        if not rewards:
            raise ValueError("RewardService needs at least one reward")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.rewards = dict(rewards)
        self.names: tuple[str, ...] = tuple(self.rewards)
        self.faults: dict[str, int] = {n: 0 for n in self.names}
        self._fault_kinds: set[tuple[str, type]] = set()
        self._locks = {
            n: contextlib.nullcontext() if getattr(r, "thread_safe", False) else threading.Lock()
            for n, r in self.rewards.items()
        }
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qirl-reward")
        self._fault_lock = threading.Lock()
        self._closed = False

    def submit(
        self,
        images: Tensor,
        prompts: Sequence[str],
        records: Sequence[RewardRecord] | None = None,
        names: Sequence[str] | None = None,
    ) -> Future[Tensor]:
        """Queue one batch; the future's result is `rewards [B, K]` float32 on the CPU, columns in the
        order of `names` (default: every reward, in the mapping's order), NaN where a reward could not
        score or failed. Mismatched lengths or an unknown name are caller bugs and raise here."""
        if self._closed:
            raise RuntimeError("RewardService is closed")
        records = list(records) if records is not None else [RewardRecord()] * len(prompts)
        if images.ndim != 4 or not (images.shape[0] == len(prompts) == len(records)):
            raise ValueError(f"images {tuple(images.shape)}, {len(prompts)} prompts, {len(records)} records")
        names = list(self.names if names is None else names)
        unknown = [n for n in names if n not in self.rewards]
        if unknown:
            raise KeyError(f"unknown reward(s) {unknown}; the service has {list(self.names)}")
        images = images.detach()
        prompts = list(prompts)
        batch = images.shape[0]
        out = torch.full((batch, len(names)), math.nan, dtype=torch.float32)  # [B, K]
        result: Future[Tensor] = Future()
        result.set_running_or_notify_cancel()
        if not names:
            result.set_result(out)
            return result
        pending = [len(names)]
        lock = threading.Lock()

        def run(k: int, name: str) -> None:
            col = self._score_one(name, images, prompts, records)
            with lock:
                out[:, k] = col
                pending[0] -= 1
                done = pending[0] == 0
            if done:
                result.set_result(out)

        for k, name in enumerate(names):
            self._pool.submit(run, k, name)
        return result

    def score(
        self,
        images: Tensor,
        prompts: Sequence[str],
        records: Sequence[RewardRecord] | None = None,
        names: Sequence[str] | None = None,
    ) -> Tensor:
        """Synchronous `submit(...).result()`."""
        return self.submit(images, prompts, records, names).result()

    def _score_one(
        self, name: str, images: Tensor, prompts: list[str], records: list[RewardRecord]
    ) -> Tensor:
        """One reward's column `[B]`; any exception or malformed output becomes NaN and a fault."""
        batch = images.shape[0]
        try:
            with self._locks[name], torch.no_grad():
                values = self.rewards[name].score(images, prompts, records)
            values = torch.as_tensor(values).detach().to("cpu", torch.float32)
            if values.shape != (batch,):
                raise ValueError(f"returned shape {tuple(values.shape)}, expected ({batch},)")
            return values
        except Exception as err:  # noqa: BLE001  (the contract: a failing scorer never stops training)
            kind = (name, type(err))
            with self._fault_lock:
                self.faults[name] += 1
                first = kind not in self._fault_kinds
                self._fault_kinds.add(kind)
            if first:
                bug = isinstance(err, BUG_EXCEPTIONS)
                log.log(
                    logging.ERROR if bug else logging.WARNING,
                    "reward %r raised %s%s; its rewards are NaN for this batch (%s)",
                    name,
                    type(err).__name__,
                    " (a bug in the scorer)" if bug else "",
                    err,
                    exc_info=True,
                )
            else:
                log.debug("reward %r failed again (%d faults): %s", name, self.faults[name], err)
            return torch.full((batch,), math.nan, dtype=torch.float32)

    def close(self, wait: bool = True) -> None:
        """Stop accepting batches. Batches already submitted are still scored and their futures complete;
        `wait` blocks until they have."""
        self._closed = True
        self._pool.shutdown(wait=wait)

    def __enter__(self) -> RewardService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RewardFaultGuard:
    """Stops a run whose rewards keep failing, instead of training on zero advantages until it ends.

    ``check(rewards)`` takes an iteration's rewards ``[..., K]`` (NaN = the scorer failed or could not
    score) and raises a `UserError` once more than ``max_nan_fraction`` of them were NaN in each of
    ``patience`` iterations in a row (``patience = 0``: never). Pass the rewards of the whole (global)
    batch, so that every rank of a distributed run takes the same decision.
    """

    def __init__(self, max_nan_fraction: float = 0.5, patience: int = 3) -> None:
        self.max_nan_fraction = max_nan_fraction
        self.patience = patience
        self.bad_in_a_row = 0

    def check(self, rewards: Tensor, faults: Mapping[str, int] | None = None) -> None:
        nan_fraction = float(rewards.isnan().float().mean()) if rewards.numel() else 0.0
        self.bad_in_a_row = self.bad_in_a_row + 1 if nan_fraction > self.max_nan_fraction else 0
        if self.patience and self.bad_in_a_row >= self.patience:
            counts = ", ".join(f"{n}={c}" for n, c in (faults or {}).items() if c)
            raise UserError(
                f"rewards failed: more than {self.max_nan_fraction:.0%} of the rewards were NaN in "
                f"{self.bad_in_a_row} iterations in a row (faults: {counts or 'none raised'}); the log has "
                "the scorer's traceback (train.nan_reward_patience=0 trains on regardless)"
            )
