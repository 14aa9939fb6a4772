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
) -> None:
    """Add a job log line to the session (committed with the change it describes) and log it."""
    session.add(_event(job_id, image_id, message, level))
    log.log(level, "job %s: %s", job_id, message)


def record_images(
    session: AsyncSession,
    job_id: int,
    image_ids: Sequence[str],
    message: str,
    *,
    level: int = logging.INFO,
) -> None:
    """One job line naming every image, plus one history line per image."""
    record(session, job_id, f"{message} {format_ids(image_ids)}", level=level)
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
