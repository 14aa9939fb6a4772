"""Results: a batch of outcomes (successes and errors) recorded with a few set-based
statements, whatever the batch size.

Outcomes are set only where an image has none yet, and a success may also upgrade a
failed image (keeping the failure in its history), so replays, redeliveries and
concurrent duplicate posts change nothing: the rows an UPDATE hands back are what
counts. In the common case (every image still open) a batch costs one UPDATE and one
INSERT each for results, detections and history; only items the UPDATEs did not
take are looked up, to tell a duplicate from a rejection.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    CompoundSelect,
    Row,
    Select,
    Table,
    case,
    insert,
    or_,
    select,
    tuple_,
    union_all,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from trapline.ledger.events import Journal
from trapline.ledger.models import Detection, ImageResultRow, ImageState
from trapline.ledger.transitions.common import IMAGES, Holder, lock_images

RESULTS = cast(Table, ImageResultRow.__table__)
DETECTIONS = cast(Table, Detection.__table__)


@dataclass(frozen=True)
class Result:
    """One result item for ``image_id``, through its receipt's stream sequence (``seq``,
    current queue generation) or, for a receipt of an earlier generation (``seq`` None),
    through the image id alone.

    ``receipt`` is the reply subject it came with. Rows are matched by sequence, never
    by delivery: the result of an earlier delivery of the same message is still the
    image's result (the seed lost those).
    """

    key: int  # the caller's handle for the item (its index in the post)
    image_id: str
    seq: int | None
    receipt: str
    error: str | None = None
    envelope: Mapping[str, Any] = field(default_factory=dict)  # pipeline, algorithms, total_time
    detections: Sequence[Mapping[str, Any]] = ()  # detection columns without job/image/idx


@dataclass
class Recorded:
    """Per item (by key): accepted or duplicate with its image, or rejected with a reason;
    and per image, what changed."""

    accepted: dict[int, str] = field(default_factory=dict)
    duplicates: dict[int, str] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)
    done: list[str] = field(default_factory=list)  # set done by this batch (upgrades too)
    failed: list[str] = field(default_factory=list)  # failed by error results of this batch
    upgraded: list[tuple[str, str | None]] = field(default_factory=list)  # (image, old reason)

    @property
    def changed(self) -> bool:
        return bool(self.done or self.failed)


async def record_results(
    session: AsyncSession,
    job_id: int,
    results: Sequence[Result],
    holder: Holder,
    *,
    refused: Mapping[int, str],
    now: datetime,
) -> Recorded:
    """Record a posted batch; ``refused`` are the items the caller already rejected
    (key → reason), counted in the batch's log line."""
    out = Recorded(rejected=dict(refused))
    taken: set[str] = set()
    await lock_images(
        session, IMAGES.c.job_id == job_id, IMAGES.c.image_id.in_({r.image_id for r in results})
    )
    successes = sorted((r for r in results if r.error is None), key=lambda r: r.key)
    if successes:
        rows = await _settle(
            session, job_id, successes, ImageState.OPEN, _done_values(now), IMAGES.c.id
        )
        out.done = _claim(successes, rows, out.accepted, taken)
    rest = [r for r in successes if r.key not in out.accepted and r.image_id not in taken]
    if rest:
        # A late success upgrades a failed image; the UPDATE leaves ``reason`` alone, so
        # RETURNING hands back the failure it replaces, for the history.
        rows = await _settle(
            session, job_id, rest, (ImageState.FAILED,), _done_values(now), IMAGES.c.reason
        )
        failures = {r.image_id: r.reason for r in rows}
        upgraded = _claim(rest, rows, out.accepted, taken)
        out.upgraded = [(i, failures[i]) for i in upgraded]
        out.done += upgraded
    errors = sorted((r for r in results if r.error is not None), key=lambda r: r.key)
    errors = [r for r in errors if r.image_id not in taken]
    if errors:
        why: dict[str, str] = {}
        for r in errors:
            why.setdefault(r.image_id, r.error or "")
        rows = await _settle(
            session,
            job_id,
            errors,
            ImageState.OPEN,
            {
                "state": ImageState.FAILED,
                "reason": case(why, value=IMAGES.c.image_id),
                "failed_at": now,
                "lease_deadline": None,
                "updated_at": now,
            },
            IMAGES.c.id,
        )
        out.failed = _claim(errors, rows, out.accepted, taken)
    left = [r for r in results if r.key not in out.accepted]
    if left:
        await _sort_out(session, job_id, left, out)
    await _store(session, job_id, results, out, now)
    journal = Journal(now)
    who = holder.describe()
    journal.line(
        job_id,
        f"results from {who}: {len(out.accepted)} accepted, "
        f"{len(out.duplicates)} duplicate, {len(out.rejected)} rejected",
        level=logging.WARNING if out.rejected else logging.INFO,
    )
    for image_id, was in out.upgraded:
        journal.line(
            job_id,
            f"late result stored: failed image upgraded to done (was: {was})",
            level=logging.WARNING,
            image_id=image_id,
        )
    journal.history(job_id, [(i, f"result accepted from {who}") for i in out.done])
    if out.failed:
        journal.images(job_id, out.failed, "worker reported failure for", level=logging.WARNING)
    await journal.write(session)
    return out


def _done_values(now: datetime) -> dict[str, object]:
    return {
        "state": ImageState.DONE,
        "result_at": now,
        "lease_deadline": None,
        "updated_at": now,
    }


async def _settle(
    session: AsyncSession,
    job_id: int,
    items: Sequence[Result],
    from_states: Sequence[ImageState],
    values: Mapping[str, object],
    extra: ColumnElement[Any],
) -> Sequence[Row[Any]]:
    """One UPDATE of the rows the items name that are still in ``from_states``;
    returns (image_id, msg_seq, ``extra``) of each row it changed."""
    pairs = [(r.seq, r.image_id) for r in items if r.seq is not None]
    loose = [r.image_id for r in items if r.seq is None]
    named: list[ColumnElement[bool]] = []
    if pairs:  # the receipt's row, only if it is the image the result names
        named.append(tuple_(IMAGES.c.msg_seq, IMAGES.c.image_id).in_(pairs))
    if loose:
        named.append(IMAGES.c.image_id.in_(loose))
    changed = await session.execute(
        update(IMAGES)
        .where(
            IMAGES.c.job_id == job_id,
            IMAGES.c.image_id.in_({r.image_id for r in items}),
            IMAGES.c.state.in_(from_states),
            or_(*named),
        )
        .values(**values)
        .returning(IMAGES.c.image_id, IMAGES.c.msg_seq, extra)
    )
    return changed.all()


def _claim(
    items: Sequence[Result], rows: Sequence[Row[Any]], accepted: dict[int, str], taken: set[str]
) -> list[str]:
    """Give each changed row to the first item (by key) that names it; returns its images."""
    changed = {r.image_id: r.msg_seq for r in rows}
    images: list[str] = []
    for item in items:
        if item.image_id not in changed or item.image_id in taken:
            continue
        if item.seq is None or item.seq == changed[item.image_id]:
            accepted[item.key] = item.image_id
            taken.add(item.image_id)
            images.append(item.image_id)
    return images


async def _sort_out(
    session: AsyncSession, job_id: int, left: Sequence[Result], out: Recorded
) -> None:
    """Items no UPDATE took: a duplicate when the row is theirs, else rejected with why."""
    seqs = {r.seq for r in left if r.seq is not None}
    rows = select(IMAGES.c.image_id, IMAGES.c.msg_seq).where(IMAGES.c.job_id == job_id)
    # A UNION, not an OR, so each half uses its own index (job, image) / (job, seq).
    query: Select[Any] | CompoundSelect[Any] = rows.where(
        IMAGES.c.image_id.in_({r.image_id for r in left})
    )
    if seqs:
        query = union_all(query, rows.where(IMAGES.c.msg_seq.in_(seqs)))
    found = await session.execute(query)
    images: set[str] = set()
    at_seq: dict[int, list[str]] = {}
    for image_id, seq in found.all():
        images.add(image_id)
        at_seq.setdefault(seq, []).append(image_id)
    for r in left:
        if r.seq is None:
            if r.image_id in images:
                out.duplicates[r.key] = r.image_id
            else:
                out.rejected[r.key] = f"image {r.image_id!r} is not in job {job_id}"
        elif r.image_id in at_seq.get(r.seq, ()):
            out.duplicates[r.key] = r.image_id
        elif r.seq in at_seq:
            out.rejected[r.key] = (
                f"reply_subject is the receipt of image {at_seq[r.seq][0]!r}, "
                f"result is for {r.image_id!r}"
            )
        else:
            out.rejected[r.key] = "reply_subject does not match a task of this job"


async def _store(
    session: AsyncSession,
    job_id: int,
    results: Sequence[Result],
    out: Recorded,
    now: datetime,
) -> None:
    """The result envelopes and detections of the images this batch set done."""
    if not out.done:
        return
    by_key = {r.key: r for r in results}
    stored = [by_key[key] for key in out.accepted if by_key[key].error is None]
    await session.execute(
        insert(RESULTS),
        [
            {
                "job_id": job_id,
                "image_id": r.image_id,
                "pipeline": r.envelope.get("pipeline"),
                "algorithms": r.envelope.get("algorithms", {}),
                "total_time": r.envelope.get("total_time"),
                "detections_count": len(r.detections),
                "received_at": now,
            }
            for r in stored
        ],
    )
    detections = [
        {**d, "job_id": job_id, "image_id": r.image_id, "idx": n}
        for r in stored
        for n, d in enumerate(r.detections)
    ]
    if detections:
        await session.execute(insert(DETECTIONS), detections)
