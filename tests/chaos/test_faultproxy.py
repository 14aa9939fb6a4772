"""The fault proxy itself: it forwards faithfully and each fault does what it says.

The upstream is a stdlib HTTP/1.1 server in a thread that counts what reaches it,
so each test can tell whether the server saw a request the client saw fail.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from tests.support.faultproxy import Fault, FaultProxy

pytestmark = pytest.mark.chaos


class _Server(ThreadingHTTPServer):
    request_queue_size = 64  # concurrent connects must not wait for a SYN retry
    daemon_threads = True


class Upstream:
    """Counts requests by path; echoes the body length; chunked answers on /chunked."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, int]] = []
        self.lock = threading.Lock()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with upstream.lock:
                    upstream.seen.append((self.command, self.path, len(body)))
                if self.path.startswith("/chunked"):
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for part in (b"hello ", b"chunked ", b"world"):
                        self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                    self.wfile.write(b"0\r\n\r\n")
                    return
                if self.path.startswith("/empty"):
                    self.send_response(204)
                    self.end_headers()
                    return
                out = json.dumps({"path": self.path, "received": len(body)}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(out)

            do_GET = do_POST = do_HEAD = _answer

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def count(self, path: str) -> int:
        with self.lock:
            return sum(1 for _, p, _ in self.seen if p.startswith(path))


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    up = Upstream()
    up.thread.start()
    yield up
    up.server.shutdown()
    up.server.server_close()


@pytest.fixture
def proxy(upstream: Upstream) -> Iterator[FaultProxy]:
    with FaultProxy(upstream.address, seed=7) as p:
        yield p


def test_requests_are_forwarded_intact_over_one_kept_alive_connection(
    proxy: FaultProxy, upstream: Upstream
) -> None:
    big = b"x" * (3 * 1024 * 1024)
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        r1 = client.get("/a?q=1")
        r2 = client.post("/b", content=big)
        r3 = client.get("/chunked")
        r4 = client.head("/c")
        r5 = client.get("/empty")
        r6 = client.post("/d", json={"k": "v"})
    assert r1.json() == {"path": "/a?q=1", "received": 0}
    assert r2.json() == {"path": "/b", "received": len(big)}
    assert r3.text == "hello chunked world"
    assert r4.status_code == 200 and r4.content == b""
    assert r5.status_code == 204
    assert r6.json()["received"] == len(b'{"k":"v"}')
    assert proxy.counts["connections"] == 1  # the client reused its connection throughout
    assert proxy.counts["requests"] == proxy.counts["forwarded"] == 6
    assert len(upstream.seen) == 6


def test_a_status_rule_answers_without_the_server_and_keeps_the_connection(
    proxy: FaultProxy, upstream: Upstream
) -> None:
    rule = proxy.add_rule(Fault.STATUS, r"^/result/$", method="POST", status=503)
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        failed = client.post("/result/", json={"results": []})
        other_method = client.get("/result/")
        other_path = client.post("/tasks/", json={})
    assert failed.status_code == 503
    assert failed.json()["detail"].startswith("injected fault")
    assert other_method.status_code == other_path.status_code == 200
    assert rule.fired == 1
    assert upstream.count("/result/") == 1  # only the GET got through
    assert proxy.counts["connections"] == 1


def test_reset_before_drops_the_connection_and_the_server_never_sees_the_request(
    proxy: FaultProxy, upstream: Upstream
) -> None:
    proxy.add_rule(Fault.RESET_BEFORE, "^/result/")
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        with pytest.raises(httpx.TransportError):
            client.post("/result/", content=b"{}")
        assert client.get("/other").status_code == 200  # a new connection works
    assert upstream.count("/result/") == 0
    assert proxy.counts["reset_before"] == 1


def test_reset_after_lets_the_server_answer_and_the_client_sees_a_dropped_connection(
    proxy: FaultProxy, upstream: Upstream
) -> None:
    proxy.add_rule(Fault.RESET_AFTER, "^/result/")
    with (
        httpx.Client(base_url=proxy.url, timeout=10) as client,
        pytest.raises(httpx.TransportError),
    ):
        client.post("/result/", content=b"{}")
    assert upstream.count("/result/") == 1
    assert proxy.counts["reset_after"] == 1
    assert proxy.events[-1].status == 200  # what the server answered, never delivered


def test_hang_never_answers_until_the_client_times_out(
    proxy: FaultProxy, upstream: Upstream
) -> None:
    proxy.add_rule(Fault.HANG, "^/slow$")
    proxy.add_rule(Fault.HANG_AFTER, "^/slow-after$")
    with httpx.Client(base_url=proxy.url, timeout=0.5) as client:
        start = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            client.get("/slow")
        assert time.monotonic() - start >= 0.5
        with pytest.raises(httpx.ReadTimeout):
            client.get("/slow-after")
    assert upstream.count("/slow-after") == 1
    assert upstream.count("/slow") == 1  # only the hang_after one reached the server
    assert proxy.counts["hang"] == proxy.counts["hang_after"] == 1


def test_delay_holds_the_request_then_forwards_it(proxy: FaultProxy, upstream: Upstream) -> None:
    proxy.add_rule(Fault.DELAY, "^/d$", delay_s=0.4)
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        start = time.monotonic()
        r = client.get("/d")
        elapsed = time.monotonic() - start
    assert r.status_code == 200 and elapsed >= 0.4
    assert upstream.count("/d") == 1 and proxy.counts["delay"] == 1


def _outcomes(proxy: FaultProxy, n: int) -> list[str]:
    out = []
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        for _ in range(n):
            try:
                r = client.post("/result/", content=b"{}")
                out.append(str(r.status_code))
            except httpx.TransportError:
                out.append("reset")
    return out


def test_rates_partition_one_seeded_draw_per_request(upstream: Upstream) -> None:
    runs = []
    for _ in range(2):
        with FaultProxy(upstream.address, seed=1234) as p:
            s = p.add_rule(Fault.STATUS, "^/result/", rate=0.3)
            r = p.add_rule(Fault.RESET_AFTER, "^/result/", rate=0.1)
            outcomes = _outcomes(p, 400)
            runs.append((outcomes, s.fired, r.fired))
    (outcomes, status_fired, reset_fired), again = runs
    assert runs[0] == again  # the same seed gives the same faults in the same order
    assert outcomes.count("503") == status_fired and outcomes.count("reset") == reset_fired
    assert outcomes.count("200") == 400 - status_fired - reset_fired
    assert 90 <= status_fired <= 150  # 30 % of 400 = 120
    assert 20 <= reset_fired <= 60  # 10 % of 400 = 40


def test_an_outage_fails_every_matching_request_while_its_flag_is_set(
    proxy: FaultProxy, upstream: Upstream
) -> None:
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        assert client.post("/result/").status_code == 200
        with proxy.outage("^/result/", method="POST") as outage:
            for _ in range(3):
                with pytest.raises(httpx.TransportError):
                    client.post("/result/")
            assert client.get("/result/").status_code == 200  # other methods pass
        assert client.post("/result/").status_code == 200
    assert outage.refused == 3
    assert outage.began_at is not None and outage.ended_at is not None
    assert outage.ended_at >= outage.began_at
    assert upstream.count("/result/") == 3


def test_an_outage_triggered_after_n_requests_lasts_its_duration(
    proxy: FaultProxy, upstream: Upstream
) -> None:
    outage = proxy.add_outage("^/result/", after=2, duration_s=0.6, fault=Fault.STATUS)
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        first = [client.post("/result/").status_code for _ in range(2)]
        during = [client.post("/result/").status_code for _ in range(3)]
        assert outage.wait_started(1)
        assert outage.began_at is not None
        while time.time() < outage.began_at + 0.6:
            time.sleep(0.02)
        after = [client.post("/result/").status_code for _ in range(2)]
    assert first == [200, 200] and during == [503] * 3 and after == [200, 200]
    assert outage.over and outage.ended_at == pytest.approx(outage.began_at + 0.6)
    assert outage.refused == 3 and outage.passed == 4


def test_an_outage_window_fails_requests_between_two_moments(
    proxy: FaultProxy, upstream: Upstream
) -> None:
    now = time.time()
    outage = proxy.add_outage(window=(now + 0.3, now + 0.8))
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        assert client.get("/before").status_code == 200
        while time.time() < now + 0.35:
            time.sleep(0.02)
        with pytest.raises(httpx.TransportError):
            client.get("/during")
        while time.time() < now + 0.85:
            time.sleep(0.02)
        assert client.get("/after").status_code == 200
    assert outage.refused == 1 and outage.over
    assert upstream.count("/during") == 0


def test_a_server_that_is_down_looks_like_a_dropped_connection(upstream: Upstream) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    with (
        FaultProxy(("127.0.0.1", dead_port)) as p,
        httpx.Client(base_url=p.url, timeout=10) as client,
    ):
        with pytest.raises(httpx.TransportError):
            client.get("/x")
        p.upstream = upstream.address  # the server is back (e.g. restarted elsewhere)
        assert client.get("/x").status_code == 200
    assert p.counts["upstream_down"] == 1 and p.counts["forwarded"] == 1


async def test_the_proxy_serves_async_clients_concurrently(
    proxy: FaultProxy, upstream: Upstream
) -> None:
    import asyncio

    proxy.add_rule(Fault.DELAY, "^/slow", delay_s=0.5)
    async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
        start = time.monotonic()
        answers = await asyncio.gather(*(client.get(f"/slow/{i}") for i in range(8)))
        elapsed = time.monotonic() - start
    assert all(a.status_code == 200 for a in answers)
    assert elapsed < 1.5  # eight 0.5 s delays overlapped
