"""A reward scored by a `qirl.rewards.server` elsewhere, behind the ordinary `RewardModel` interface.

    reward = RemoteReward("http://gpu-box:8000", name="vlm_alignment", token="s3cret")
    rewards = reward(images, prompts, records)          # [B], like any in-process reward

    both = RemoteReward("http://gpu-box:8000", names=["vlm_alignment", "face_identity"])
    rewards = both.score_all(images, prompts, records)  # [B, K] in one request per chunk (GRPO)

A remote scorer must never stop training: a dead, hanging or overloaded server, an HTTP error, a wrong
token or an answer that is not the expected JSON all give NaN rewards (which GRPO drops from the group
statistics) and one more count in `faults[kind]`, where kind is one of `connect`, `timeout`, `protocol`
(the connection broke mid-answer), `auth` (401/403), `rejected` (400/413: this client or the server
is misconfigured), `busy` (503), `http_<status>` and `malformed`. Each kind is logged once as a warning
(later ones at debug level), with the server's one-line error where it sent one.

Retries: `connect`, `timeout`, `protocol`, `busy` and 5xx answers are retried up to `retries` times
with exponential backoff and jitter, `sleep_i = min(max_backoff, backoff * 2**i) * U(0.5, 1)` (the
jitter keeps many trainers from retrying in lockstep); the others would fail the same way again and
are not. Every call is bounded: each socket operation waits at most `timeout` seconds and the whole call,
retries included, at most `deadline` seconds (default: `(retries + 1) * timeout` plus the largest
backoffs), checked between reads, so a server trickling bytes cannot stall the trainer either.

Transport: the standard library's `http.client`, one connection per request (its set-up costs ~0.1 ms
on a LAN, nothing next to PNG coding and scoring; no stale keep-alive connections to manage, and no
extra dependency for the trainer side). Batches larger than `max_batch` go as several requests. The
token may come from the `QIRL_REWARD_TOKEN` environment variable, so it need not be written in a recipe.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import torch
from torch import Tensor

from qirl.errors import UserError
from qirl.rewards.base import TASKS, RewardModel, RewardRecord, register_reward
from qirl.rewards.codec import CodecError, decode_response, encode_request

log = logging.getLogger(__name__)

TOKEN_ENV = "QIRL_REWARD_TOKEN"
MAX_RESPONSE_BYTES = 16 * 1024 * 1024


class _Fault(Exception):
    def __init__(self, kind: str, detail: str, retryable: bool) -> None:
        super().__init__(detail)
        self.kind, self.retryable = kind, retryable


class RemoteReward(RewardModel):
    """`score` -> the remote reward `name` as `[B]`; `score_all` -> every reward in `names` as `[B, K]`.

    `names` may be one string; `name` defaults to `names[0]`. Through the registry, where `name` is
    taken by `build_reward`'s own argument, write `build_reward("remote", url=..., names="vlm")`.
    """

    thread_safe = True  # each call is an independent request: `RewardService` may overlap them

    def __init__(
        self,
        url: str,
        name: str | None = None,
        names: str | Sequence[str] | None = None,
        token: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 10.0,
        deadline: float | None = None,
        max_batch: int = 64,
        tasks: Sequence[str] = TASKS,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UserError(f"remote reward: url must look like http://host:port, got {url!r}")
        if name is None and not names:
            raise UserError("remote reward: give the remote reward's `name` (or `names` for score_all)")
        if timeout <= 0 or retries < 0 or backoff < 0 or max_batch < 1:
            raise UserError("remote reward: timeout and max_batch must be positive, retries and backoff >= 0")
        self.url = url.rstrip("/")
        if isinstance(names, str):
            names = [names]
        self.names: list[str] = list(names) if names else [name]  # type: ignore[list-item]
        self.name = name if name is not None else self.names[0]
        self.tasks = tuple(tasks)
        self.token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self.timeout, self.retries, self.backoff, self.max_backoff = timeout, retries, backoff, max_backoff
        self.max_batch = max_batch
        waits = sum(min(max_backoff, backoff * 2**i) for i in range(retries))
        self.deadline = deadline if deadline is not None else (retries + 1) * timeout + waits
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname, parts.port
        self._path = parts.path.rstrip("/")
        self.faults: dict[str, int] = {}
        self.retried = 0  # attempts that failed and were retried (not faults unless the last one fails)
        self._logged: set[str] = set()
        self._lock = threading.Lock()

    # -- public ---------------------------------------------------------------------------------------

    def score(self, images: Tensor, prompts: Sequence[str], records: Sequence[RewardRecord]) -> Tensor:
        """`[B]` float32: the remote `name`, NaN where it cannot score or the call failed."""
        return self._fetch([self.name], images, prompts, records)[:, 0]

    def score_all(
        self, images: Tensor, prompts: Sequence[str], records: Sequence[RewardRecord] | None = None
    ) -> Tensor:
        """`[B, K]` float32, columns in the order of `names`, fetched together (one request per chunk)."""
        records = list(records) if records is not None else [RewardRecord()] * len(prompts)
        if not (images.shape[0] == len(prompts) == len(records)):
            raise ValueError(f"{images.shape[0]} images, {len(prompts)} prompts, {len(records)} records")
        return self._fetch(self.names, images, prompts, records)

    def health(self) -> dict[str, Any] | None:
        """The server's /health answer, or None if it cannot be had (not counted as a fault)."""
        try:
            status, data = self._request("GET", "/health", None, time.monotonic() + self.timeout)
            return json.loads(data) if status == 200 else None
        except (_Fault, ValueError):
            return None

    # -- internals ------------------------------------------------------------------------------------

    def _fetch(
        self, names: list[str], images: Tensor, prompts: Sequence[str], records: Sequence[RewardRecord]
    ) -> Tensor:
        out = torch.full((images.shape[0], len(names)), math.nan, dtype=torch.float32)  # [B, K]
        for lo in range(0, images.shape[0], self.max_batch):
            hi = min(lo + self.max_batch, images.shape[0])
            body = json.dumps(
                encode_request(images[lo:hi], prompts[lo:hi], records[lo:hi], names), separators=(",", ":")
            ).encode()
            try:
                obj = self._call(body)
                out[lo:hi] = decode_response(obj, names, hi - lo)
            except _Fault as fault:
                self._count(fault)
            except CodecError as err:
                self._count(_Fault("malformed", str(err), retryable=False))
        return out

    def _call(self, body: bytes) -> Any:
        """POST /score with retries; the decoded JSON, or a `_Fault` (the last attempt's)."""
        deadline = time.monotonic() + self.deadline
        for attempt in range(self.retries + 1):
            try:
                status, data = self._request("POST", "/score", body, deadline)
                if status != 200:
                    raise _http_fault(status, data)
                try:
                    return json.loads(data)
                except (ValueError, UnicodeDecodeError):
                    raise _Fault("malformed", "the answer is not JSON", retryable=False) from None
            except _Fault as fault:
                wait = min(self.max_backoff, self.backoff * 2**attempt) * random.uniform(0.5, 1.0)
                if not fault.retryable or attempt == self.retries or time.monotonic() + wait >= deadline:
                    raise
                with self._lock:
                    self.retried += 1
                log.debug(
                    "remote reward %s: %s (%s); retry %d in %.2f s",
                    self.url,
                    fault.kind,
                    fault,
                    attempt + 1,
                    wait,
                )
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _request(self, method: str, path: str, body: bytes | None, deadline: float) -> tuple[int, bytes]:
        """One HTTP exchange, every socket wait bounded by `timeout` and by `deadline`."""

        def budget() -> float:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("deadline passed")
            return min(self.timeout, left)

        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        conn = cls(self._host, self._port, timeout=self.timeout)
        try:
            conn.timeout = budget()  # used by the connect in `request`
            conn.request(method, self._path + path, body=body, headers=headers)
            sock = conn.sock  # kept: the connection may hand it to the response and forget it
            sock.settimeout(budget())
            resp = conn.getresponse()
            chunks, size = [], 0
            while True:
                sock.settimeout(budget())
                chunk = resp.read1(65536)
                if not chunk:
                    break
                size += len(chunk)
                if size > MAX_RESPONSE_BYTES:
                    raise _Fault("malformed", f"answer over {MAX_RESPONSE_BYTES} bytes", retryable=False)
                chunks.append(chunk)
            return resp.status, b"".join(chunks)
        except TimeoutError as err:
            raise _Fault("timeout", f"no answer within the time limit ({err})", retryable=True) from None
        except (http.client.HTTPException, ConnectionResetError, BrokenPipeError) as err:
            raise _Fault("protocol", f"{type(err).__name__}: {err}", retryable=True) from None
        except OSError as err:  # refused, unreachable, DNS
            raise _Fault("connect", f"{type(err).__name__}: {err}", retryable=True) from None
        finally:
            conn.close()

    def _count(self, fault: _Fault) -> None:
        with self._lock:
            self.faults[fault.kind] = self.faults.get(fault.kind, 0) + 1
            first = fault.kind not in self._logged
            self._logged.add(fault.kind)
        if first:
            log.warning(
                "remote reward %s failed (%s: %s); rewards are NaN for that batch",
                self.url,
                fault.kind,
                fault,
            )
        else:
            log.debug("remote reward %s failed (%s: %s)", self.url, fault.kind, fault)


def _http_fault(status: int, data: bytes) -> _Fault:
    try:
        detail = str(json.loads(data).get("error", ""))[:200]
    except (ValueError, AttributeError, UnicodeDecodeError):
        detail = ""
    detail = f"HTTP {status}" + (f": {detail}" if detail else "")
    if status in (401, 403):
        return _Fault("auth", detail, retryable=False)
    if status in (400, 413):
        return _Fault("rejected", detail, retryable=False)
    if status in (429, 503):
        return _Fault("busy", detail, retryable=True)
    return _Fault(f"http_{status}", detail, retryable=status >= 500)


@register_reward("remote")
def _build_remote(**kwargs: Any) -> RemoteReward:
    return RemoteReward(**kwargs)
