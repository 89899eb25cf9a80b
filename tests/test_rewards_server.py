"""HTTP scoring on 127.0.0.1: codec exactness, the server's answers to bad requests, and a client that
turns every kind of server failure into NaN + a counted fault within a bounded time."""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from qirl.errors import UserError
from qirl.rewards.base import RewardModel, RewardRecord, build_reward
from qirl.rewards.client import TOKEN_ENV, RemoteReward
from qirl.rewards.codec import (
    CodecError,
    decode_image,
    decode_request,
    decode_response,
    encode_image,
    encode_request,
    encode_response,
    quantize_8bit,
)
from qirl.rewards.server import BackgroundServer, make_app
from qirl.rewards.service import RewardService

TOKEN = "test-token"


class Brightness(RewardModel):
    name = "bright"

    def score(self, images, prompts, records):
        return images.float().mean(dim=(1, 2, 3))


class SourceDistance(RewardModel):
    """Edit-only: 1 - mean |image - source|; uses the record's source, so the codec must carry it."""

    name = "src"
    tasks = ("edit",)

    def score(self, images, prompts, records):
        out = torch.full((images.shape[0],), float("nan"))
        for i, rec in enumerate(records):
            if rec.task == "edit" and rec.source is not None:
                out[i] = 1 - (images[i] - rec.source).abs().mean()
        return out


class PromptLength(RewardModel):
    def score(self, images, prompts, records):
        return torch.tensor([len(p) / 100 for p in prompts], dtype=torch.float32)


class Raising(RewardModel):
    def score(self, images, prompts, records):
        raise RuntimeError("boom")


class Sleepy(RewardModel):
    def score(self, images, prompts, records):
        time.sleep(0.6)
        return torch.zeros(images.shape[0])


def rewards() -> dict[str, RewardModel]:
    return {"bright": Brightness(), "src": SourceDistance(), "len": PromptLength(), "raise": Raising()}


def make_batch(n: int = 4, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = quantize_8bit(torch.rand(n, 3, size, size, generator=g))  # [n, 3, size, size] on the 8-bit grid
    src = quantize_8bit(torch.rand(3, size, size, generator=g))
    records = [
        RewardRecord(task="edit", category="c", source=src) if i % 2 else RewardRecord() for i in range(n)
    ]
    prompts = [f"prompt number {i}" * (i + 1) for i in range(n)]
    return images, prompts, records


@pytest.fixture(scope="module")
def server() -> Iterator[BackgroundServer]:
    app = make_app(rewards(), token=TOKEN, max_request_bytes=200_000, max_batch=8)
    with BackgroundServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def slow_server() -> Iterator[BackgroundServer]:
    app = make_app({"sleepy": Sleepy()}, request_timeout=0.2, max_pending=1)
    with BackgroundServer(app) as srv:
        yield srv


def post(url: str, body: bytes | Iterator[bytes], token: str | None = TOKEN, path: str = "/score"):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request("POST", path, body=body, headers=headers, encode_chunked=not isinstance(body, bytes))
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def body_of(images, prompts, records, **extra) -> bytes:
    return json.dumps({**encode_request(images, prompts, records), **extra}).encode()


def png_b64(arr: np.ndarray, mode: str | None = None) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def fast_client(url: str, **kw) -> RemoteReward:
    kw = {"name": "bright", "token": TOKEN, "timeout": 0.3, "retries": 2, "backoff": 0.01, **kw}
    return RemoteReward(url, **kw)


# -- codec ------------------------------------------------------------------------------------------


def test_png_round_trip_is_exact_on_the_8bit_grid():
    g = torch.Generator().manual_seed(0)
    for shape in [(3, 1, 1), (3, 7, 13), (3, 32, 32)]:
        img = quantize_8bit(torch.rand(shape, generator=g))
        assert torch.equal(decode_image(encode_image(img)), img)
    raw = torch.rand(3, 9, 9, generator=g)
    assert torch.equal(decode_image(encode_image(raw)), quantize_8bit(raw))
    u8 = torch.arange(256, dtype=torch.float32).reshape(1, 16, 16).expand(3, 16, 16) / 255
    assert torch.equal(decode_image(encode_image(u8)), u8)


def test_request_and_response_round_trip():
    images, prompts, records = make_batch(5)
    obj = json.loads(json.dumps(encode_request(images, prompts, records, names=["bright"])))
    assert len({r["source"] for r in obj["records"] if r["source"]}) == 1  # a shared source is encoded once
    got_images, got_prompts, got_records, names = decode_request(obj, max_batch=8)
    assert torch.equal(got_images, images) and got_prompts == prompts and names == ["bright"]
    assert [r.task for r in got_records] == [r.task for r in records]
    assert torch.equal(got_records[1].source, records[1].source) and got_records[0].source is None
    values = torch.tensor([[0.1, float("nan")], [float("inf"), 1 / 3]])
    resp = json.loads(json.dumps(encode_response(["a", "b"], values)))
    assert resp["rewards"]["b"][0] is None and resp["rewards"]["a"][1] is None
    back = decode_response(resp, ["b", "a"], 2)
    assert back[1, 0].item() == pytest.approx(1 / 3) and torch.isnan(back[0, 0])
    with pytest.raises(CodecError, match="list of 3"):
        decode_response(resp, ["a"], 3)
    with pytest.raises(CodecError, match="not a number"):
        decode_response({"rewards": {"a": [True]}}, ["a"], 1)


# -- server -----------------------------------------------------------------------------------------


def test_health_lists_names_without_token(server):
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/health")
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["names"] == ["bright", "src", "len", "raise"]
    conn.close()


def test_server_scores_match_in_process(server):
    images, prompts, records = make_batch(4)
    status, obj = post(server.url, body_of(images, prompts, records))
    assert status == 200 and obj["names"] == ["bright", "src", "len", "raise"]
    assert obj["rewards"]["bright"] == Brightness()(images, prompts, records).tolist()
    assert obj["rewards"]["src"][0] is None and obj["rewards"]["src"][1] is not None
    assert obj["rewards"]["raise"] == [None] * 4  # a failing reward is null, not a 500
    status, obj = post(server.url, body_of(images, prompts, records, names=["len"]))
    assert status == 200 and list(obj["rewards"]) == ["len"]


@pytest.mark.parametrize("token", [None, "wrong", ""])
def test_missing_or_wrong_token_is_401(server, token):
    images, prompts, records = make_batch(1)
    status, obj = post(server.url, body_of(images, prompts, records), token=token)
    assert status == 401 and "token" in obj["error"]


def test_oversized_request_is_413(server):
    big = json.dumps({"prompts": ["x" * 300_000], "images": []}).encode()
    status, obj = post(server.url, big)
    assert status == 413 and "exceeds" in obj["error"]
    chunks = iter([b'{"prompts": ["', b"x" * 150_000, b"x" * 150_000, b'"], "images": []}'])
    status, obj = post(server.url, chunks)  # chunked: no Content-Length to check up front
    assert status == 413
    images, prompts, records = make_batch(9, size=4)  # over max_batch=8
    status, obj = post(server.url, body_of(images, prompts, records))
    assert status == 413 and "batch limit" in obj["error"]


def _bad_bodies() -> dict[str, tuple[bytes, str]]:
    ok = png_b64(np.zeros((4, 4, 3), np.uint8))

    def req(images, prompts=None, **kw) -> bytes:
        return json.dumps({"prompts": prompts or ["p"] * len(images), "images": images, **kw}).encode()

    return {
        "json": (b'{"prompts": [', "malformed JSON"),
        "not_object": (b"[1, 2]", "expected a JSON object"),
        "missing": (json.dumps({"images": [ok]}).encode(), "missing required key 'prompts'"),
        "base64": (req(["%%%not-base64%%%"]), "invalid base64"),
        "non_image": (req([base64.b64encode(b"hello, world").decode()]), "not a PNG"),
        "broken_png": (
            req([base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 40).decode()]),
            "not a readable PNG",
        ),
        "grey": (req([png_b64(np.zeros((4, 4), np.uint8), "L")]), "mode must be 8-bit RGB"),
        "shapes": (req([ok, png_b64(np.zeros((5, 4, 3), np.uint8))]), "differs from images[0]"),
        "count": (req([ok], prompts=["a", "b"]), "1 images but 2 prompts"),
        "task": (req([ok], records=[{"task": "video"}]), "records[0].task"),
        "names": (req([ok], names=["nope"]), "unknown reward(s) nope"),
        "empty": (req([]), "'images' is empty"),
    }


@pytest.mark.parametrize("case", list(_bad_bodies()))
def test_bad_requests_are_400_with_one_line(server, case):
    body, message = _bad_bodies()[case]
    status, obj = post(server.url, body)
    assert status == 400, obj
    assert message in obj["error"] and "\n" not in obj["error"]


def test_request_timeout_is_504_and_queue_limit_503(slow_server):
    images, prompts, records = make_batch(1)
    t0 = time.perf_counter()
    status, obj = post(slow_server.url, body_of(images, prompts, records), token=None)
    assert status == 504 and "timeout" in obj["error"] and time.perf_counter() - t0 < 0.5
    status, obj = post(slow_server.url, body_of(images, prompts, records), token=None)  # first still scoring
    assert status == 503 and "busy" in obj["error"]


# -- client against the real server ---------------------------------------------------------------


def test_client_round_trip_is_exactly_in_process(server):
    images, prompts, records = make_batch(5)
    local = {n: r(images, prompts, records) for n, r in rewards().items() if n != "raise"}
    client = RemoteReward(server.url, name="bright", names=["bright", "src", "len"], token=TOKEN, max_batch=2)
    assert torch.equal(client(images, prompts, records), local["bright"])
    both = client.score_all(images, prompts, records)  # [5, 3] in 3 requests of <= 2 images
    assert both.shape == (5, 3)
    for k, name in enumerate(["bright", "src", "len"]):
        torch.testing.assert_close(both[:, k], local[name], rtol=0, atol=0, equal_nan=True)
    assert client.faults == {} and client.health()["names"][0] == "bright"
    raw = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(3))  # off-grid: quantised once
    assert torch.equal(client(raw, prompts, records), Brightness()(quantize_8bit(raw), prompts, records))


def test_client_is_a_registered_reward_and_fits_the_service(server, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    client = build_reward("remote", url=server.url, names="bright")  # `name` is build_reward's own
    assert client.name == "bright" and client.names == ["bright"] and client.token == TOKEN
    images, prompts, records = make_batch(3)
    with RewardService({"bright": client}, workers=2) as svc:
        out = [svc.submit(images, prompts, records) for _ in range(3)]
        for fut in out:
            assert torch.equal(fut.result(timeout=10)[:, 0], Brightness()(images, prompts, records))
    with pytest.raises(UserError, match="url"):
        RemoteReward("gpu-box:8000", name="x")
    with pytest.raises(UserError, match="name"):
        RemoteReward("http://127.0.0.1:1")


def test_client_wrong_token_is_nan_and_auth_fault_without_retry(server, caplog):
    client = fast_client(server.url, token="wrong")
    images, prompts, records = make_batch(2)
    with caplog.at_level(logging.WARNING, logger="qirl.rewards.client"):
        for _ in range(2):
            assert torch.isnan(client(images, prompts, records)).all()
    assert client.faults == {"auth": 2} and client.retried == 0
    assert len(caplog.records) == 1 and "HTTP 401" in caplog.records[0].getMessage()


def test_client_rejected_batch_is_nan(server):
    images, prompts, records = make_batch(2, size=300)  # ~550 kB of PNG > the 200 kB limit
    client = fast_client(server.url)
    assert torch.isnan(client(images, prompts, records)).all() and client.faults == {"rejected": 1}


# -- client against broken servers ----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def broken_server() -> Iterator[BackgroundServer]:
    calls = {"n": 0}

    async def error(request):
        calls["n"] += 1
        return JSONResponse({"error": "internal"}, status_code=500)

    async def garbage(request):
        return Response(b"<html>not json", media_type="text/html")

    async def short(request):
        return JSONResponse({"names": ["bright"], "rewards": {"bright": [0.5]}})

    app = Starlette(
        routes=[
            Route("/e/score", error, methods=["POST"]),
            Route("/g/score", garbage, methods=["POST"]),
            Route("/s/score", short, methods=["POST"]),
        ]
    )
    with BackgroundServer(app) as srv:
        srv.calls = calls
        yield srv


def _assert_nan_fault(client: RemoteReward, kind: str, bound: float) -> None:
    images, prompts, records = make_batch(2)
    t0 = time.perf_counter()
    out = client(images, prompts, records)
    elapsed = time.perf_counter() - t0
    assert torch.isnan(out).all() and out.shape == (2,)
    assert client.faults == {kind: 1}, client.faults
    assert elapsed < bound, elapsed


def test_dead_server_is_nan_and_connect_fault():
    client = fast_client(f"http://127.0.0.1:{_free_port()}")
    _assert_nan_fault(client, "connect", bound=1.0)
    assert client.retried == 2


def test_hanging_server_is_nan_and_timeout_fault():
    with socket.socket() as listener:  # accepts connections (kernel backlog) and never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        client = fast_client(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=0.15, retries=1)
        _assert_nan_fault(client, "timeout", bound=1.0)


def test_trickling_server_is_cut_by_the_deadline():
    stop = threading.Event()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(2)

    def trickle() -> None:  # a 200 that sends one byte every 50 ms: no single read ever times out
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
            for _ in range(100):
                if stop.wait(0.05):
                    break
                try:
                    conn.sendall(b" ")
                except OSError:
                    break

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        client = fast_client(
            f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=0.2, retries=0, deadline=0.4
        )
        _assert_nan_fault(client, "timeout", bound=1.0)
    finally:
        stop.set()
        listener.close()
        thread.join(timeout=5)


def test_http_500_is_retried_then_nan(broken_server):
    before = broken_server.calls["n"]
    client = fast_client(broken_server.url + "/e")
    _assert_nan_fault(client, "http_500", bound=2.0)
    assert client.retried == 2 and broken_server.calls["n"] - before == 3


@pytest.mark.parametrize("path", ["/g", "/s"])
def test_malformed_answer_is_nan_and_malformed_fault(broken_server, path):
    client = fast_client(broken_server.url + path)
    _assert_nan_fault(client, "malformed", bound=1.0)
    assert client.retried == 0
