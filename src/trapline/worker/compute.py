"""Running pipelines off the event loop, and turning a processed batch into result items.

Pipelines run on one dedicated daemon thread: GPU libraries keep per-thread
state, so loading and processing on the same thread is the safe choice, and a
daemon thread cannot keep a shutting-down process alive when a batch overruns
its grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from trapline.pipelines.base import ImageInput, ImageResult
from trapline.worker.results import JsonDict, ResultConverter, error_item, match_results
from trapline.worker.tasks import Batch

logger = logging.getLogger(__name__)

T = TypeVar("T")

_Job = tuple[Callable[[], Any], asyncio.AbstractEventLoop, "asyncio.Future[Any]"]


def _resolve(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


class ComputeThread:
    """A daemon thread that runs submitted callables one at a time."""

    def __init__(self, name: str = "trapline-compute") -> None:
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self.busy = False

    def _main(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            fn, loop, future = job
            self.busy = True
            value: Any = None
            error: BaseException | None = None
            try:
                value = fn()
            except BaseException as exc:  # handed to the awaiting coroutine
                error = exc
            finally:
                self.busy = False
            # RuntimeError: the loop is closed and nobody waits for this result any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, future, value, error)

    async def run(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((fn, loop, future))
        return await future

    def close(self) -> None:
        """Let the thread end after its current job (it is a daemon either way)."""
        self._queue.put(None)


def batch_inputs(batch: Batch) -> list[ImageInput]:
    return [
        ImageInput(id=t.image_id, url=t.image_url, pixels=batch.pixels.get(t.reply_subject))
        for t in batch.runnable()
    ]


def build_items(
    batch: Batch, results: list[ImageResult] | None, converter: ResultConverter, failure: str | None
) -> list[JsonDict]:
    """One result item per task of the batch: errors first, then the pipeline's results.

    ``failure`` (the pipeline raised) turns every runnable task into an error result.
    """
    items = [
        error_item(t.reply_subject, t.image_id, batch.errors[t.reply_subject])
        for t in batch.tasks
        if t.reply_subject in batch.errors
    ]
    runnable = batch.runnable()
    if failure is None and not (
        isinstance(results, list) and all(isinstance(r, ImageResult) for r in results)
    ):
        failure = f"pipeline returned {type(results).__name__}, not a list of ImageResult"
    if failure is not None or results is None:
        reason = failure or "pipeline returned no results"
        items.extend(error_item(t.reply_subject, t.image_id, reason) for t in runnable)
        return items
    matched = match_results([t.image_id for t in runnable], results)
    for task, result in zip(runnable, matched, strict=True):
        if result is None:
            items.append(
                error_item(
                    task.reply_subject, task.image_id, "pipeline returned no result for this image"
                )
            )
            continue
        try:
            item = converter.item(task.reply_subject, task.image_id, task.image_url, result)
            # Fail here, per image, rather than for the whole batch in the outbox.
            json.dumps(item, allow_nan=False)
        except Exception as exc:  # a malformed result fails its image, never the batch
            reason = f"pipeline result could not be encoded: {type(exc).__name__}: {exc}"
            logger.error("job %s image %s: %s", batch.job.id, task.image_id, reason)
            item = error_item(task.reply_subject, task.image_id, reason)
        items.append(item)
    return items
