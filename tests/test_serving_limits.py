"""Bounded requests and error answers (serving.limits) on the query handler served by a real
uvicorn over real sockets: an invalid body gets a short 422 that does not echo it, a body over
``serve_max_body_bytes`` a 413 before it is read whole, and valid requests work as before."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from tailbridge.serving.app import create_app
from tailbridge.serving.limits import MAX_ERRORS, MAX_TEXT
from tailbridge.streams import item_index
from tailbridge.streams.indexer import Indexer
from tests.conftest import free_port, stream_namespace, wait_until
from tests.test_serving import catalog_events

pytestmark = pytest.mark.integration

LIMIT = 64 * 1024
EVENT = {"action": "click", "user_id": "u_lim", "session_id": "s_lim", "item_id": "sofa-1"}


@pytest.fixture(scope="module")
def base_url(stack_settings, tmp_path_factory) -> Iterator[str]:
    with stream_namespace(stack_settings, tmp_path_factory.mktemp("limits"), "tbl",
                          serve_max_body_bytes=LIMIT) as ns:
        Indexer(ns.settings, ns.milvus, ns.redis).process(catalog_events()[:4])
        ns.milvus.flush(item_index.alias_name(ns.settings))
        config = uvicorn.Config(create_app(ns.settings), host="127.0.0.1", port=free_port(), log_level="warning")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        try:
            wait_until(lambda: server.started, 120, "uvicorn to serve the app")
            yield f"http://127.0.0.1:{config.port}"
        finally:
            server.should_exit = True
            thread.join(30)


@pytest.fixture
def http(base_url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=30) as client:
        yield client


def test_valid_requests_still_work(http):
    assert http.post("/events", json=EVENT).status_code == 202
    response = http.post("/search", json={"query": "sofa", "k": 2})
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 2


@pytest.mark.parametrize("path", ["/events", "/search"])
def test_a_large_invalid_body_gets_a_short_422_without_its_input(http, path):
    long_value = "v" * (LIMIT // 4)
    body = {"query": long_value, "user_id": long_value, "k": "many", **EVENT, "action": "teleport",
            "k" * 5000: 1, **{f"unknown_{i}": i for i in range(500)}}
    response = http.post(path, json=body)
    assert response.status_code == 422, response.text[:300]
    assert len(response.content) < 8 * 1024
    answer = response.json()
    assert answer["error_count"] > MAX_ERRORS and len(answer["detail"]) == MAX_ERRORS
    assert all(set(error) == {"loc", "msg", "type"} for error in answer["detail"])
    assert "vvvvvvvvvv" not in response.text and "k" * (MAX_TEXT + 1) not in response.text


def test_field_errors_keep_their_paths(http):
    """The short form keeps what a client needs: which field, and why."""
    response = http.post("/events", json=EVENT | {"action": "teleport", "position": 0})
    assert response.status_code == 422
    assert {tuple(e["loc"]) for e in response.json()["detail"]} == {("body", "action"), ("body", "position")}
    assert http.post("/search", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422


@pytest.mark.parametrize("path", ["/events", "/search"])
def test_a_body_over_the_limit_gets_413(http, path):
    response = http.post(path, content=b"x" * (LIMIT + 1), headers={"content-type": "application/json"})
    assert response.status_code == 413 and str(LIMIT) in response.json()["detail"]
    assert http.post(path, content=b" " * LIMIT, headers={"content-type": "application/json"}).status_code == 422


def test_a_chunked_body_over_the_limit_gets_413(http):
    def chunks():
        for _ in range(LIMIT // 4096 + 2):
            yield b" " * 4096

    response = http.post("/events", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert "content-length" not in response.request.headers  # it was sent chunked
    assert http.post("/events", json=EVENT).status_code == 202  # the handler still answers


def first_line(base_url: str, head: bytes, body: list[bytes]) -> bytes:
    """Send a request head and part of a body on a raw socket, and read the status line that
    comes back without the rest of the body ever being sent."""
    port = int(base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        for part in body:
            sock.sendall(part)
        return sock.recv(65536).split(b"\r\n", 1)[0]


def test_413_comes_before_the_body_is_read_whole(base_url):
    declared = (b"POST /events HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                b"Content-Length: 50000000\r\n\r\n")
    assert first_line(base_url, declared, [b" " * 1024]) == b"HTTP/1.1 413 Request Entity Too Large"
    chunked = (b"POST /events HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n")
    parts = [b"1000\r\n" + b" " * 4096 + b"\r\n"] * (LIMIT // 4096 + 1)  # no final chunk: never ends
    assert first_line(base_url, chunked, parts) == b"HTTP/1.1 413 Request Entity Too Large"
