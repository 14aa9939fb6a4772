"""Leases: granted on reserve, extended, released, and lapsed (→ queued, or → failed once
the retry budget is spent) by the reconciler or by the reserve path that sees a
redelivery first.

The retry budget counts leases actually handed to a worker (``JobImage.leases``), not
JetStream deliveries: a delivery that never reached a worker must not use it.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Row, case, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession

from trapline.ledger import events
from trapline.ledger.events import Journal
from trapline.ledger.models import ImageState
from trapline.ledger.transitions.common import (
    IMAGES,
    Holder,
    holder_label,
    lock_images,
    locking_in_order,
)

_LEASE_COLUMNS = (
    IMAGES.c.id,
    IMAGES.c.job_id,
    IMAGES.c.image_id,
    IMAGES.c.url,
    IMAGES.c.state,
    IMAGES.c.msg_seq,
    IMAGES.c.deliveries,
    IMAGES.c.leases,
    IMAGES.c.receipt,
    IMAGES.c.holder_name,
    IMAGES.c.holder_token,
    IMAGES.c.holder_id,
    IMAGES.c.lease_deadline,
)

_Row = Row[*tuple[Any, ...]]


@dataclass(frozen=True)
class Offer:
    """A message the queue handed out: the ledger decides whether it becomes a lease."""

    seq: int
    image_id: object  # as the message says; checked against the ledger row
    delivered: int
    receipt: str


@dataclass(frozen=True)
class Leased:
    image_id: str
    url: str | None
    receipt: str
    delivered: int


@dataclass(frozen=True)
class HeldLease:
    """A reserved row as read: the lease a lapse ends, only if it is still this one."""

    id: int
    job_id: int
    image_id: str
    deliveries: int
    leases: int
    receipt: str | None
    holder: str

    @classmethod
    def of(cls, row: _Row) -> HeldLease:
        return cls(
            row.id,
            row.job_id,
            row.image_id,
            row.deliveries,
            row.leases,
            row.receipt,
            holder_label(row.holder_name, row.holder_token, row.holder_id),
        )


@dataclass
class Lapsed:
    """Leases this transaction ended: requeued, or failed with the budget spent."""

    requeued: list[HeldLease] = field(default_factory=list)
    exhausted: list[HeldLease] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.requeued) + len(self.exhausted)


@dataclass
class Leasing:
    """What a reserve changed: leases granted, and what to do with the other messages."""

    leased: list[Leased] = field(default_factory=list)
    settled: list[str] = field(default_factory=list)  # image has an outcome: ACK
    exhausted: list[str] = field(default_factory=list)  # failed by this lapse: TERM
    strays: list[Offer] = field(default_factory=list)  # no ledger row: TERM
    lapsed: Lapsed = field(default_factory=Lapsed)


@dataclass
class Expired:
    lapsed: Lapsed
    oldest_deadline: datetime | None


async def lease(
    session: AsyncSession,
    job_id: int,
    offers: Sequence[Offer],
    holder: Holder,
    *,
    now: datetime,
    lease_s: float,
    max_deliver: int,
) -> Leasing:
    """Grant the leases of ``offers``: one SELECT, the lapses a redelivery reveals, one
    UPDATE of every row still open (``RETURNING`` says which), one INSERT of history."""
    out = Leasing()
    if not offers:
        return out
    found = await session.execute(
        locking_in_order(
            session,
            select(*_LEASE_COLUMNS).where(
                IMAGES.c.job_id == job_id, IMAGES.c.msg_seq.in_({o.seq for o in offers})
            ),
        )
    )
    # Keyed by (seq, image): a settled row of an earlier queue generation may share a seq.
    rows = {(r.msg_seq, r.image_id): r for r in found.all()}
    journal = Journal(now)
    wanted: list[tuple[Offer, _Row]] = []
    redelivered: dict[int, HeldLease] = {}
    for o in offers:
        row = rows.get((o.seq, o.image_id))
        if row is None:
            out.strays.append(o)
            continue
        if row.state == ImageState.RESERVED and o.delivered > row.deliveries:
            # JetStream redelivered before the reconciler saw the lease lapse: apply the
            # same rule here, so the budget holds whoever is faster.
            redelivered[row.id] = HeldLease.of(row)
        wanted.append((o, row))
    out.lapsed = await _lapse(
        session, list(redelivered.values()), journal, now=now, max_deliver=max_deliver
    )
    exhausted = {h.id for h in out.lapsed.exhausted}
    out.exhausted = [o.receipt for o, row in wanted if row.id in exhausted]
    wanted = [(o, row) for o, row in wanted if row.id not in exhausted]
    granted = await _grant(session, wanted, holder, now, now + timedelta(seconds=lease_s))
    for o, row in wanted:
        if row.id in granted:
            out.leased.append(Leased(row.image_id, row.url, o.receipt, o.delivered))
        else:  # it has an outcome (committed before, or meanwhile): never hand it out
            out.settled.append(o.receipt)
    if out.leased:
        who = holder.describe()
        journal.history(
            job_id,
            (
                (t.image_id, f"reserved by {who} (JetStream delivery {t.delivered})")
                for t in out.leased
            ),
        )
        again = [t.image_id for t in out.leased if t.delivered > 1]
        journal.line(
            job_id,
            f"reserved {len(out.leased)} task(s) to {who}"
            + (f"; redeliveries {events.format_ids(again)}" if again else ""),
        )
    await journal.write(session)
    return out


async def _grant(
    session: AsyncSession,
    wanted: Sequence[tuple[Offer, _Row]],
    holder: Holder,
    now: datetime,
    deadline: datetime,
) -> set[int]:
    """One UPDATE for the whole batch; per-row values keyed by id. Returns the ids leased."""
    if not wanted:
        return set()
    delivered = {row.id: o.delivered for o, row in wanted}
    receipts = {row.id: o.receipt for o, row in wanted}
    granted = await session.scalars(
        update(IMAGES)
        .where(
            IMAGES.c.id.in_(delivered),
            IMAGES.c.state.in_(ImageState.OPEN),  # an image with an outcome is never leased
        )
        .values(
            state=ImageState.RESERVED,
            leases=IMAGES.c.leases + 1,
            deliveries=case(delivered, value=IMAGES.c.id),
            receipt=case(receipts, value=IMAGES.c.id),
            holder_name=holder.worker_name,
            holder_id=holder.worker_id,
            holder_token=holder.token_name,
            leased_at=now,
            lease_deadline=deadline,
            updated_at=now,
        )
        .returning(IMAGES.c.id)
    )
    return set(granted.all())


async def expire_leases(
    session: AsyncSession, *, now: datetime, max_deliver: int, limit: int
) -> Expired:
    """Leases past their deadline: back to queued, or failed after the last lease."""
    query = (
        select(*_LEASE_COLUMNS)
        .where(IMAGES.c.state == ImageState.RESERVED, IMAGES.c.lease_deadline < now)
        .limit(limit)
    )
    if session.get_bind().dialect.name == "postgresql":
        # Rows a result post or a reserve holds right now are theirs to settle; the
        # next sweep sees whatever is still past its deadline.
        query = query.order_by(IMAGES.c.id).with_for_update(of=IMAGES, skip_locked=True)
    found = await session.execute(query)
    rows = found.all()
    oldest = min((r.lease_deadline for r in rows if r.lease_deadline), default=None)
    journal = Journal(now)
    lapsed = await _lapse(
        session,
        [HeldLease.of(r) for r in rows],
        journal,
        now=now,
        max_deliver=max_deliver,
        still_past=True,
    )
    await journal.write(session)
    return Expired(lapsed, oldest)


async def _lapse(
    session: AsyncSession,
    held: Sequence[HeldLease],
    journal: Journal,
    *,
    now: datetime,
    max_deliver: int,
    still_past: bool = False,
) -> Lapsed:
    """End ``held`` leases that are still the ones read (same delivery; with
    ``still_past``, still past their deadline, i.e. not extended meanwhile)."""
    out = Lapsed()
    if not held:
        return out
    last = {h.id for h in held if h.leases >= max_deliver}
    requeue = [h for h in held if h.id not in last]
    exhausted = [h for h in held if h.id in last]
    if requeue:
        ended = await _end(
            session,
            requeue,
            now if still_past else None,
            state=ImageState.QUEUED,
            expiries=IMAGES.c.expiries + 1,
            lease_deadline=None,
            updated_at=now,
        )
        out.requeued = [h for h in requeue if h.id in ended]
    if exhausted:
        reasons = {
            h.id: f"max deliveries exhausted ({h.leases} of {max_deliver}; last holder {h.holder})"
            for h in exhausted
        }
        ended = await _end(
            session,
            exhausted,
            now if still_past else None,
            state=ImageState.FAILED,
            reason=case(reasons, value=IMAGES.c.id),
            failed_at=now,
            lease_deadline=None,
            updated_at=now,
        )
        out.exhausted = [h for h in exhausted if h.id in ended]
    requeued: dict[tuple[int, str], list[HeldLease]] = defaultdict(list)
    for h in out.requeued:
        requeued[(h.job_id, h.holder)].append(h)
    for (job_id, holder), batch in requeued.items():
        journal.images(
            job_id,
            [h.image_id for h in batch],
            f"lease expired without a result (holder {holder}, delivery "
            f"{batch[0].leases} of {max_deliver}); will be redelivered:",
            level=logging.WARNING,
        )
    failed: dict[tuple[int, str], list[str]] = defaultdict(list)
    for h in out.exhausted:
        failed[(h.job_id, h.holder)].append(h.image_id)
    for (job_id, holder), image_ids in failed.items():
        journal.images(
            job_id,
            image_ids,
            f"failed: max deliveries exhausted (last holder {holder}):",
            level=logging.ERROR,
        )
    return out


async def _end(
    session: AsyncSession,
    held: Sequence[HeldLease],
    past: datetime | None,
    **values: object,
) -> set[int]:
    guard: list[ColumnElement[bool]] = [
        IMAGES.c.id.in_([h.id for h in held]),
        IMAGES.c.state == ImageState.RESERVED,
        tuple_(IMAGES.c.id, IMAGES.c.deliveries).in_([(h.id, h.deliveries) for h in held]),
    ]
    if past is not None:
        guard.append(IMAGES.c.lease_deadline < past)
    ended = await session.scalars(
        update(IMAGES).where(*guard).values(**values).returning(IMAGES.c.id)
    )
    return set(ended.all())


async def extend(
    session: AsyncSession,
    job_id: int,
    held: Sequence[tuple[int, int]],
    *,
    now: datetime,
    lease_s: float,
) -> set[tuple[int, int]]:
    """Move the deadline of each lease the caller holds — (stream seq, delivery number)
    of the *current* delivery of a reserved image; a stale receipt matches nothing.
    Returns the (seq, delivery) pairs extended."""
    if not held:
        return set()
    await lock_images(session, *_current(job_id, held))
    extended = await session.execute(
        update(IMAGES)
        .where(*_current(job_id, held))
        .values(lease_deadline=now + timedelta(seconds=lease_s), updated_at=now)
        .returning(IMAGES.c.msg_seq, IMAGES.c.deliveries)
    )
    return {(r.msg_seq, r.deliveries) for r in extended.all()}


async def release(
    session: AsyncSession, job_id: int, held: Sequence[tuple[int, int]], *, now: datetime
) -> set[tuple[int, int]]:
    """Give held leases back (queued, for the queue's redelivery); returns the pairs released."""
    if not held:
        return set()
    await lock_images(session, *_current(job_id, held))
    released = (
        await session.execute(
            update(IMAGES)
            .where(*_current(job_id, held))
            .values(state=ImageState.QUEUED, lease_deadline=None, updated_at=now)
            .returning(
                IMAGES.c.msg_seq, IMAGES.c.deliveries, IMAGES.c.image_id, IMAGES.c.holder_name
            )
        )
    ).all()
    if released:
        journal = Journal(now)
        journal.line(
            job_id,
            f"released {len(released)} task(s) by {released[0].holder_name or 'worker'}",
            image_ids=[r.image_id for r in released],
        )
        await journal.write(session)
    return {(r.msg_seq, r.deliveries) for r in released}


def _current(job_id: int, held: Sequence[tuple[int, int]]) -> list[ColumnElement[bool]]:
    return [
        IMAGES.c.job_id == job_id,
        IMAGES.c.msg_seq.in_({seq for seq, _ in held}),
        IMAGES.c.state == ImageState.RESERVED,
        tuple_(IMAGES.c.msg_seq, IMAGES.c.deliveries).in_(held),
    ]
