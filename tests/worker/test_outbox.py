"""The durable outbox: persistence, status, splitting, slots and adoption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trapline.worker.outbox import Outbox
from trapline.worker.results import error_item


def items(*image_ids: str) -> list[dict[str, object]]:
    return [error_item(f"S{i}", i, "x") for i in image_ids]


def test_batches_survive_reopening_until_deleted(tmp_path: Path) -> None:
    outbox = Outbox.open(tmp_path)
    first = outbox.add_sync(7, items("a", "b"))
    second = outbox.add_sync(8, items("c"))
    assert json.loads(first.body) == {"results": items("a", "b")}
    outbox.close()

    reopened = Outbox.open(tmp_path)
    assert reopened.path == outbox.path  # the same slot, free again
    pending = reopened.entries_sync()
    assert [(e.id, e.job_id, e.image_ids) for e in pending] == [
        (first.id, 7, ["a", "b"]),
        (second.id, 8, ["c"]),
    ]
    assert pending[0].reply_subjects == ["Sa", "Sb"]
    reopened.delete_sync(first.id)
    assert [e.id for e in reopened.entries_sync()] == [second.id]
    reopened.close()


def test_attempts_and_rejection_are_recorded(tmp_path: Path) -> None:
    outbox = Outbox.open(tmp_path)
    entry = outbox.add_sync(1, items("a"))
    outbox.record_attempt_sync(entry.id, "HTTP 503: down")
    outbox.record_attempt_sync(entry.id, "ReadTimeout")
    stored = outbox.get_sync(entry.id)
    assert stored is not None and (stored.attempts, stored.last_error) == (2, "ReadTimeout")
    outbox.mark_rejected_sync(entry.id, "HTTP 400: bad")
    assert outbox.entries_sync("pending") == []
    [rejected] = outbox.entries_sync("rejected")
    assert rejected.last_error == "HTTP 400: bad"
    outbox.close()


def test_split_replaces_a_batch_by_its_halves(tmp_path: Path) -> None:
    outbox = Outbox.open(tmp_path)
    entry = outbox.add_sync(3, items("a", "b", "c"))
    left, right = outbox.split_sync(entry)
    assert (left.image_ids, right.image_ids) == (["a"], ["b", "c"])
    assert [e.id for e in outbox.entries_sync()] == [left.id, right.id]
    assert left.created_at == entry.created_at
    with pytest.raises(ValueError):
        outbox.split_sync(left)
    outbox.close()


def test_live_processes_get_separate_slots_and_orphans_are_adopted(tmp_path: Path) -> None:
    one = Outbox.open(tmp_path)
    two = Outbox.open(tmp_path)  # slot 0 is locked: slot 1
    assert one.path != two.path
    two.add_sync(5, items("x", "y"))
    assert one.adopt_orphans_sync() == 0  # slot 1 is owned by a live outbox
    two.close()  # its process "died" with a batch left

    assert one.adopt_orphans_sync() == 1
    assert [e.image_ids for e in one.entries_sync()] == [["x", "y"]]
    # The orphan slot is empty now, so nothing is adopted twice.
    assert one.adopt_orphans_sync() == 0
    one.close()


async def test_async_api_runs_in_a_thread(tmp_path: Path) -> None:
    outbox = Outbox.open(tmp_path)
    entry = await outbox.add(1, items("a", "b"))
    left, right = await outbox.split(entry)
    await outbox.record_attempt(left.id, None)
    await outbox.mark_rejected(right.id, "no")
    await outbox.delete(left.id)
    assert await outbox.entries() == []
    assert [e.image_ids for e in await outbox.entries("rejected")] == [["b"]]
    outbox.close()
