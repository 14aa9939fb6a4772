"""Backoff, Retry-After, base URL handling and task validation."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import format_datetime

from trapline.worker.client import normalize_base_url, parse_retry_after
from trapline.worker.delivery import backoff_delay
from trapline.worker.tasks import parse_tasks


def test_backoff_is_full_jitter_and_capped() -> None:
    rng = random.Random(1)
    for attempt in range(12):
        ceiling = min(4.0, 0.5 * 2**attempt)
        delays = [backoff_delay(attempt, 4.0, rng) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays)
        # Full jitter spreads over the whole range, not just near the ceiling.
        assert min(delays) < ceiling * 0.2 and max(delays) > ceiling * 0.8
    assert backoff_delay(1000, 4.0, rng) <= 4.0


def test_retry_after_seconds_and_http_date() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    when = datetime(2030, 1, 1, 0, 0, 10, tzinfo=UTC)
    now = datetime(2030, 1, 1, 0, 0, 0, tzinfo=UTC).timestamp()
    assert parse_retry_after(format_datetime(when, usegmt=True), now=now) == 10.0
    assert parse_retry_after("-5") == 0.0


def test_base_url_accepts_the_ami_form() -> None:
    assert normalize_base_url("http://h:8000") == "http://h:8000"
    assert normalize_base_url("http://h:8000/") == "http://h:8000"
    assert normalize_base_url("http://h:8000/api/v2/") == "http://h:8000"
    assert normalize_base_url("https://h/antenna/api/v2") == "https://h/antenna"


def test_parse_tasks_flags_malformed_tasks() -> None:
    parsed = parse_tasks(
        7,
        [
            {"id": "7:1", "image_id": "1", "image_url": "http://x/1", "reply_subject": "A"},
            {"id": 2, "image_id": 2, "image_url": "http://x/2", "reply_subject": "B"},
            {"id": "7:3", "image_id": "3", "reply_subject": "C"},
            {"id": "7:4", "image_id": "4", "image_url": "http://x/4"},
            "not a task",
            {"id": "7:1", "image_id": "1", "image_url": "http://x/1", "reply_subject": "A"},
        ],
    )
    assert [t.reply_subject for t in parsed.tasks] == ["A", "B", "C"]
    assert parsed.dropped == 2
    assert "A" not in parsed.errors
    assert parsed.errors["B"] == (
        "malformed task: id is int, not a string; image_id is int, not a string"
    )
    assert parsed.errors["C"] == "malformed task: image_url is null, not a URL"
    assert parsed.tasks[1].image_id == "2"  # still named in its error result
