"""The reference for bench_e2e: plain nats-py JetStream on the same nats-server.

A stream of its own, configured like a trapline job queue (work-queue retention,
file storage, a 120 s duplicate window, one durable pull consumer with explicit
acks), so the comparison is the queue's own speed against trapline's:

- publish: N messages of ``{"image_id": "<i>"}`` with a ``Nats-Msg-Id`` header, by
  ``publish_async`` in windows of 1,000 acknowledged publishes (as trapline publishes
  a job's tasks);
- fetch(B)+ACK: one consumer that fetches B messages at a time and ACKs each
  (``msg.ack()``), until all N are acknowledged (one final flush before the clock
  stops).

The stream is deleted afterwards.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass

import nats
from nats.aio.client import Client
from nats.js import api

PUBLISH_WINDOW = 1000


@dataclass(frozen=True)
class RawRates:
    publish_msg_s: float
    publish_s: float
    fetch_ack_msg_s: float | None
    fetch_ack_s: float | None


async def _publish(js: nats.js.JetStreamContext, subject: str, stream: str, n: int) -> None:
    for start in range(0, n, PUBLISH_WINDOW):
        futures = [
            await js.publish_async(
                subject,
                json.dumps({"image_id": str(i)}, separators=(",", ":")).encode(),
                stream=stream,
                headers={"Nats-Msg-Id": f"raw:{i}"},
            )
            for i in range(start, min(n, start + PUBLISH_WINDOW))
        ]
        await asyncio.wait_for(asyncio.gather(*futures), timeout=30)


async def _fetch_ack(
    nc: Client, js: nats.js.JetStreamContext, stream: str, n: int, batch: int
) -> None:
    psub = await js.pull_subscribe_bind("raw", stream=stream)
    got = 0
    while got < n:
        msgs = await psub.fetch(min(batch, n - got), timeout=10)
        for m in msgs:
            await m.ack()
        got += len(msgs)
    await nc.flush(timeout=10)
    await psub.unsubscribe()


async def measure(nats_url: str, n: int, batch: int | None) -> RawRates:
    """Publish ``n`` messages, then (when ``batch`` is given) fetch and ACK them all."""
    nc = await nats.connect(nats_url, connect_timeout=5, max_reconnect_attempts=0)
    tag = uuid.uuid4().hex[:10]
    stream, subject = f"BENCHRAW_{tag}", f"benchraw.{tag}"
    js = nc.jetstream()
    try:
        await js.add_stream(
            name=stream,
            subjects=[subject],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
            duplicate_window=120.0,
        )
        await js.add_consumer(
            stream,
            durable_name="raw",
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=300.0,
            max_deliver=-1,
            max_ack_pending=max(1000, 4 * (batch or 1)),
            deliver_policy=api.DeliverPolicy.ALL,
            filter_subject=subject,
        )
        t0 = time.perf_counter()
        await _publish(js, subject, stream, n)
        publish_s = time.perf_counter() - t0
        fetch_s: float | None = None
        if batch is not None:
            t0 = time.perf_counter()
            await _fetch_ack(nc, js, stream, n, batch)
            fetch_s = time.perf_counter() - t0
            # Acks are applied asynchronously by the server: give it a moment.
            for _ in range(20):
                left = (await js.stream_info(stream)).state.messages
                if not left:
                    break
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError(f"raw reference: {left} messages left after fetch+ACK")
        return RawRates(
            publish_msg_s=n / publish_s,
            publish_s=publish_s,
            fetch_ack_msg_s=n / fetch_s if fetch_s else None,
            fetch_ack_s=fetch_s,
        )
    finally:
        try:
            await js.delete_stream(stream)
        finally:
            await nc.close()


def run(nats_url: str, n: int, batch: int | None) -> RawRates:
    return asyncio.run(measure(nats_url, n, batch))
