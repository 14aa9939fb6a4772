"""Delivery of outbox batches to ``POST /api/v2/jobs/{id}/result/``.

The rules (docs/protocol.md): a 2xx means every item answered ``accepted`` or
``duplicate`` is committed, so the batch leaves the outbox; a 5xx or a dropped
connection means nothing is known, so the same body is sent again (the server
is idempotent). Retries use exponential backoff with full jitter, capped low so
delivery resumes within seconds of the server coming back. Nothing is dropped:
a batch that cannot be delivered in time stays in the outbox with an ERROR
naming its images.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from trapline.worker.client import (
    RETRYABLE_STATUSES,
    ApiError,
    WorkerClient,
    error_detail,
    parse_retry_after,
)
from trapline.worker.outbox import Outbox, OutboxEntry
from trapline.worker.results import error_item, is_error_item, item_image_id, item_subject

logger = logging.getLogger(__name__)

T = TypeVar("T")

BACKOFF_BASE_S = 0.5
# Repeat the WARNING about a failing batch at most this often; the rest is DEBUG.
RETRY_LOG_INTERVAL_S = 60.0


def backoff_delay(
    attempt: int, cap_s: float, rng: random.Random, base_s: float = BACKOFF_BASE_S
) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)]."""
    ceiling = min(cap_s, base_s * (2 ** min(attempt, 30)))
    return rng.uniform(0.0, max(0.0, ceiling))


def _ids(pairs: dict[str, str]) -> str:
    return ", ".join(pairs.values())


@dataclass
class DeliveryResult:
    """Outcome of one batch by reply subject; each maps to the image id (rejected: and reason)."""

    job_id: int
    delivered: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, tuple[str, str]] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    kept_entry_ids: list[int] = field(default_factory=list)

    def merge(self, other: DeliveryResult) -> None:
        self.delivered.update(other.delivered)
        self.failed.update(other.failed)
        self.rejected.update(other.rejected)
        self.kept.update(other.kept)
        self.kept_entry_ids.extend(other.kept_entry_ids)


class Deliverer:
    """Delivers outbox batches. Shared by the delivery stage and the outbox sweeps."""

    def __init__(
        self,
        client: WorkerClient,
        outbox: Outbox,
        *,
        deadline_s: float,
        backoff_cap_s: float,
        rng: random.Random | None = None,
    ) -> None:
        self._client = client
        self._outbox = outbox
        self.deadline_s = deadline_s
        self.backoff_cap_s = backoff_cap_s
        self._rng = rng or random.Random()
        self._cutoff: float | None = None
        self._aborted = False
        self._changed = asyncio.Event()

    def set_cutoff(self, monotonic_at: float) -> None:
        """From now on no batch is tried past this instant (graceful shutdown)."""
        self._cutoff = monotonic_at if self._cutoff is None else min(self._cutoff, monotonic_at)
        self._wake()

    def abort(self) -> None:
        """Stop every delivery now; what is not delivered stays in the outbox."""
        self._aborted = True
        self._wake()

    def _wake(self) -> None:
        # Swap the event so waiters woken by it re-check and then wait on a fresh one.
        old, self._changed = self._changed, asyncio.Event()
        old.set()

    def _limit(self, deadline: float) -> float:
        if self._aborted:
            return float("-inf")
        return deadline if self._cutoff is None else min(deadline, self._cutoff)

    async def _run_until(
        self, coro: Coroutine[Any, Any, T], deadline: float
    ) -> tuple[bool, T | None]:
        """Run ``coro`` until it ends or the deadline/cutoff/abort comes first (then cancel it)."""
        task = asyncio.ensure_future(coro)
        try:
            while not task.done():
                remaining = self._limit(deadline) - time.monotonic()
                if remaining <= 0:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    return False, None
                changed = asyncio.ensure_future(self._changed.wait())
                try:
                    await asyncio.wait(
                        {task, changed}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    changed.cancel()
        except asyncio.CancelledError:
            task.cancel()
            raise
        return True, task.result()

    async def deliver(self, entry: OutboxEntry, *, deadline: float | None = None) -> DeliveryResult:
        """Deliver one batch (splitting on 413) until accepted, rejected or out of time."""
        if deadline is None:
            deadline = time.monotonic() + self.deadline_s
        items = entry.items
        body = entry.body.encode()
        attempt = 0
        last_error = "not tried"
        last_warning = float("-inf")
        while True:
            if self._limit(deadline) <= time.monotonic():
                return await self._keep(entry, items, last_error)
            completed, response = await self._run_until(self._post(entry.job_id, body), deadline)
            if not completed:
                last_error = last_error if attempt else "no answer before the deadline"
                return await self._keep(entry, items, last_error)
            retry_after: float | None = None
            if isinstance(response, ApiError):
                last_error = str(response.detail or response)
            else:
                assert response is not None
                status = response.status_code
                if response.is_success:
                    return await self._accepted(entry, items, response)
                if status == 413:
                    return await self._split(entry, items, deadline)
                detail = error_detail(response)
                if not (status in RETRYABLE_STATUSES or status >= 500):
                    return await self._rejected(entry, items, status, detail)
                last_error = f"HTTP {status}: {detail}"
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
            await self._outbox.record_attempt(entry.id, last_error)
            now = time.monotonic()
            if now - last_warning >= RETRY_LOG_INTERVAL_S:
                last_warning = now
                logger.warning(
                    "results of job %s (%d images) not delivered yet: %s; retrying",
                    entry.job_id,
                    len(items),
                    last_error,
                )
            else:
                logger.debug(
                    "delivery attempt %d for job %s failed: %s",
                    attempt + 1,
                    entry.job_id,
                    last_error,
                )
            delay = (
                retry_after
                if retry_after is not None
                else backoff_delay(attempt, self.backoff_cap_s, self._rng)
            )
            attempt += 1
            await self._run_until(asyncio.sleep(delay), deadline)

    async def _post(self, job_id: int, body: bytes) -> httpx.Response | ApiError:
        try:
            return await self._client.post_results(job_id, body)
        except ApiError as exc:
            return exc

    async def _accepted(
        self, entry: OutboxEntry, items: list[dict[str, Any]], response: httpx.Response
    ) -> DeliveryResult:
        # The server committed the batch: it leaves the outbox before anything else.
        await self._outbox.delete(entry.id)
        statuses: dict[str, tuple[str, str]] = {}
        try:
            data = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            data = None  # plain Antenna semantics: a 2xx means stored
        tasks = data.get("tasks") if isinstance(data, dict) else None
        if isinstance(tasks, list):
            for task in tasks:
                if isinstance(task, dict) and isinstance(task.get("reply_subject"), str):
                    statuses[task["reply_subject"]] = (
                        str(task.get("status", "accepted")),
                        str(task.get("reason") or "no reason given"),
                    )
        result = DeliveryResult(entry.job_id)
        for item in items:
            subject, image_id = item_subject(item), item_image_id(item)
            status, reason = statuses.get(subject, ("accepted", ""))
            if status == "rejected":
                result.rejected[subject] = (image_id, reason)
                logger.warning(
                    "job %s: server rejected the result of image %s: %s",
                    entry.job_id,
                    image_id,
                    reason,
                )
            elif is_error_item(item):
                result.failed[subject] = image_id
            else:
                result.delivered[subject] = image_id
        return result

    async def _rejected(
        self, entry: OutboxEntry, items: list[dict[str, Any]], status: int, detail: str
    ) -> DeliveryResult:
        await self._outbox.mark_rejected(entry.id, f"HTTP {status}: {detail}")
        result = DeliveryResult(entry.job_id)
        for item in items:
            result.rejected[item_subject(item)] = (item_image_id(item), f"HTTP {status}: {detail}")
        logger.error(
            "job %s: server refused a result batch (HTTP %d: %s); kept in %s as rejected "
            "(batch #%d); images: %s",
            entry.job_id,
            status,
            detail,
            self._outbox.path,
            entry.id,
            ", ".join(item_image_id(i) for i in items),
        )
        return result

    async def _split(
        self, entry: OutboxEntry, items: list[dict[str, Any]], deadline: float
    ) -> DeliveryResult:
        if len(items) == 1:
            return await self._too_large(entry, items[0], deadline)
        first, second = await self._outbox.split(entry)
        logger.info(
            "job %s: result batch of %d images too large for the server (413); sending halves",
            entry.job_id,
            len(items),
        )
        result = await self.deliver(first, deadline=deadline)
        result.merge(await self.deliver(second, deadline=deadline))
        return result

    async def _too_large(
        self, entry: OutboxEntry, item: dict[str, Any], deadline: float
    ) -> DeliveryResult:
        """One result alone is over the limit: keep it (rejected) and record the failure instead."""
        subject, image_id = item_subject(item), item_image_id(item)
        size = len(entry.body.encode())
        reason = f"result too large for the server (HTTP 413 for {size} bytes)"
        await self._outbox.mark_rejected(entry.id, reason)
        logger.error(
            "job %s: the result of image %s is too large to deliver (%d bytes); kept in %s "
            "(batch #%d) and reported as failed",
            entry.job_id,
            image_id,
            size,
            self._outbox.path,
            entry.id,
        )
        result = DeliveryResult(entry.job_id)
        result.rejected[subject] = (image_id, reason)
        if is_error_item(item):
            return result
        substitute = await self._outbox.add(entry.job_id, [error_item(subject, image_id, reason)])
        sub = await self.deliver(substitute, deadline=deadline)
        # The image's outcome is what the server recorded for the substitute; the
        # result itself counts as rejected either way.
        result.kept.update(sub.kept)
        result.kept_entry_ids.extend(sub.kept_entry_ids)
        return result

    async def _keep(
        self, entry: OutboxEntry, items: list[dict[str, Any]], last_error: str
    ) -> DeliveryResult:
        result = DeliveryResult(entry.job_id)
        for item in items:
            result.kept[item_subject(item)] = item_image_id(item)
        result.kept_entry_ids.append(entry.id)
        why = "delivery aborted" if self._aborted else "not delivered in time"
        logger.error(
            "job %s: results of %d images %s (last error: %s); kept in %s (batch #%d) for a "
            "later attempt; images: %s",
            entry.job_id,
            len(items),
            why,
            last_error,
            self._outbox.path,
            entry.id,
            _ids(result.kept),
        )
        return result
