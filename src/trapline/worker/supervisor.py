"""Several worker processes, each supervised on its own.

One child dying is reported and restarted (with backoff); its siblings keep
working (the seed's worker tore all GPU children down together). The first
SIGTERM/SIGINT to the supervisor is forwarded to every child, which then shuts
down gracefully; a second one is forwarded again, which makes children stop at
once. Children run in their own process group so a terminal's Ctrl-C reaches
them only through the supervisor, exactly once.

The CLI starts one process per visible GPU (each pinned to its own) unless told otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)

# Exit code of a child that cannot start at all (bad pipeline, token, state dir):
# restarting it would fail the same way.
EXIT_CANNOT_START = 2
RESTART_BACKOFF_MAX_S = 60.0
# A child that ran this long before dying starts again without delay.
STABLE_AFTER_S = 60.0


@dataclass
class _Child:
    index: int
    process: BaseProcess | None = None
    started_at: float = 0.0
    restarts: int = 0
    restart_at: float | None = None
    final_code: int | None = None
    history: list[int] = field(default_factory=list)


class Supervisor:
    """Runs ``target(index, *args)`` in ``processes`` spawned children until they finish."""

    def __init__(
        self,
        target: Callable[..., Any],
        args: tuple[Any, ...],
        processes: int,
        *,
        restart: bool = True,
    ) -> None:
        self._target = target
        self._args = args
        self._restart = restart
        self._ctx = multiprocessing.get_context("spawn")
        self._children = [_Child(i) for i in range(max(1, processes))]
        self._signals = 0

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals == 1:
            logger.warning("%s received: asking %d worker(s) to finish", name, len(self._children))
        else:
            logger.warning("%s received again: asking worker(s) to stop at once", name)
        self._forward()

    def _forward(self) -> None:
        for child in self._children:
            process = child.process
            if process is not None and process.is_alive() and process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)

    def _start(self, child: _Child) -> None:
        process = self._ctx.Process(
            target=self._target,
            args=(child.index, *self._args),
            name=f"trapline-worker-{child.index}",
        )
        process.start()
        child.process = process
        child.started_at = time.monotonic()
        child.restart_at = None
        logger.info("worker process %d started (pid %s)", child.index, process.pid)

    def run(self) -> int:
        """Start every child, supervise until all have finished; 0 if every child ended with 0."""
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            for child in self._children:
                self._start(child)
            while any(c.final_code is None for c in self._children):
                self._step()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        codes = [c.final_code for c in self._children]
        failed = [c for c in self._children if c.final_code != 0]
        for child in failed:
            logger.error(
                "worker process %d ended with exit code %s (restarts: %d)",
                child.index,
                child.final_code,
                child.restarts,
            )
        return 0 if all(code == 0 for code in codes) else 1

    def _step(self) -> None:
        running = [c for c in self._children if c.process is not None and c.final_code is None]
        sentinels = [c.process.sentinel for c in running if c.process is not None]
        pending = [c.restart_at for c in self._children if c.restart_at is not None]
        timeout = max(0.0, min(pending) - time.monotonic()) if pending else 1.0
        if sentinels:
            multiprocessing.connection.wait(sentinels, timeout=min(timeout, 1.0))
        else:
            time.sleep(min(timeout, 1.0))
        now = time.monotonic()
        for child in self._children:
            if child.final_code is not None:
                continue
            if child.restart_at is not None:
                if self._signals:
                    child.final_code = child.history[-1] if child.history else 1
                elif now >= child.restart_at:
                    child.restarts += 1
                    self._start(child)
                continue
            process = child.process
            if process is None or process.is_alive():
                continue
            process.join()
            code = process.exitcode if process.exitcode is not None else 1
            child.history.append(code)
            child.process = None
            if self._signals or code == 0 or code == EXIT_CANNOT_START or not self._restart:
                child.final_code = code
                if code == EXIT_CANNOT_START:
                    logger.error(
                        "worker process %d could not start; not restarting it", child.index
                    )
                continue
            ran = now - child.started_at
            delay = (
                0.0 if ran >= STABLE_AFTER_S else min(RESTART_BACKOFF_MAX_S, 2.0**child.restarts)
            )
            child.restart_at = now + delay
            how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
            logger.error(
                "worker process %d %s after %.0f s; restarting it in %.0f s (the others go on)",
                child.index,
                how,
                ran,
                delay,
            )


def supervise(
    target: Callable[..., Any], args: tuple[Any, ...], processes: int, *, restart: bool = True
) -> int:
    """Run ``processes`` supervised children of ``target(index, *args)``; the exit code."""
    return Supervisor(target, args, processes, restart=restart).run()
