"""The JetStream facts the design rests on, checked against the real nats-server."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from tests.support.polling import until
from trapline.queue import Delivery, EmbeddedNats, TaskQueue


@pytest.fixture
async def queue(nats_server: EmbeddedNats) -> AsyncIterator[TaskQueue]:
    q = TaskQueue(ack_wait_s=1.0, max_ack_pending=1000, installation=uuid.uuid4().hex[:8])
    await q.connect(nats_server.url)
    yield q
    await q.close()


async def test_publish_returns_stream_sequences_in_order_and_reserve_fills_a_batch(
    queue: TaskQueue,
) -> None:
    await queue.create_job_queue(1, 1)
    seqs = await queue.publish_tasks(1, 1, [{"image_id": str(i)} for i in range(40)])
    assert seqs == list(range(1, 41))
    got = await queue.reserve(1, 1, 16, wait_s=0.5)
    assert [d.payload["image_id"] for d in got] == [str(i) for i in range(16)]
    assert all(d.delivered == 1 for d in got)


async def test_a_stale_receipt_acts_on_the_current_delivery(queue: TaskQueue) -> None:
    """Why the server compares receipts with the ledger before extending or releasing."""
    await queue.create_job_queue(2, 1)
    await queue.publish_tasks(2, 1, [{"image_id": "a"}])
    first = await queue.reserve(2, 1, 1, wait_s=0.5)

    async def redelivered() -> list[Delivery]:
        return await queue.reserve(2, 1, 1, wait_s=0.5)

    # Unacknowledged, the 1 s lease lapses and the message comes back.
    second = await until(redelivered, "the lapsed message's redelivery", 10)
    assert second[0].delivered == 2
    await queue.ack([first[0].reply_subject])  # the stale one

    async def nothing_pending() -> bool:
        stats = await queue.consumer_stats(2, 1)
        assert stats is not None
        return stats.num_ack_pending == 0

    # The consumer applies ACKs asynchronously: wait for the effect.
    await until(nothing_pending, "the consumer to apply the ACK", 5)
    # Nothing is left to deliver: the ACK settled the current (second) delivery.
    assert await queue.reserve(2, 1, 1, wait_s=1.5) == []


async def test_release_redelivers_at_once_and_term_removes_the_message(queue: TaskQueue) -> None:
    await queue.create_job_queue(3, 1)
    await queue.publish_tasks(3, 1, [{"image_id": "a"}, {"image_id": "b"}])
    got = await queue.reserve(3, 1, 2, wait_s=0.5)
    await queue.release([got[0].reply_subject])
    await queue.term([got[1].reply_subject], "test")
    again = await queue.reserve(3, 1, 2, wait_s=0.5)
    assert [(d.payload["image_id"], d.delivered) for d in again] == [("a", 2)]
    assert await queue.delete_job_queue(3, 1) is True
    assert await queue.delete_job_queue(3, 1) is False


async def test_an_empty_queue_answers_no_tasks_after_the_wait(queue: TaskQueue) -> None:
    await queue.create_job_queue(4, 1)
    assert await queue.reserve(4, 1, 16, wait_s=0.2) == []
