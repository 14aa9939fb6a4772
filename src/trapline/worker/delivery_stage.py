"""The delivery stage: outbox entries to the server, and each receipt's outcome to the registry.

``DELIVERY_CONCURRENCY`` delivery loops take entries from the compute stage;
a batch the :class:`~trapline.worker.delivery.Deliverer` keeps (deadline
passed) is swept again later, as are leftovers of earlier runs at start-up.
"""

from __future__ import annotations

import asyncio
import logging
import time

from trapline.worker.delivery import Deliverer, DeliveryResult
from trapline.worker.leases import HeldTasks, Outcome
from trapline.worker.lifecycle import Halt
from trapline.worker.outbox import Outbox, OutboxEntry

logger = logging.getLogger(__name__)

DELIVERY_CONCURRENCY = 2
DELIVER_QUEUE_SIZE = 2
OUTBOX_SWEEP_INTERVAL_S = 60.0


class DeliveryStage:
    """Delivers entries from ``in_q`` (``None`` ends one loop) and records every outcome.

    ``recovered`` counts results of earlier runs delivered now (their tasks are
    not in this run's registry).
    """

    def __init__(
        self,
        deliverer: Deliverer,
        outbox: Outbox,
        held: HeldTasks,
        *,
        halt: Halt,
        in_q: asyncio.Queue[OutboxEntry | None],
    ) -> None:
        self._deliverer = deliverer
        self._outbox = outbox
        self.held = held
        self._halt = halt
        self._in_q = in_q
        self._kept_entry_ids: list[int] = []
        self.recovered = 0

    async def deliver_leftovers(self, deadline_s: float) -> None:
        """Deliver what earlier runs left in the outbox, all within one ``deadline_s``."""
        rejected = await self._outbox.entries("rejected")
        if rejected:
            logger.warning(
                "%d result batch(es) the server refused earlier are kept in %s (images: %s)",
                len(rejected),
                self._outbox.path,
                ", ".join(i for e in rejected for i in e.image_ids)[:2000],
            )
        pending = await self._outbox.entries("pending")
        if not pending:
            return
        logger.info(
            "delivering %d result batch(es) left in the outbox by an earlier run", len(pending)
        )
        # One deadline for all leftovers: a dead server costs one deadline, not one per batch.
        deadline = time.monotonic() + deadline_s
        for entry in pending:
            if self._halt.is_set():
                self._kept_entry_ids.append(entry.id)
                continue
            self._apply(await self._deliverer.deliver(entry, deadline=deadline))

    async def run(self) -> None:
        while True:
            entry = await self._in_q.get()
            if entry is None:
                return
            self._apply(await self._deliverer.deliver(entry))

    def _apply(self, result: DeliveryResult) -> None:
        """Record the outcome of each receipt of a delivery in the registry."""
        groups: list[tuple[Outcome, list[str]]] = [
            (Outcome.DELIVERED, list(result.delivered)),
            (Outcome.FAILED, list(result.failed)),
            (Outcome.REJECTED, list(result.rejected)),
            (Outcome.KEPT, list(result.kept)),
        ]
        for outcome, subjects in groups:
            for subject in subjects:
                if self.held.settle([subject], outcome):
                    continue
                if self.held.resettle_kept(subject, outcome):
                    continue
                if outcome in (Outcome.DELIVERED, Outcome.FAILED):
                    self.recovered += 1
        self._kept_entry_ids.extend(result.kept_entry_ids)

    async def sweep(self) -> None:
        """Retry batches kept in the outbox after their deadline (the server may be back).

        Ends by itself when the run halts (never cancelled mid-delivery, so each
        outcome is recorded); the shutdown cutoff bounds a delivery in progress.
        """
        while not self._halt.is_set():
            await self._halt.sleep(OUTBOX_SWEEP_INTERVAL_S)
            ids, self._kept_entry_ids = self._kept_entry_ids, []
            for entry_id in ids:
                entry = await asyncio.to_thread(self._outbox.get_sync, entry_id)
                if entry is None or entry.status != "pending":
                    continue
                if self._halt.is_set():
                    self._kept_entry_ids.append(entry_id)
                    continue
                self._apply(await self._deliverer.deliver(entry))
