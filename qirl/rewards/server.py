"""Serve reward models over HTTP: a GPU box scores, the trainers anywhere call it (`qirl.rewards.client`).

    from qirl.rewards.server import serve
    serve({"oracle": build_reward("oracle")}, host="127.0.0.1", port=8000, token="s3cret")

Endpoints (wire format in `qirl.rewards.codec`; never pickle):

- `POST /score`: a batch in, `{"names": [...], "rewards": {name: [float | null]}}` out.
- `GET /health`: `{"status": "ok", "names": [...], "faults": {name: n}}`; open without the token, so a
  load balancer can probe it (it reveals the reward names and fault counts, nothing else).

Answers to bad requests, each with a one-line `{"error": "..."}`: 401 a missing or wrong bearer token
(only when a token is set; compared in constant time), 413 a body over `max_request_bytes` (checked on
Content-Length and again while reading, so a chunked body cannot dodge it), more images than
`max_batch` or an image over `max_pixels`, 400 malformed JSON, bad base64, a non-PNG, a non-RGB image,
images of different shapes or an unknown reward name, 503 when `max_pending` batches are already
queued (the client backs off and retries), 504 when reading + decoding + scoring one request takes
longer than `request_timeout` seconds. Scoring runs on a `RewardService`, so a reward that raises gives
null in its column (and counts in /health's faults) rather than a 500, and the event loop stays free to
answer /health while a batch is scored. A timed-out batch cannot be interrupted (Python threads cannot
be killed): it finishes in the background and holds a `max_pending` slot until it does.

Bind to 127.0.0.1 (the default) unless the network is trusted or a token is set: HTTP is plain text, so
put a TLS proxy in front for anything but a private network.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio.to_thread
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from qirl.rewards.base import RewardModel
from qirl.rewards.codec import DEFAULT_MAX_PIXELS, CodecError, decode_request, encode_response
from qirl.rewards.service import RewardService

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    log.info("reward server: %d %s", status, message)
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class _TooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise CodecError("request: invalid Content-Length header")
        if int(declared) > limit:
            raise _TooLarge
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _TooLarge
    return bytes(body)


def make_app(
    rewards: Mapping[str, RewardModel],
    token: str | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    max_batch: int = 256,
    request_timeout: float = 300.0,
    workers: int = 1,
    max_pending: int = 8,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Starlette:
    """The ASGI app scoring with `rewards` (keys are the names clients ask for). `workers` threads score
    (see `RewardService`); the service is closed when the app shuts down (ASGI lifespan)."""
    if not rewards:
        raise ValueError("make_app needs at least one reward")
    service = RewardService(rewards, workers=workers)
    expected = f"Bearer {token}".encode() if token else None
    pending = [0]  # batches submitted and not yet scored (timed-out ones included)
    pending_lock = threading.Lock()

    def release(_: object) -> None:  # a done-callback: runs on a scoring thread
        with pending_lock:
            pending[0] -= 1

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "names": list(service.names), "faults": dict(service.faults)})

    async def score(request: Request) -> JSONResponse:
        if expected is not None:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return _error(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
        try:
            async with asyncio.timeout(request_timeout):
                return await _score(request)
        except TimeoutError:
            return _error(504, f"scoring took longer than the {request_timeout:g} s request timeout")

    async def _score(request: Request) -> JSONResponse:
        try:
            body = await _read_body(request, max_request_bytes)
        except _TooLarge:
            return _error(413, f"request body exceeds {max_request_bytes} bytes")
        except CodecError as err:
            return _error(err.status, str(err))
        try:
            obj = json.loads(body)
        except (ValueError, UnicodeDecodeError) as err:
            return _error(400, f"malformed JSON: {str(err).splitlines()[0]}")
        try:  # PNG decoding is CPU work: off the event loop
            images, prompts, records, names = await anyio.to_thread.run_sync(
                decode_request, obj, max_batch, max_pixels
            )
        except CodecError as err:
            return _error(err.status, str(err))
        names = list(service.names) if names is None else names
        unknown = [n for n in names if n not in service.rewards]
        if unknown:
            return _error(400, f"unknown reward(s) {', '.join(unknown)}; served: {', '.join(service.names)}")
        with pending_lock:
            busy = pending[0] >= max_pending
            if not busy:
                pending[0] += 1
        if busy:
            return _error(503, f"busy: {max_pending} batches already queued", {"Retry-After": "1"})
        t0 = time.perf_counter()
        fut = service.submit(images, prompts, records, names)
        fut.add_done_callback(release)
        values = await asyncio.wrap_future(fut)  # [B, K]
        log.debug(
            "scored %d images x %d rewards in %.3f s", len(prompts), len(names), time.perf_counter() - t0
        )
        return JSONResponse(encode_response(names, values))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            service.close(wait=False)

    app = Starlette(
        routes=[Route("/score", score, methods=["POST"]), Route("/health", health, methods=["GET"])],
        lifespan=lifespan,
    )
    app.state.service = service
    return app


def serve(
    rewards: Mapping[str, RewardModel],
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    log_level: str = "info",
    **app_kwargs: Any,
) -> None:
    """Run the server until interrupted (blocking). `app_kwargs` go to `make_app`."""
    if host not in LOOPBACK and not token:
        log.warning("reward server on %s without a token: anyone who can reach the port can use it", host)
    app = make_app(rewards, token=token, **app_kwargs)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=5)


class BackgroundServer:
    """Run an ASGI app with uvicorn on a daemon thread (tests, benchmarks, notebooks).

        with BackgroundServer(make_app(rewards)) as srv:
            RemoteReward(srv.url, name="oracle")(...)

    `port=0` binds an ephemeral port (read it from `url`). Start-up and shut-down wait at most
    `start_timeout` seconds each."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 10.0) -> None:
        self.app, self.host, self.port, self.start_timeout = app, host, port, start_timeout
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> BackgroundServer:
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on", timeout_keep_alive=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="qirl-reward-server", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"reward server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=self.start_timeout)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
