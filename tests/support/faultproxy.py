"""An HTTP/1.1 fault-injection proxy for chaos tests: worker ──► proxy ──► server.

The proxy runs its own asyncio loop in a daemon thread, so it keeps answering
whatever the test's loop (or a blocking call in it) is doing, and it can sit in
front of an in-process server or a server subprocess alike. It speaks just enough
HTTP/1.1 to forward requests faithfully: keep-alive on the client side (httpx
reuses connections), ``Content-Length`` and chunked bodies both ways, HEAD and
bodiless statuses. Every forwarded request gets its own upstream connection, so a
server restarted behind the proxy is picked up by the next request.

Faults are chosen per request by :class:`Rule` (method + path regex) and
:class:`Outage` (all matching requests fail while it is active):

- ``status``: answer ``status`` (503 by default) without forwarding;
- ``reset_before``: reset the client connection (TCP RST) before the server sees
  the request;
- ``reset_after``: forward, read the server's whole answer (it has committed),
  then reset the client connection instead of answering;
- ``hang``: never answer and never forward, until the client gives up;
- ``hang_after``: forward (the server commits), then never answer;
- ``delay``: wait ``delay_s``, then forward.

Rates use one seeded :class:`random.Random`: each request draws one number in
[0, 1), and the matching rules, in the order they were added, take consecutive
slices of that interval (two rules of rate 0.3 and 0.1 fire on 30 % and 10 % of
matching requests, never both). Outages are checked before rules.

Everything the proxy did is counted in :attr:`FaultProxy.counts` and logged in
:attr:`FaultProxy.events` (with wall-clock times, comparable to server times).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import random
import re
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

MAX_HEAD_BYTES = 1024 * 1024
_BODYLESS_STATUSES = {204, 304}
_REASONS = {
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class Fault(enum.StrEnum):
    STATUS = "status"
    RESET_BEFORE = "reset_before"
    RESET_AFTER = "reset_after"
    HANG = "hang"
    HANG_AFTER = "hang_after"
    DELAY = "delay"


@dataclass
class Rule:
    """A fault applied to ``rate`` of the requests matching ``method`` and ``path``.

    ``method`` is an exact method (case-insensitive) or None for any; ``path`` is a
    regex searched in the request path (without the query string). Change
    ``enabled`` or ``rate`` at any time; ``fired`` counts the requests it took.
    """

    fault: Fault
    path: str = ".*"
    method: str | None = None
    rate: float = 1.0
    status: int = 503
    delay_s: float = 0.0
    enabled: bool = True
    fired: int = 0
    _regex: re.Pattern[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._regex = re.compile(self.path)
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {self.rate}")

    def matches(self, method: str, path: str) -> bool:
        if not self.enabled:
            return False
        if self.method is not None and self.method.upper() != method.upper():
            return False
        return self._regex.search(path) is not None


@dataclass
class Outage:
    """Every matching request fails (connection reset, or ``status``) while active.

    Active between :meth:`begin` and :meth:`end`, within ``window`` (``time.time()``
    values), or, with ``after`` set, from the moment ``after`` matching requests
    have been let through, for ``duration_s`` seconds (for ever if None).
    :meth:`end` finishes it for good. ``began_at`` / ``ended_at`` record (wall
    clock) when it actually started and ended; ``refused`` counts the requests it
    failed, ``passed`` those let through while it was inactive.
    """

    path: str = ".*"
    method: str | None = None
    fault: Fault = Fault.RESET_BEFORE
    status: int = 503
    after: int | None = None
    duration_s: float | None = None
    window: tuple[float, float] | None = None
    refused: int = 0
    passed: int = 0
    began_at: float | None = None
    ended_at: float | None = None
    _manual: bool = field(default=False, repr=False)
    _closed: bool = field(default=False, repr=False)
    _regex: re.Pattern[str] = field(init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _started: threading.Event = field(default_factory=threading.Event, repr=False)
    _finished: threading.Event = field(default_factory=threading.Event, repr=False)

    def __post_init__(self) -> None:
        self._regex = re.compile(self.path)
        if self.fault not in (Fault.RESET_BEFORE, Fault.STATUS, Fault.HANG):
            raise ValueError("an outage resets, answers a status or hangs")

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and self.method.upper() != method.upper():
            return False
        return self._regex.search(path) is not None

    def begin(self) -> None:
        """Start now (until :meth:`end`)."""
        with self._lock:
            if not self._closed:
                self._manual = True
                self._mark_begin(time.time())

    def end(self) -> None:
        """End now, for good (a later trigger or window does not start it again)."""
        with self._lock:
            self._active(time.time())  # settle a window or timed trigger that is over
            self._manual = False
            self._closed = True
            if self.began_at is not None:
                self._mark_end(time.time())

    def _mark_begin(self, at: float) -> None:
        if self.began_at is None:
            self.began_at = at
            self._started.set()

    def _mark_end(self, at: float) -> None:
        if self.ended_at is None:
            self.ended_at = at
            self._finished.set()

    def _active(self, now: float) -> bool:
        if self._closed:
            return False
        if self._manual:
            return True
        if self.window is not None:
            if self.window[0] <= now < self.window[1]:
                self._mark_begin(self.window[0])
                return True
            if now >= self.window[1] and self.began_at is not None:
                self._mark_end(self.window[1])
        if self.after is not None and self.passed >= self.after:
            self._mark_begin(now)
            assert self.began_at is not None
            if self.duration_s is None or now < self.began_at + self.duration_s:
                return True
            self._mark_end(self.began_at + self.duration_s)
        return False

    @property
    def active(self) -> bool:
        with self._lock:
            return self._active(time.time())

    @property
    def over(self) -> bool:
        """It has started and ended."""
        with self._lock:
            self._active(time.time())
            return self.ended_at is not None

    def decide(self, method: str, path: str) -> bool:
        """True if this request is refused (and counts it either way)."""
        if not self.matches(method, path):
            return False
        with self._lock:
            if self._active(time.time()):
                self.refused += 1
                return True
            self.passed += 1
            return False

    def wait_started(self, timeout: float) -> bool:
        """Block until it has started (a triggered outage starts with a request)."""
        return self._started.wait(timeout)


@dataclass(frozen=True)
class ProxyEvent:
    at: float  # time.time()
    method: str
    path: str
    action: str  # forwarded | status | reset_before | reset_after | hang | ... | upstream_down
    status: int | None = None
    duration_s: float = 0.0  # from the request read to its outcome (forwarded: the answer)
    worker: str | None = None  # the X-Worker-Id header (trapline workers send one)

    @property
    def arrived_at(self) -> float:
        """When the proxy had read the whole request (``at`` is when it was done with it)."""
        return self.at - self.duration_s


class _Request:
    def __init__(self, head: bytes, body: bytes) -> None:
        self.head = head
        self.body = body
        self.received_at = time.time()
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            raise ValueError(f"bad request line {lines[0]!r}")
        self.method, self.target, self.version = parts
        self.path = self.target.split("?", 1)[0]
        self.headers = _parse_headers(lines[1:])

    @property
    def keep_alive(self) -> bool:
        conn = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn


def _parse_headers(lines: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        if not line:
            continue
        name, _, value = line.partition(":")
        key = name.strip().lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes | None:
    """The raw body framed by Content-Length or chunked; None when framed by close."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        out = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            out += size_line
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while True:  # trailers up to the empty line
                    line = await reader.readuntil(b"\r\n")
                    out += line
                    if line == b"\r\n":
                        return bytes(out)
            out += await reader.readexactly(size + 2)
    length = headers.get("content-length")
    if length is not None:
        return await reader.readexactly(int(length.split(",")[0].strip()))
    return None


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), the way a crashed or vanished peer looks."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _synth_response(status: int, detail: str, keep_alive: bool) -> bytes:
    body = json.dumps({"detail": detail}).encode()
    reason = _REASONS.get(status, "Injected")
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        f"connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    )
    return head.encode("latin-1") + body


class FaultProxy:
    """Forwards HTTP/1.1 to ``upstream`` (host, port) and injects faults; see the module doc.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. Safe to
    configure from any thread while it runs.
    """

    def __init__(
        self, upstream: tuple[str, int], *, seed: int = 0, host: str = "127.0.0.1"
    ) -> None:
        self.upstream = upstream
        self.host = host
        self.port = 0
        self.rng = random.Random(seed)
        self.rules: list[Rule] = []
        self.outages: list[Outage] = []
        self.events: list[ProxyEvent] = []
        self.counts: Counter[str] = Counter()
        self.upstream_connect_timeout_s = 5.0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._stopping: asyncio.Event | None = None

    # -- configuration -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def add_rule(
        self,
        fault: Fault | str,
        path: str = ".*",
        *,
        method: str | None = None,
        rate: float = 1.0,
        status: int = 503,
        delay_s: float = 0.0,
    ) -> Rule:
        rule = Rule(Fault(fault), path, method=method, rate=rate, status=status, delay_s=delay_s)
        with self._lock:
            self.rules.append(rule)
        return rule

    def add_outage(
        self,
        path: str = ".*",
        *,
        method: str | None = None,
        fault: Fault | str = Fault.RESET_BEFORE,
        status: int = 503,
        after: int | None = None,
        duration_s: float | None = None,
        window: tuple[float, float] | None = None,
    ) -> Outage:
        outage = Outage(
            path,
            method=method,
            fault=Fault(fault),
            status=status,
            after=after,
            duration_s=duration_s,
            window=window,
        )
        with self._lock:
            self.outages.append(outage)
        return outage

    def clear(self) -> None:
        """Remove every rule and outage (counters and events stay)."""
        with self._lock:
            self.rules.clear()
            self.outages.clear()

    @contextlib.contextmanager
    def outage(self, path: str = ".*", **kwargs: Any) -> Iterator[Outage]:
        """An outage active for the ``with`` block."""
        o = self.add_outage(path, **kwargs)
        o.begin()
        try:
            yield o
        finally:
            o.end()

    def count(self, action: str, method: str | None = None, path: str | None = None) -> int:
        """Events of one action, optionally only those matching a method and a path regex."""
        regex = re.compile(path) if path is not None else None
        with self._lock:
            events = list(self.events)
        return sum(
            1
            for e in events
            if e.action == action
            and (method is None or e.method == method.upper())
            and (regex is None or regex.search(e.path))
        )

    def events_matching(
        self, method: str | None = None, path: str | None = None
    ) -> list[ProxyEvent]:
        regex = re.compile(path) if path is not None else None
        with self._lock:
            events = list(self.events)
        return [
            e
            for e in events
            if (method is None or e.method == method.upper())
            and (regex is None or regex.search(e.path))
        ]

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> FaultProxy:
        ready = threading.Event()
        error: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._open())
            except BaseException as exc:
                error.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="fault-proxy", daemon=True)
        self._thread.start()
        ready.wait(10)
        if error:
            raise error[0]
        return self

    async def _open(self) -> None:
        self._stopping = asyncio.Event()
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, limit=MAX_HEAD_BYTES
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        fut = asyncio.run_coroutine_threadsafe(self._close(), loop)
        with contextlib.suppress(Exception):
            fut.result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)

    async def _close(self) -> None:
        assert self._stopping is not None
        self._stopping.set()
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    # -- serving ----------------------------------------------------------------------------

    def _record(self, req: _Request, action: str, status: int | None = None) -> None:
        now = time.time()
        with self._lock:
            self.counts[action] += 1
            self.events.append(
                ProxyEvent(
                    now,
                    req.method,
                    req.path,
                    action,
                    status,
                    now - req.received_at,
                    req.headers.get("x-worker-id"),
                )
            )

    def _choose(self, req: _Request) -> tuple[Fault, int, float] | None:
        """The fault for this request, if any: (fault, status, delay)."""
        with self._lock:
            outages = list(self.outages)
            rules = list(self.rules)
        for outage in outages:
            if outage.decide(req.method, req.path):
                return outage.fault, outage.status, 0.0
        matching = [r for r in rules if r.matches(req.method, req.path)]
        if not matching:
            return None
        with self._lock:
            draw = self.rng.random()
        edge = 0.0
        for rule in matching:
            edge += rule.rate
            if draw < edge:
                with self._lock:
                    rule.fired += 1
                return rule.fault, rule.status, rule.delay_s
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        with self._lock:
            self.counts["connections"] += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                    req = _Request(head, b"")
                    body = await _read_body(reader, req.headers)
                    req.body = body or b""
                    req.received_at = time.time()
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    break
                except ValueError:
                    writer.write(_synth_response(400, "bad request", False))
                    break
                with self._lock:
                    self.counts["requests"] += 1
                keep = await self._handle(req, reader, writer)
                if not keep:
                    return
        except (asyncio.CancelledError, ConnectionError):
            pass
        finally:
            self._conns.discard(task)
            if not writer.transport.is_closing():
                with contextlib.suppress(Exception):
                    writer.close()

    async def _handle(
        self, req: _Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Serve one request; False when the client connection is finished."""
        choice = self._choose(req)
        fault, status, delay = choice if choice is not None else (None, 0, 0.0)
        if fault is Fault.STATUS:
            self._record(req, "status", status)
            writer.write(_synth_response(status, f"injected fault: {status}", req.keep_alive))
            await writer.drain()
            return req.keep_alive
        if fault is Fault.RESET_BEFORE:
            self._record(req, "reset_before")
            _reset(writer)
            return False
        if fault is Fault.HANG:
            self._record(req, "hang")
            await self._hang(reader)
            return False
        if fault is Fault.DELAY:
            self._record(req, "delay")
            await asyncio.sleep(delay)
        response = await self._forward(req)
        if response is None:
            self._record(req, "upstream_down")
            _reset(writer)
            return False
        raw, up_status, close_after = response
        if fault is Fault.RESET_AFTER:
            self._record(req, "reset_after", up_status)
            _reset(writer)
            return False
        if fault is Fault.HANG_AFTER:
            self._record(req, "hang_after", up_status)
            await self._hang(reader)
            return False
        self._record(req, "forwarded", up_status)
        writer.write(raw)
        await writer.drain()
        return req.keep_alive and not close_after

    async def _hang(self, reader: asyncio.StreamReader) -> None:
        """Say nothing until the client closes its connection (or the proxy stops)."""
        assert self._stopping is not None
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            while True:
                read = asyncio.ensure_future(reader.read(65536))
                await asyncio.wait({read, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not read.done():
                    read.cancel()
                    return
                try:
                    if not read.result():
                        return
                except ConnectionError:
                    return
        finally:
            stopping.cancel()

    async def _forward(self, req: _Request) -> tuple[bytes, int, bool] | None:
        """Send the request upstream on a fresh connection; (raw response, status, close)."""
        host, port = self.upstream
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, limit=MAX_HEAD_BYTES),
                self.upstream_connect_timeout_s,
            )
        except (OSError, TimeoutError):
            return None
        try:
            up_writer.write(req.head + req.body)
            await up_writer.drain()
            head = await up_reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers = _parse_headers(lines[1:])
            if req.method == "HEAD" or status in _BODYLESS_STATUSES or status < 200:
                body = b""
                close = False
            else:
                framed = await _read_body(up_reader, headers)
                if framed is None:  # framed by close: the client must see a close too
                    framed = await up_reader.read()
                    close = True
                else:
                    close = "close" in headers.get("connection", "").lower()
                body = framed
            return head + body, status, close
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            return None
        finally:
            up_writer.close()
            with contextlib.suppress(Exception):
                await up_writer.wait_closed()
