"""What a worker run did, per job and in total, and the honest log lines about it.

Also what it is doing now (:class:`WorkerStats`, for progress displays) and how
it reports a problem that recurs while it runs (:class:`RateLimitedWarning`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from trapline.worker.leases import PROBLEM_OUTCOMES, JobTally, Outcome

logger = logging.getLogger(__name__)

# Image ids named in one log line; the rest are counted.
MAX_IDS_IN_LOG = 50
WARN_INTERVAL_S = 60.0


@dataclass
class JobReport:
    """Counts of one job's tasks in this run. ``reserved`` = the sum of the outcomes at exit."""

    job_id: int
    reserved: int = 0
    delivered: int = 0
    failed: int = 0
    released: int = 0
    kept_in_outbox: int = 0
    rejected: int = 0
    abandoned: int = 0
    problem_ids: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def from_tally(cls, tally: JobTally) -> JobReport:
        c = tally.counts
        return cls(
            job_id=tally.job_id,
            reserved=tally.reserved,
            delivered=c[Outcome.DELIVERED],
            failed=c[Outcome.FAILED],
            released=c[Outcome.RELEASED],
            kept_in_outbox=c[Outcome.KEPT],
            rejected=c[Outcome.REJECTED],
            abandoned=c[Outcome.ABANDONED],
            problem_ids={str(o): list(tally.problem_ids[o]) for o in PROBLEM_OUTCOMES},
        )

    @property
    def unsettled(self) -> int:
        return self.reserved - (
            self.delivered
            + self.failed
            + self.released
            + self.kept_in_outbox
            + self.rejected
            + self.abandoned
        )

    @property
    def clean(self) -> bool:
        return self.kept_in_outbox == self.rejected == self.abandoned == self.unsettled == 0

    def counts_text(self) -> str:
        return (
            f"{self.reserved} reserved: {self.delivered} delivered, {self.failed} reported failed, "
            f"{self.released} released, {self.kept_in_outbox} kept in outbox, "
            f"{self.rejected} rejected, {self.abandoned} neither delivered nor released"
        )


@dataclass
class WorkerReport:
    """The result of :func:`trapline.worker.run_worker`.

    ``reserved`` counts tasks reserved in this run; each ends in exactly one of
    ``delivered`` (results stored), ``failed`` (error result stored: download or
    pipeline failure), ``released`` (given back for redelivery),
    ``kept_in_outbox`` (result on disk, not delivered), ``rejected`` (the server
    refused the result) or ``abandoned`` (could be neither delivered nor
    released; its lease expires on the server). ``recovered`` counts results
    from earlier runs' outbox delivered now; ``outbox_pending`` is what is still
    waiting in the outbox at exit, earlier runs included.
    """

    reserved: int = 0
    delivered: int = 0
    failed: int = 0
    released: int = 0
    kept_in_outbox: int = 0
    rejected: int = 0
    abandoned: int = 0
    recovered: int = 0
    outbox_pending: int = 0
    malformed: int = 0
    fatal: str | None = None
    outbox_path: str | None = None
    jobs: dict[int, JobReport] = field(default_factory=dict)

    @property
    def unsettled(self) -> int:
        """Tasks reserved without any recorded outcome (a bug if ever non-zero)."""
        return sum(j.unsettled for j in self.jobs.values())

    @property
    def ok(self) -> bool:
        """Nothing is left undelivered and nothing was refused or abandoned."""
        return (
            self.fatal is None
            and self.kept_in_outbox == 0
            and self.rejected == 0
            and self.abandoned == 0
            and self.outbox_pending == 0
            and self.unsettled == 0
        )

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    @classmethod
    def from_tallies(cls, tallies: list[JobTally]) -> WorkerReport:
        report = cls()
        for tally in tallies:
            job = JobReport.from_tally(tally)
            report.jobs[job.job_id] = job
            report.reserved += job.reserved
            report.delivered += job.delivered
            report.failed += job.failed
            report.released += job.released
            report.kept_in_outbox += job.kept_in_outbox
            report.rejected += job.rejected
            report.abandoned += job.abandoned
        return report

    def summary(self) -> str:
        text = (
            f"{self.reserved} tasks reserved: {self.delivered} delivered, "
            f"{self.failed} reported failed, {self.released} released, "
            f"{self.kept_in_outbox} kept in outbox, {self.rejected} rejected, "
            f"{self.abandoned} neither delivered nor released"
        )
        if self.malformed:
            text += f"; {self.malformed} tasks without a receipt ignored"
        if self.recovered:
            text += f"; {self.recovered} results from earlier runs delivered"
        if self.outbox_pending:
            text += f"; {self.outbox_pending} results still waiting in {self.outbox_path}"
        if self.fatal:
            text += f"; stopped: {self.fatal}"
        return text


def log_job_summary(job: JobReport, *, leaving: bool) -> None:
    """INFO when every task of the job was delivered or released, else WARNING naming images."""
    what = "leaving job" if leaving else "job"
    if job.clean:
        logger.info("%s %s: %s", what, job.job_id, job.counts_text())
        return
    logger.warning("%s %s: %s", what, job.job_id, job.counts_text())
    labels = {
        str(Outcome.KEPT): ("kept in outbox", job.kept_in_outbox),
        str(Outcome.REJECTED): ("rejected", job.rejected),
        str(Outcome.ABANDONED): ("neither delivered nor released", job.abandoned),
    }
    for key, (label, total) in labels.items():
        ids = job.problem_ids.get(key, [])
        for start in range(0, len(ids), MAX_IDS_IN_LOG) if total else ():
            chunk = ids[start : start + MAX_IDS_IN_LOG]
            logger.warning("job %s: images %s: %s", job.job_id, label, ", ".join(chunk))
        if total > len(ids):
            logger.warning(
                "job %s: %d more images %s; their ids are in the server's job log",
                job.job_id,
                total - len(ids),
                label,
            )


def log_final_summary(report: WorkerReport, *, jobs: set[int] | None = None) -> None:
    """Per-job lines (for ``jobs``, default all), then one line for the whole run."""
    for job in report.jobs.values():
        if jobs is None or job.job_id in jobs:
            log_job_summary(job, leaving=False)
    if report.ok:
        logger.info("worker done: %s", report.summary())
    elif report.fatal or report.kept_in_outbox or report.outbox_pending or report.unsettled:
        logger.error("worker done with work left: %s", report.summary())
    else:
        logger.warning("worker done: %s", report.summary())


@dataclass
class WorkerStats:
    """A snapshot for progress displays."""

    elapsed_s: float
    reserved: int
    downloaded: int
    computed: int
    delivered: int
    failed: int
    released: int
    kept: int
    held: int
    states: dict[str, int]
    prefetched_batches: int
    deliver_queue: int
    jobs: list[int] = field(default_factory=list)


class RateLimitedWarning:
    """Logs a recurring problem once per interval per key, so outages do not flood the log.

    The other occurrences go to DEBUG. Logs to the ``logger`` of the module that reports.
    """

    def __init__(self, log: logging.Logger, interval_s: float = WARN_INTERVAL_S) -> None:
        self._log = log
        self._interval_s = interval_s
        self._last: dict[str, float] = {}

    def __call__(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(key, float("-inf")) >= self._interval_s:
            self._last[key] = now
            self._log.warning(msg, *args)
        else:
            self._log.debug(msg, *args)
