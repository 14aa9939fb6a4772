"""Job log lines: stored with the job (its history) and mirrored to the process log."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import cast

from sqlalchemy import Table, insert
from sqlalchemy.ext.asyncio import AsyncSession

from trapline.ledger.models import JobEvent, utcnow

log = logging.getLogger("trapline.jobs")

_MAX_IDS_IN_LINE = 50
JOB_EVENTS = cast(Table, JobEvent.__table__)


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
    session.add(JobEvent(**_line(job_id, message, level, image_id, image_ids, utcnow())))


class Journal:
    """The job log lines and image history of one transition, stored with one multi-row
    INSERT (not a round trip per line) in the transaction of the change they describe.

    Lines are mirrored to the process log as they are added, exactly as :func:`record`
    does; a transition that rolls back has logged what it tried, never stored it.
    """

    def __init__(self, now: datetime) -> None:
        self.now = now
        self._rows: list[dict[str, object]] = []

    def __bool__(self) -> bool:
        return bool(self._rows)

    def line(
        self,
        job_id: int,
        message: str,
        *,
        level: int = logging.INFO,
        image_id: str | None = None,
        image_ids: Sequence[str] = (),
    ) -> None:
        """A job log line, with :func:`record`'s semantics."""
        self._rows.append(_line(job_id, message, level, image_id, image_ids, self.now))

    def history(
        self, job_id: int, lines: Iterable[tuple[str, str]], *, level: int = logging.INFO
    ) -> None:
        """History lines of single images (image id, message), without a job-level line."""
        self._rows.extend(_row(job_id, i, message, level, self.now) for i, message in lines)

    def images(
        self, job_id: int, image_ids: Sequence[str], message: str, *, level: int = logging.INFO
    ) -> None:
        """One job line naming every image, plus one history line per image."""
        self.line(job_id, message, level=level, image_ids=image_ids)
        self.history(job_id, ((i, message) for i in image_ids), level=level)

    async def write(self, session: AsyncSession) -> None:
        """Store every line added since the last write (one statement; none when empty)."""
        if self._rows:
            rows, self._rows = self._rows, []
            await session.execute(insert(JOB_EVENTS), rows)


def _row(
    job_id: int, image_id: str | None, message: str, level: int, at: datetime
) -> dict[str, object]:
    return {
        "job_id": job_id,
        "image_id": image_id,
        "at": at,
        "level": logging.getLevelName(level),
        "message": message,
    }


def _line(
    job_id: int,
    message: str,
    level: int,
    image_id: str | None,
    image_ids: Sequence[str],
    at: datetime,
) -> dict[str, object]:
    """A job log line's row (naming ``image_ids`` up to a limit), mirrored to the log."""
    _log(job_id, message, level, image_ids)
    stored = f"{message} {format_ids(image_ids)}" if image_ids else message
    return _row(job_id, image_id, stored, level, at)


def _log(job_id: int, message: str, level: int, image_ids: Sequence[str]) -> None:
    """The process log names every image, in lines of at most ``_MAX_IDS_IN_LINE``: a lost
    or failed image is always findable in the log by its id."""
    if not image_ids:
        log.log(level, "job %s: %s", job_id, message)
        return
    ids = list(image_ids)
    parts = range(0, len(ids), _MAX_IDS_IN_LINE)
    for n, start in enumerate(parts, 1):
        chunk = ", ".join(ids[start : start + _MAX_IDS_IN_LINE])
        suffix = f" (part {n} of {len(parts)})" if len(parts) > 1 else ""
        log.log(level, "job %s: %s [%s]%s", job_id, message, chunk, suffix)
