"""Job log lines: stored with the job (its history) and mirrored to the process log."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncSession

from trapline.ledger.models import JobEvent, utcnow

log = logging.getLogger("trapline.jobs")

_MAX_IDS_IN_LINE = 50


def format_ids(image_ids: Sequence[str]) -> str:
    """Image ids for a log line: all of them up to a limit, then a count of the rest."""
    ids = list(image_ids)
    shown = ", ".join(ids[:_MAX_IDS_IN_LINE])
    if len(ids) > _MAX_IDS_IN_LINE:
        shown += f", … (+{len(ids) - _MAX_IDS_IN_LINE} more)"
    return f"[{shown}]"


def record(
    session: AsyncSession,
    job_id: int,
    message: str,
    *,
    level: int = logging.INFO,
    image_id: str | None = None,
    image_ids: Sequence[str] = (),
) -> None:
    """Add a job log line to the session (committed with the change it describes) and log it.

    With ``image_ids`` the stored line names them up to a limit, while the process
    log names every one (in lines of at most ``_MAX_IDS_IN_LINE``): a lost or failed
    image is always findable in the log by its id.
    """
    stored = f"{message} {format_ids(image_ids)}" if image_ids else message
    session.add(_event(job_id, image_id, stored, level))
    if not image_ids:
        log.log(level, "job %s: %s", job_id, message)
        return
    ids = list(image_ids)
    parts = range(0, len(ids), _MAX_IDS_IN_LINE)
    for n, start in enumerate(parts, 1):
        chunk = ", ".join(ids[start : start + _MAX_IDS_IN_LINE])
        suffix = f" (part {n} of {len(parts)})" if len(parts) > 1 else ""
        log.log(level, "job %s: %s [%s]%s", job_id, message, chunk, suffix)


def record_images(
    session: AsyncSession,
    job_id: int,
    image_ids: Sequence[str],
    message: str,
    *,
    level: int = logging.INFO,
) -> None:
    """One job line naming every image, plus one history line per image."""
    record(session, job_id, message, level=level, image_ids=image_ids)
    record_history(session, job_id, [(i, message) for i in image_ids], level=level)


def record_history(
    session: AsyncSession,
    job_id: int,
    lines: Sequence[tuple[str, str]],
    *,
    level: int = logging.INFO,
) -> None:
    """History lines of single images (image id, message), without a job-level line."""
    session.add_all(_event(job_id, image_id, message, level) for image_id, message in lines)


def _event(job_id: int, image_id: str | None, message: str, level: int) -> JobEvent:
    return JobEvent(
        job_id=job_id,
        image_id=image_id,
        at=utcnow(),
        level=logging.getLevelName(level),
        message=message,
    )
