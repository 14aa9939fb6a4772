"""The task queue on NATS JetStream: one long-lived connection per server process.

Workers never talk to NATS. The server reserves on their behalf with
``no_wait`` pull requests on a private inbox per call (so concurrent reserves
never share a subscription and no lingering pull request can capture messages
after the caller gave up), and acts on receipts by publishing the JetStream
ACK protocol (``+ACK``, ``-NAK``, ``+WPI``, ``+TERM``) to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api

from trapline.errors import QueueError, QueueUnavailable
from trapline.queue import naming

log = logging.getLogger(__name__)

_NS = 1_000_000_000
# Publishes awaiting their acknowledgement at most, and how long to wait for one.
_PUBLISH_WINDOW = 2000
_ACK_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Delivery:
    """One message handed out by a reserve: its payload and its receipt."""

    reply_subject: str
    stream_seq: int
    delivered: int
    payload: dict[str, Any]


@dataclass(frozen=True)
class ConsumerStats:
    delivered: int
    ack_floor: int
    num_pending: int
    num_ack_pending: int
    num_redelivered: int
    num_waiting: int


class TaskQueue:
    """JetStream operations the server needs, over one connection."""

    def __init__(
        self, ack_wait_s: float, max_ack_pending: int, installation: str = "local"
    ) -> None:
        self.names = naming.QueueNames(installation)
        self.ack_wait_s = ack_wait_s
        self.max_ack_pending = max_ack_pending
        self._nc: NATS | None = None
        self._closing = False

    async def connect(self, url: str, timeout_s: float = 5.0) -> None:
        async def _on_error(exc: Exception) -> None:
            log.warning("NATS connection error: %s", exc)

        async def _on_disconnect() -> None:
            if not self._closing:
                log.warning("NATS disconnected; reconnecting")

        async def _on_reconnect() -> None:
            log.info("NATS reconnected")

        try:
            # nats-py retries a failed first connect forever when reconnects are
            # allowed; bound it so a wrong URL fails the start with one line.
            self._nc = await asyncio.wait_for(
                nats.connect(
                    url,
                    connect_timeout=timeout_s,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    error_cb=_on_error,
                    disconnected_cb=_on_disconnect,
                    reconnected_cb=_on_reconnect,
                    name="trapline-server",
                ),
                timeout=timeout_s + 1.0,
            )
        except Exception as exc:  # TimeoutError included
            raise QueueUnavailable(f"cannot connect to NATS at {url}: {exc!r}") from exc

    async def close(self) -> None:
        self._closing = True
        if self._nc is not None and not self._nc.is_closed:
            if self._nc.is_connected:
                await self._nc.drain()
            else:
                await self._nc.close()
        self._nc = None

    @property
    def nc(self) -> NATS:
        if self._nc is None or not self._nc.is_connected:
            raise QueueUnavailable("task queue temporarily unavailable")
        return self._nc

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def server_version(self) -> str:
        return str(self.nc.connected_server_version)

    # -- job queue resources ------------------------------------------------------

    async def create_job_queue(self, job_id: int, generation: int) -> None:
        """Create (idempotently) the job's stream and durable pull consumer."""
        js = self.nc.jetstream()
        stream = self.names.stream(job_id, generation)
        try:
            await js.add_stream(
                name=stream,
                subjects=[self.names.subject(job_id, generation)],
                retention=api.RetentionPolicy.WORK_QUEUE,
                storage=api.StorageType.FILE,
                duplicate_window=120.0,
            )
            await js.add_consumer(
                stream,
                durable_name=naming.CONSUMER,
                ack_policy=api.AckPolicy.EXPLICIT,
                ack_wait=self.ack_wait_s,
                # The retry budget is the ledger's (TRAPLINE_MAX_DELIVER): it fails the
                # image and TERMs the message when the last lease it handed out lapses.
                # JetStream counts deliveries that never reached a worker too (a reserve
                # whose ledger commit failed, a NAK on the way back); with a JetStream
                # limit those could exhaust a message the ledger still holds as queued,
                # stranding it. Unlimited here, bounded by the ledger.
                max_deliver=-1,
                max_ack_pending=self.max_ack_pending,
                deliver_policy=api.DeliverPolicy.ALL,
                filter_subject=self.names.subject(job_id, generation),
            )
        except (TimeoutError, nats.errors.Error) as exc:
            raise _queue_error(exc, f"cannot create the queue of job {job_id}") from exc

    async def delete_job_queue(self, job_id: int, generation: int) -> bool:
        """Delete the job's stream (and with it its consumer). True if it existed."""
        try:
            return bool(
                await self.nc.jetstream().delete_stream(self.names.stream(job_id, generation))
            )
        except nats.js.errors.NotFoundError:
            return False
        except (TimeoutError, nats.errors.Error) as exc:
            raise _queue_error(exc, f"cannot delete the queue of job {job_id}") from exc

    async def job_queue_exists(self, job_id: int, generation: int) -> bool:
        try:
            await self.nc.jetstream().consumer_info(
                self.names.stream(job_id, generation), naming.CONSUMER
            )
            return True
        except nats.js.errors.NotFoundError:
            return False
        except (TimeoutError, nats.errors.Error) as exc:
            raise _queue_error(exc, "cannot look up a job queue") from exc

    async def list_job_streams(self) -> list[tuple[int, int]]:
        """(job id, generation) of every trapline stream on the server."""
        try:
            infos = await self.nc.jetstream().streams_info()
        except (TimeoutError, nats.errors.Error) as exc:
            raise _queue_error(exc, "cannot list streams") from exc
        found = []
        for info in infos:
            parsed = self.names.parse_stream(info.config.name or "")
            if parsed:
                found.append(parsed)
        return found

    async def consumer_stats(self, job_id: int, generation: int) -> ConsumerStats | None:
        try:
            info = await self.nc.jetstream().consumer_info(
                self.names.stream(job_id, generation), naming.CONSUMER
            )
        except nats.js.errors.NotFoundError:
            return None
        except (TimeoutError, nats.errors.Error) as exc:
            raise _queue_error(exc, "cannot read consumer stats") from exc
        return ConsumerStats(
            delivered=info.delivered.stream_seq if info.delivered else 0,
            ack_floor=info.ack_floor.stream_seq if info.ack_floor else 0,
            num_pending=info.num_pending or 0,
            num_ack_pending=info.num_ack_pending or 0,
            num_redelivered=info.num_redelivered or 0,
            num_waiting=info.num_waiting or 0,
        )

    # -- publishing ------------------------------------------------------------------

    async def publish_tasks(
        self, job_id: int, generation: int, payloads: Sequence[dict[str, Any]]
    ) -> list[int]:
        """Publish one message per payload; returns their stream sequences, in order.

        Up to ``_PUBLISH_WINDOW`` publishes are in flight (sliding, not stop-and-wait),
        their acknowledgements read on one inbox subscription and parsed directly
        (nats-py's ``publish_async`` builds a future and a ``PubAck`` per message).
        Each message carries a ``Nats-Msg-Id`` of job, generation and image, so a
        publish retried after a lost ack is deduplicated by the stream. Any publish
        the stream refuses, or no acknowledgement for ``_ACK_TIMEOUT_S``, fails the
        whole call: the caller re-queues under a new generation (a new stream).
        """
        if not payloads:
            return []
        nc = self.nc
        subj = self.names.subject(job_id, generation)
        stream = self.names.stream(job_id, generation)
        acks = _PublishAcks(len(payloads), stream)
        inbox = nc.new_inbox()
        try:
            sub = await nc.subscribe(f"{inbox}.*", cb=acks.on_ack)
            try:
                for n, payload in enumerate(payloads):
                    if n - acks.count >= _PUBLISH_WINDOW:
                        await acks.wait(n - _PUBLISH_WINDOW // 2)
                    await nc.publish(
                        subj,
                        json.dumps(payload, separators=(",", ":")).encode(),
                        reply=f"{inbox}.{n}",
                        headers={"Nats-Msg-Id": f"{job_id}:{generation}:{payload['image_id']}"},
                    )
                await acks.wait(len(payloads))
            finally:
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()
        except QueueError as exc:
            raise type(exc)(f"cannot publish the tasks of job {job_id}: {exc}") from exc
        except (TimeoutError, nats.errors.Error) as exc:
            raise _queue_error(exc, f"cannot publish the tasks of job {job_id}") from exc
        return acks.seqs()

    # -- reserving -------------------------------------------------------------------

    async def reserve(
        self, job_id: int, generation: int, batch: int, wait_s: float
    ) -> list[Delivery]:
        """Take up to ``batch`` messages, waiting at most ``wait_s`` for the batch to fill.

        The pull request expires on the server after ``wait_s``, and we read until
        the batch is full or the server's 404/408 status says the request is over,
        so no message can be delivered to this inbox after we stop listening.
        """
        nc = self.nc
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        api_subject = (
            f"$JS.API.CONSUMER.MSG.NEXT.{self.names.stream(job_id, generation)}.{naming.CONSUMER}"
        )
        request = {"batch": batch, "expires": int(wait_s * _NS)}
        got: list[Delivery] = []
        try:
            await nc.publish(api_subject, json.dumps(request).encode(), reply=inbox)
            loop = asyncio.get_running_loop()
            # Past this the server has not answered at all (NATS down or overloaded).
            give_up = loop.time() + wait_s + 5.0
            while len(got) < batch:
                remaining = give_up - loop.time()
                if remaining <= 0:
                    raise QueueUnavailable("task queue did not answer the reserve in time")
                try:
                    msg = await sub.next_msg(timeout=remaining)
                except nats.errors.TimeoutError:
                    continue
                status = _status(msg)
                if status is None:
                    got.append(_delivery(msg))
                elif status in ("404", "408", "409"):
                    # 404 no messages / 408 request expired / 409 consumer deleted or
                    # limits reached: this pull request is over.
                    break
        except (TimeoutError, nats.errors.Error, QueueUnavailable) as exc:
            if got:
                # Leased but not handed out: give them straight back.
                with contextlib.suppress(QueueError):
                    await self.release([d.reply_subject for d in got])
            raise _queue_error(exc, f"cannot reserve tasks of job {job_id}") from exc
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        return got

    # -- acting on receipts -------------------------------------------------------

    async def ack(self, reply_subjects: Sequence[str]) -> None:
        await self._publish_all(reply_subjects, b"+ACK")

    async def release(self, reply_subjects: Sequence[str], delay_s: float = 0.0) -> None:
        body = (
            b"-NAK"
            if delay_s <= 0
            else b"-NAK " + json.dumps({"delay": int(delay_s * _NS)}).encode()
        )
        await self._publish_all(reply_subjects, body)

    async def extend(self, reply_subjects: Sequence[str]) -> None:
        await self._publish_all(reply_subjects, b"+WPI")

    async def term(self, reply_subjects: Sequence[str], reason: str) -> None:
        # nats-py's msg.term() takes no reason; the protocol does.
        await self._publish_all(reply_subjects, b"+TERM " + reason.encode()[:200])

    async def _publish_all(self, subjects: Sequence[str], body: bytes) -> None:
        if not subjects:
            return
        nc = self.nc
        try:
            for s in subjects:
                await nc.publish(s, body)
            await nc.flush(timeout=5)
        except (TimeoutError, nats.errors.Error) as exc:
            raise _queue_error(exc, "cannot reach the task queue") from exc


class _PublishAcks:
    """The acknowledgements of one batch of publishes, by position (the reply subject's tail)."""

    def __init__(self, n: int, stream: str) -> None:
        self._seqs: list[int] = [0] * n
        self._stream = stream
        self.count = 0
        self._error: str | None = None
        self._target = 0
        self._reached = asyncio.Event()

    async def on_ack(self, msg: Msg) -> None:
        try:
            index = int(msg.subject.rpartition(".")[2])
            ack = json.loads(msg.data)
            seq = int(ack["seq"]) if ack.get("stream") == self._stream else 0
        except (ValueError, KeyError, TypeError, AttributeError):
            index, ack, seq = -1, {}, 0
        if seq <= 0 or not 0 <= index < len(self._seqs) or self._seqs[index]:
            detail = ack.get("error") if isinstance(ack, dict) else None
            self._error = f"publish refused: {detail or _status(msg) or msg.data[:200]!r}"
            self._reached.set()
            return
        self._seqs[index] = seq
        self.count += 1
        if self.count >= self._target:
            self._reached.set()

    async def wait(self, count: int) -> None:
        """Until ``count`` acknowledgements arrived; QueueError on a refusal or a silence."""
        if self.count < count and self._error is None:
            self._target = count
            self._reached.clear()
            try:
                await asyncio.wait_for(self._reached.wait(), timeout=_ACK_TIMEOUT_S)
            except TimeoutError:
                raise QueueUnavailable(
                    f"no publish acknowledgements for {_ACK_TIMEOUT_S:g} s"
                    f" ({self.count} of {len(self._seqs)} acknowledged)"
                ) from None
        if self._error is not None:
            raise QueueError(self._error)

    def seqs(self) -> list[int]:
        return self._seqs


def _status(msg: Msg) -> str | None:
    if msg.headers and "Status" in msg.headers:
        return str(msg.headers["Status"])
    return None


def _delivery(msg: Msg) -> Delivery:
    md = msg.metadata
    try:
        payload = json.loads(msg.data)
    except ValueError:
        payload = {}
    return Delivery(
        reply_subject=msg.reply,
        stream_seq=int(md.sequence.stream),
        delivered=int(md.num_delivered),
        payload=payload,
    )


def _queue_error(exc: BaseException, what: str) -> QueueError:
    unavailable = (
        QueueUnavailable,
        nats.errors.ConnectionClosedError,
        nats.errors.NoServersError,
        nats.errors.TimeoutError,
        asyncio.TimeoutError,
    )
    if isinstance(exc, unavailable):
        return QueueUnavailable(f"{what}: task queue temporarily unavailable ({exc!r})")
    return QueueError(f"{what}: {exc}")
