"""A `trapline server` process SIGKILLed after committing a result and before its ACK.

The server reaches NATS through a small TCP proxy that reads the NATS client
protocol the server sends. Once armed, the proxy holds back the first JetStream
``+ACK`` publish (``PUB $JS.ACK.… +ACK``) — the ACK that follows a committed
result — and SIGKILLs the server process before a byte of it reaches NATS. The
message therefore comes back when its lease lapses, and only the ledger knows the
image is done.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import nats
import pytest
from sqlalchemy import select

from tests.chaos.helpers import create_job, image_detail, job_view
from tests.support import bodies
from tests.support.polling import until
from tests.support.processes import Processes, ServerProcess
from trapline.ledger.db import create_engine, session_factory
from trapline.ledger.models import JobImage
from trapline.queue import EmbeddedNats, parse_receipt

pytestmark = pytest.mark.chaos

ACK_WAIT_S = 2.0
_CRLF = b"\r\n"


@dataclass
class AckTrap:
    """TCP proxy client ──► NATS that, when armed, kills the client process at its first ``+ACK``.

    Only the client-to-server direction is parsed (op by op: control lines, and
    ``PUB``/``HPUB`` with their payloads); everything else is forwarded as it comes.
    """

    upstream: tuple[str, int]
    kill: Callable[[], object]
    armed: bool = False
    trapped: list[str] = field(default_factory=list)  # subjects of the ACKs held back
    port: int = 0
    _server: asyncio.Server | None = None
    _pumps: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for pump in list(self._pumps):
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            nats_r, nats_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.close()
            return
        down = asyncio.create_task(self._copy(nats_r, client_w))
        up = asyncio.create_task(self._client_to_nats(client_r, nats_w))
        for task in (down, up):
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)
        await asyncio.wait({down, up}, return_when=asyncio.FIRST_COMPLETED)
        for task in (down, up):
            task.cancel()
        for writer in (client_w, nats_w):
            writer.close()

    @staticmethod
    async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()

    async def _client_to_nats(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        buf = bytearray()
        while chunk := await reader.read(65536):
            buf += chunk
            out, trapped = self._take_ops(buf)
            writer.write(out)
            await writer.drain()
            if trapped:
                return  # nothing after the held-back ACK is forwarded

    def _take_ops(self, buf: bytearray) -> tuple[bytes, bool]:
        """Remove the complete ops at the head of ``buf``; (bytes to forward, trap fired)."""
        out = bytearray()
        while (end := buf.find(_CRLF)) >= 0:
            line = bytes(buf[:end])
            words = line.split()
            op = words[0].upper() if words else b""
            size = end + 2
            payload = b""
            if op in (b"PUB", b"HPUB"):
                size += int(words[-1]) + 2
                if len(buf) < size:
                    break  # the payload has not arrived yet
                payload = bytes(buf[end + 2 : size - 2])
            subject = words[1].decode() if len(words) > 1 else ""
            if (
                self.armed
                and op == b"PUB"
                and subject.startswith("$JS.ACK.")
                and payload.startswith(b"+ACK")
            ):
                self.armed = False
                self.trapped.append(subject)
                self.kill()
                return bytes(out), True
            out += buf[:size]
            del buf[:size]
        return bytes(out), False


@pytest.fixture
async def nats_direct(nats_server: EmbeddedNats) -> AsyncIterator[Any]:
    """A NATS connection of the test's own, to read consumer state."""
    nc = await nats.connect(nats_server.url)
    try:
        yield nc
    finally:
        await nc.close()


async def _ledger_states(database_url: str, job_id: int) -> dict[str, str]:
    engine = create_engine(database_url)
    try:
        async with session_factory(engine)() as session:
            rows = await session.execute(
                select(JobImage.image_id, JobImage.state).where(JobImage.job_id == job_id)
            )
            return {r.image_id: str(r.state) for r in rows}
    finally:
        await engine.dispose()


async def _reserve(server: ServerProcess, job_id: int, n: int) -> list[dict[str, Any]]:
    async with server.client(server.worker_token) as w:
        r = await w.post(f"/api/v2/jobs/{job_id}/tasks/", json={"batch_size": n})
    assert r.status_code == 200, r.text
    return list(r.json()["tasks"])


async def _post(server: ServerProcess, job_id: int, items: list[dict[str, Any]]) -> httpx.Response:
    async with server.client(server.worker_token) as w:
        return await w.post(f"/api/v2/jobs/{job_id}/result/", json={"results": items})


async def test_a_server_killed_between_commit_and_ack_never_hands_the_image_out_again(
    database_url: str,
    nats_server: EmbeddedNats,
    nats_direct: Any,
    procs: Processes,
) -> None:
    host, port = nats_server.url.removeprefix("nats://").split(":")
    server: ServerProcess | None = None

    def kill_server() -> None:
        assert server is not None
        server.kill()

    trap = AckTrap((host, int(port)), kill_server)
    await trap.start()
    try:
        server = await procs.server(
            database_url=database_url, nats_url=trap.url, ack_wait_s=ACK_WAIT_S
        )
        job = await create_job(server, 3)
        tasks = await _reserve(server, job["id"], 3)
        assert len(tasks) == 3
        committed, *others = tasks
        trap.armed = True
        with pytest.raises(httpx.TransportError):
            await _post(server, job["id"], [bodies.success(committed)])
        assert await server.wait(10) == -9  # SIGKILLed by the trap, not ended otherwise
        # The trap held back exactly this result's ACK, and the ledger had committed it.
        assert trap.trapped == [committed["reply_subject"]]
        states = await _ledger_states(database_url, job["id"])
        assert states == {committed["image_id"]: "done"} | {
            t["image_id"]: "reserved" for t in others
        }

        await server.start_and_wait()
        stream = parse_receipt(committed["reply_subject"]).stream
        handed_out: dict[str, dict[str, Any]] = {}
        other_ids = {t["image_id"] for t in others}

        async def lapsed_and_settled() -> bool:
            # JetStream redelivers only to a waiting pull, so keep reserving.
            handed_out.update((t["image_id"], t) for t in await _reserve(server, job["id"], 3))
            if committed["image_id"] in handed_out:
                return True  # handed out again: fail on the assert below, not by timeout
            info = await nats_direct.jetstream().consumer_info(stream, "workers")
            # The committed image's message came back and was ACKed: only the others are held.
            return handed_out.keys() == other_ids and info.num_ack_pending == len(other_ids)

        await until(lapsed_and_settled, "the leases to lapse and the messages to return", 20)
        assert sorted(handed_out) == sorted(other_ids)
        answer = await _post(server, job["id"], [bodies.success(t) for t in handed_out.values()])
        assert answer.status_code == 200, answer.text
        view = await job_view(server, job["id"])
        detail = await image_detail(server, job["id"], committed["image_id"])
    finally:
        await trap.stop()
    assert view["status"] == "SUCCESS"
    assert view["counts"] == {"total": 3, "queued": 0, "reserved": 0, "done": 3, "failed": 0}
    assert view["detections"] == 3  # one per image: the committed result counted once
    messages = [h["message"] for h in detail["history"]]
    assert sum("reserved by" in m for m in messages) == 1, messages
    assert sum(m.startswith("result accepted") for m in messages) == 1, messages
