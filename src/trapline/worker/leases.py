"""The held-tasks registry, lease extension and release.

Every task the worker reserves is registered here until it has an outcome
(delivered, failed, released, kept in the outbox, rejected, or abandoned when
it could be neither delivered nor released). The registry is the only place
that counts, so the report at the end cannot disagree with what happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from trapline.worker.client import ApiError, WorkerClient

logger = logging.getLogger(__name__)

# Image ids kept per job and outcome for reports; beyond this only counts grow.
MAX_LISTED_IDS = 1000
# Release calls at shutdown must not take the whole grace period each.
RELEASE_TIMEOUT_S = 10.0


class TaskState(enum.StrEnum):
    RESERVED = "reserved"
    DOWNLOADING = "downloading"
    WAITING = "waiting"
    COMPUTING = "computing"
    DELIVERING = "delivering"


class Outcome(enum.StrEnum):
    DELIVERED = "delivered"
    FAILED = "failed"
    RELEASED = "released"
    KEPT = "kept"
    REJECTED = "rejected"
    ABANDONED = "abandoned"


# Outcomes an operator has to look at; their image ids are listed in summaries.
PROBLEM_OUTCOMES = (Outcome.KEPT, Outcome.REJECTED, Outcome.ABANDONED)


@dataclass
class HeldTask:
    """A reserved task: its receipt (``reply_subject``) and where it is in the worker."""

    job_id: int
    task_id: str
    image_id: str
    image_url: str
    reply_subject: str
    state: TaskState = TaskState.RESERVED
    reserved_at: float = field(default_factory=time.monotonic)
    # False once the server answered "unknown" to an extension: the lease is gone,
    # so extending is pointless, but the result is still delivered.
    extendable: bool = True


@dataclass
class JobTally:
    """What happened to the tasks of one job in this process."""

    job_id: int
    reserved: int = 0
    counts: dict[Outcome, int] = field(default_factory=lambda: dict.fromkeys(Outcome, 0))
    problem_ids: dict[Outcome, list[str]] = field(
        default_factory=lambda: {o: [] for o in PROBLEM_OUTCOMES}
    )

    def count(self, outcome: Outcome, image_id: str, delta: int = 1) -> None:
        self.counts[outcome] += delta
        ids = self.problem_ids.get(outcome)
        if ids is None:
            return
        if delta > 0 and len(ids) < MAX_LISTED_IDS:
            ids.append(image_id)
        elif delta < 0 and image_id in ids:
            ids.remove(image_id)

    @property
    def settled(self) -> int:
        return sum(self.counts.values())

    @property
    def clean(self) -> bool:
        """Every task reserved so far was delivered, failed (reported) or released."""
        return all(self.counts[o] == 0 for o in PROBLEM_OUTCOMES)


class HeldTasks:
    """Registry of every held task, keyed by receipt, with per-job tallies of outcomes."""

    def __init__(self) -> None:
        self._tasks: dict[str, HeldTask] = {}
        self._tallies: dict[int, JobTally] = {}
        # Receipts settled as KEPT: a later delivery from the outbox re-settles them.
        self._kept: dict[str, tuple[int, str]] = {}
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, reply_subject: object) -> bool:
        return reply_subject in self._tasks

    def get(self, reply_subject: str) -> HeldTask | None:
        return self._tasks.get(reply_subject)

    def tally(self, job_id: int) -> JobTally:
        tally = self._tallies.get(job_id)
        if tally is None:
            tally = self._tallies[job_id] = JobTally(job_id)
        return tally

    def tallies(self) -> list[JobTally]:
        return [self._tallies[k] for k in sorted(self._tallies)]

    def pop_tally(self, job_id: int) -> JobTally | None:
        return self._tallies.pop(job_id, None)

    def _notify(self) -> None:
        old, self._changed = self._changed, asyncio.Event()
        old.set()

    async def wait_changed(self, limit_s: float) -> None:
        """Wait until a task is added or settled, at most ``limit_s`` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), limit_s)

    def add(self, tasks: Iterable[HeldTask]) -> None:
        for task in tasks:
            if task.reply_subject in self._tasks:
                # The server handed out a receipt we already hold: one task, one count.
                logger.warning(
                    "job %s: receipt for image %s received twice", task.job_id, task.image_id
                )
                continue
            self._tasks[task.reply_subject] = task
            self.tally(task.job_id).reserved += 1
        self._notify()

    def set_state(self, reply_subjects: Iterable[str], state: TaskState) -> None:
        for subject in reply_subjects:
            task = self._tasks.get(subject)
            if task is not None:
                task.state = state

    def settle(self, reply_subjects: Iterable[str], outcome: Outcome) -> list[HeldTask]:
        """Record the outcome of held tasks and forget them; the tasks that were held."""
        settled = []
        for subject in reply_subjects:
            task = self._tasks.pop(subject, None)
            if task is None:
                continue
            self.tally(task.job_id).count(outcome, task.image_id)
            if outcome is Outcome.KEPT:
                self._kept[subject] = (task.job_id, task.image_id)
            settled.append(task)
        if settled:
            self._notify()
        return settled

    def resettle_kept(self, reply_subject: str, outcome: Outcome) -> bool:
        """A task kept in the outbox got its outcome after all; True if it was ours."""
        entry = self._kept.pop(reply_subject, None)
        if entry is None:
            return False
        job_id, image_id = entry
        tally = self.tally(job_id)
        tally.count(Outcome.KEPT, image_id, -1)
        tally.count(outcome, image_id)
        if outcome is Outcome.KEPT:
            self._kept[reply_subject] = entry
        return True

    def kept_subjects(self) -> dict[int, list[str]]:
        by_job: dict[int, list[str]] = {}
        for subject, (job_id, _) in self._kept.items():
            by_job.setdefault(job_id, []).append(subject)
        return by_job

    def for_job(self, job_id: int) -> list[HeldTask]:
        return [t for t in self._tasks.values() if t.job_id == job_id]

    def jobs(self) -> set[int]:
        return {t.job_id for t in self._tasks.values()}

    def in_states(self, *states: TaskState) -> list[HeldTask]:
        return [t for job in self.jobs() for t in self.for_job(job) if t.state in states]

    def extendable_by_job(self) -> dict[int, list[str]]:
        by_job: dict[int, list[str]] = {}
        for task in self._tasks.values():
            if task.extendable:
                by_job.setdefault(task.job_id, []).append(task.reply_subject)
        return by_job

    def mark_unextendable(self, reply_subjects: Iterable[str]) -> None:
        for subject in reply_subjects:
            task = self._tasks.get(subject)
            if task is not None:
                task.extendable = False

    def states(self) -> dict[TaskState, int]:
        counts = dict.fromkeys(TaskState, 0)
        for task in self._tasks.values():
            counts[task.state] += 1
        return counts


class LeaseExtender:
    """Extends the leases of all held tasks every ``interval_s``, one call per job."""

    def __init__(
        self,
        client: WorkerClient,
        held: HeldTasks,
        interval_s: float,
        *,
        on_job_gone: Callable[[int], None] | None = None,
    ) -> None:
        self._client = client
        self._held = held
        self.interval_s = interval_s
        self._on_job_gone = on_job_gone
        self._warned_at: dict[int, float] = {}

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time() + self.interval_s
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            # Fixed rate, not "interval after the last answer": a slow answer must not
            # push the next extension past the end of a lease.
            next_at += self.interval_s
            await self.extend_once()
            next_at = max(next_at, loop.time())  # after a stall, no burst to catch up

    async def extend_once(self) -> None:
        """One extension call per job, concurrently."""
        await asyncio.gather(
            *(self._extend_job(j, s) for j, s in self._held.extendable_by_job().items())
        )

    async def _extend_job(self, job_id: int, subjects: list[str]) -> None:
        try:
            answer = await self._client.extend(job_id, subjects)
        except ApiError as exc:
            if exc.status == 404 and self._on_job_gone is not None:
                self._on_job_gone(job_id)
            # Once a minute per job: a server outage would otherwise repeat this
            # every few seconds; the delivery path reports what really matters.
            now = time.monotonic()
            if now - self._warned_at.get(job_id, float("-inf")) >= 60:
                self._warned_at[job_id] = now
                logger.warning("job %s: could not extend %d leases: %s", job_id, len(subjects), exc)
            return
        if answer.unknown:
            self._held.mark_unextendable(answer.unknown)
            logger.warning(
                "job %s: the server no longer holds %d of our tasks for us (settled meanwhile, "
                "redelivered, or the job ended); their results will still be delivered",
                job_id,
                len(answer.unknown),
            )


class Releaser:
    """Gives tasks back to the server for immediate redelivery (NAK), one call per job.

    ``supported`` is the server's release capability, known once the worker has
    asked; without it tasks cannot be given back and wait out their lease.
    """

    def __init__(self, client: WorkerClient, held: HeldTasks) -> None:
        self._client = client
        self._held = held
        self.supported = False

    async def release(self, tasks: list[HeldTask], why: str) -> None:
        """Release the tasks still held, settling each RELEASED or ABANDONED."""
        by_job: dict[int, list[HeldTask]] = {}
        for task in tasks:
            if task.reply_subject in self._held:
                by_job.setdefault(task.job_id, []).append(task)
        for job_id, job_tasks in by_job.items():
            subjects = [t.reply_subject for t in job_tasks]
            ids = ", ".join(t.image_id for t in job_tasks)
            if not self.supported:
                self._held.settle(subjects, Outcome.ABANDONED)
                logger.warning(
                    "job %s: %d tasks not processed (%s) cannot be released (the server has no "
                    "release); they return to the queue when their lease expires: %s",
                    job_id,
                    len(subjects),
                    why,
                    ids,
                )
                continue
            try:
                async with asyncio.timeout(RELEASE_TIMEOUT_S):
                    await self._client.release(job_id, subjects)
            except (ApiError, TimeoutError) as exc:
                self._held.settle(subjects, Outcome.ABANDONED)
                logger.warning(
                    "job %s: could not release %d tasks (%s: %s); they return to the queue when "
                    "their lease expires: %s",
                    job_id,
                    len(subjects),
                    why,
                    exc,
                    ids,
                )
            else:
                # Receipts the server answered "unknown" are no longer ours either.
                self._held.settle(subjects, Outcome.RELEASED)
                logger.info("job %s: released %d tasks (%s)", job_id, len(subjects), why)

    async def release_kept(self) -> None:
        """Give back the tasks whose results are kept in the outbox (best effort).

        Another worker can then redo them now; if the kept result arrives later
        the server stores it as valid.
        """
        if not self.supported:
            return
        for job_id, subjects in self._held.kept_subjects().items():
            with contextlib.suppress(ApiError, TimeoutError):
                async with asyncio.timeout(RELEASE_TIMEOUT_S):
                    await self._client.release(job_id, subjects)
