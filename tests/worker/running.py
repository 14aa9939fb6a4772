"""A worker run started by a test, always cancelled and awaited when the test is done.

All tests share one event loop: a worker task left running by a failed test
would go on reserving and delivering during later tests. :func:`running_worker`
ends it whatever happens in the ``with`` block.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from trapline.pipelines.base import Pipeline
from trapline.settings import WorkerSettings
from trapline.worker import WorkerReport, WorkerStats, run_worker

# How long a cancelled worker may take to unwind before the test says so.
CANCEL_LIMIT_S = 15.0


@dataclass
class RunningWorker:
    task: asyncio.Task[WorkerReport]
    stop: asyncio.Event
    abort: asyncio.Event

    async def report(self, limit_s: float = 30.0) -> WorkerReport:
        """The run's report once it ends by itself (drain) or after ``stop``/``abort``."""
        done, _ = await asyncio.wait({self.task}, timeout=limit_s)
        if not done:
            raise AssertionError(f"worker still running after {limit_s:g} s")
        return self.task.result()

    async def stopped(self, limit_s: float = 30.0) -> WorkerReport:
        """Stop gracefully; the report."""
        self.stop.set()
        return await self.report(limit_s)


@asynccontextmanager
async def running_worker(
    settings: WorkerSettings,
    slugs: list[str],
    pipeline_factory: Callable[[str], Pipeline],
    *,
    drain: bool = False,
    on_stats: Callable[[WorkerStats], None] | None = None,
) -> AsyncIterator[RunningWorker]:
    """``run_worker`` as a task for the ``with`` block; cancelled and awaited on the way out."""
    stop, abort = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        run_worker(
            settings,
            slugs,
            drain=drain,
            stop=stop,
            abort=abort,
            on_stats=on_stats,
            pipeline_factory=pipeline_factory,
        )
    )
    try:
        yield RunningWorker(task, stop, abort)
    finally:
        if not task.done():
            task.cancel()
        done, _ = await asyncio.wait({task}, timeout=CANCEL_LIMIT_S)
        if not done:
            raise AssertionError(f"worker task did not end within {CANCEL_LIMIT_S:g} s of cancel")
        if not task.cancelled():
            task.exception()  # retrieved: the test has already judged the outcome


async def drained(
    settings: WorkerSettings,
    slugs: list[str],
    pipeline_factory: Callable[[str], Pipeline],
    limit_s: float = 60.0,
) -> WorkerReport:
    """Run the worker until no job has work (bounded: cancelled after ``limit_s``)."""
    async with running_worker(settings, slugs, pipeline_factory, drain=True) as worker:
        return await worker.report(limit_s)
