"""The run's stop switch and its named stage tasks.

Every stage runs as a named task. One that dies of an unexpected error halts
the run, which then winds down through the normal shutdown (release what was
not computed, deliver what was, all from the registry), so a bug in one stage
strands no task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

logger = logging.getLogger(__name__)


class Halt:
    """Set when the run must end: stop/abort, drained, or fatal (``fatal`` says why)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.fatal: str | None = None

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        await self._event.wait()

    def fail(self, reason: str) -> None:
        """Something makes going on pointless: stop reserving and wind down."""
        if self.fatal is None:
            self.fatal = reason
            logger.error("worker stopping: %s", reason)
        self._event.set()

    async def sleep(self, seconds: float) -> None:
        """Sleep unless the run is halting."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), seconds)


class StageTasks:
    """The run's stage tasks by name; one that dies of an error halts the run."""

    def __init__(self, halt: Halt, abort: asyncio.Event) -> None:
        self._halt = halt
        self._abort = abort
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro, name=f"trapline-worker-{name}")
        self._tasks[name] = task
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            # A bug or an unexpected failure in a stage: wind down through the
            # normal shutdown, which releases and delivers from the registry.
            logger.error("internal error in %s", task.get_name(), exc_info=exc)
            self._halt.fail(f"internal error in {task.get_name()}: {type(exc).__name__}: {exc}")

    def get(self, name: str) -> asyncio.Task[None] | None:
        return self._tasks.get(name)

    def any_alive(self, prefix: str) -> bool:
        """Whether a task whose name starts with ``prefix`` is still running."""
        return any(not t.done() for n, t in self._tasks.items() if n.startswith(prefix))

    async def cancel(self, name: str) -> None:
        task = self._tasks.get(name)
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def cancel_all(self) -> None:
        for name in list(self._tasks):
            await self.cancel(name)

    async def wait(self, name: str, limit_s: float, *, abortable: bool = True) -> bool:
        """Wait for a stage to end by itself (unless aborted); True if it ended."""
        task = self._tasks.get(name)
        if task is None or task.done():
            return True
        aborted = asyncio.ensure_future(self._abort.wait() if abortable else asyncio.sleep(limit_s))
        try:
            await asyncio.wait(
                {task, aborted}, timeout=limit_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            aborted.cancel()
        return task.done()
