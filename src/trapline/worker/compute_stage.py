"""The compute stage: run the pipeline on a batch and put its results in the outbox.

A batch the pipeline raises on is retried image by image, so a poison image
fails alone. A pipeline that fails on every image of
``MAX_CONSECUTIVE_PIPELINE_FAILURES`` batches in a row is broken: the run halts
instead of failing every image of every job.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any

from trapline.pipelines.base import ImageInput, ImageResult, Pipeline
from trapline.worker.compute import ComputeThread, batch_inputs, build_items
from trapline.worker.leases import HeldTasks, Releaser, TaskState
from trapline.worker.lifecycle import Halt
from trapline.worker.outbox import Outbox, OutboxEntry
from trapline.worker.results import ResultConverter, error_item, is_error_item, item_image_id
from trapline.worker.tasks import Batch

logger = logging.getLogger(__name__)

# A pipeline that raises on this many batches in a row is broken: stop instead
# of failing every image of every job.
MAX_CONSECUTIVE_PIPELINE_FAILURES = 3


class ComputeStage:
    """Takes batches from ``in_q``, computes one at a time, hands outbox entries to ``out_q``.

    ``computing`` is the batch in the pipeline; ``handoff`` the entry computed
    but not yet taken by the delivery stage. Shutdown works from both.
    """

    def __init__(
        self,
        pipelines: dict[str, Pipeline],
        compute_thread: ComputeThread,
        outbox: Outbox,
        held: HeldTasks,
        *,
        halt: Halt,
        releaser: Releaser,
        is_gone: Callable[[int], bool],
        prefetch: asyncio.Semaphore,
        in_q: asyncio.Queue[Batch],
        out_q: asyncio.Queue[OutboxEntry | None],
    ) -> None:
        self._pipelines = pipelines
        self._converters = {slug: ResultConverter(p) for slug, p in pipelines.items()}
        self._compute_thread = compute_thread
        self._outbox = outbox
        self.held = held
        self._halt = halt
        self._releaser = releaser
        self._is_gone = is_gone
        self._prefetch = prefetch
        self._in_q = in_q
        self._out_q = out_q
        self.computing: Batch | None = None
        self.handoff: OutboxEntry | None = None
        # Images given to the pipeline.
        self.computed = 0
        self._pipeline_failures = 0

    def take_handoff(self) -> OutboxEntry | None:
        """The entry not yet handed on, now the caller's to deliver."""
        handoff, self.handoff = self.handoff, None
        return handoff

    async def run(self) -> None:
        while True:
            batch = await self._in_q.get()
            self._prefetch.release()
            if self._halt.is_set():
                # Only the batch already in compute is finished at shutdown.
                continue
            if self._is_gone(batch.job.id) or not batch.still_held(self.held):
                await self._releaser.release(batch.tasks, f"job {batch.job.id} ended")
                continue
            self.computing = batch
            self.held.set_state(batch.subjects, TaskState.COMPUTING)
            items = await self._compute(batch)
            entry = await self._to_outbox(batch, items)
            self.held.set_state(batch.subjects, TaskState.DELIVERING)
            self.computing = None
            self.handoff = entry
            await self._out_q.put(entry)
            self.handoff = None

    async def _compute(self, batch: Batch) -> list[dict[str, Any]]:
        slug = batch.job.pipeline_slug
        pipeline = self._pipelines[slug]
        inputs = batch_inputs(batch)
        results: list[ImageResult] | None = None
        failure: str | None = None
        if inputs:
            try:
                results = await self._compute_thread.run(lambda: pipeline.process(inputs))
                self._pipeline_failures = 0
            except Exception as exc:
                failure = f"pipeline {slug} failed: {type(exc).__name__}: {exc}"
                logger.warning(
                    "job %s: %s; retrying its %d images one by one",
                    batch.job.id,
                    failure,
                    len(inputs),
                    exc_info=exc,
                )
                results = await self._compute_one_by_one(batch, slug, inputs)
                if all(r.error is not None for r in results):
                    # Not one poison image: the pipeline itself is broken.
                    self._pipeline_failures += 1
                    if self._pipeline_failures >= MAX_CONSECUTIVE_PIPELINE_FAILURES:
                        self._halt.fail(
                            f"pipeline {slug} failed on {self._pipeline_failures} batches in a row"
                        )
                else:
                    self._pipeline_failures = 0
                failure = None
        batch.pixels.clear()  # the largest thing a batch holds; not needed any more
        self.computed += len(inputs)
        items = build_items(batch, results, self._converters[slug], failure)
        failed = [f"{item_image_id(i)} ({i['result']['error']})" for i in items if is_error_item(i)]
        if failed:
            # These images will be recorded failed: say so, naming each one.
            logger.warning(
                "job %s: %d image(s) reported failed: %s",
                batch.job.id,
                len(failed),
                "; ".join(failed),
            )
        return items

    async def _compute_one_by_one(
        self, batch: Batch, slug: str, inputs: list[ImageInput]
    ) -> list[ImageResult]:
        """Isolate a poison image: only the images the pipeline fails on are reported failed."""
        pipeline = self._pipelines[slug]
        results: list[ImageResult] = []
        for one in inputs:
            try:
                got = await self._compute_thread.run(functools.partial(pipeline.process, [one]))
                results.extend(
                    got[:1] or [ImageResult(one.id, error="pipeline returned no result")]
                )
            except Exception as exc:
                reason = f"pipeline {slug} failed on this image: {type(exc).__name__}: {exc}"
                logger.error("job %s image %s: %s", batch.job.id, one.id, reason)
                results.append(ImageResult(image_id=one.id, error=reason))
        return results

    async def _to_outbox(self, batch: Batch, items: list[dict[str, Any]]) -> OutboxEntry:
        try:
            return await self._outbox.add(batch.job.id, items)
        except ValueError:
            # Should not happen (items are checked one by one); never lose the batch over it.
            logger.exception(
                "job %s: result batch could not be encoded; reporting errors", batch.job.id
            )
            fallback = [
                error_item(t.reply_subject, t.image_id, "result could not be encoded")
                for t in batch.tasks
            ]
            return await self._outbox.add(batch.job.id, fallback)
