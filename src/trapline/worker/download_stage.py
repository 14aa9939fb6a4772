"""The download stage: fetch and decode a batch's images for pipelines that need pixels.

A batch of a job that is gone is released here instead; an image that cannot
be fetched or decoded becomes an error result of its task, never of the batch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from trapline.pipelines.base import Pipeline
from trapline.worker.download import Downloader, DownloadFailed, decode_rgb
from trapline.worker.leases import HeldTask, HeldTasks, Releaser, TaskState
from trapline.worker.lifecycle import Halt
from trapline.worker.tasks import Batch

logger = logging.getLogger(__name__)


class DownloadStage:
    """Moves batches from ``in_q`` to ``out_q``, with their pixels where the pipeline needs them.

    A batch dropped here gives back its prefetch permit (the compute stage
    gives back the permit of every batch that reaches it).
    """

    def __init__(
        self,
        pipelines: dict[str, Pipeline],
        downloader: Downloader,
        held: HeldTasks,
        *,
        halt: Halt,
        releaser: Releaser,
        is_gone: Callable[[int], bool],
        prefetch: asyncio.Semaphore,
        in_q: asyncio.Queue[Batch],
        out_q: asyncio.Queue[Batch],
    ) -> None:
        self._pipelines = pipelines
        self._downloader = downloader
        self.held = held
        self._halt = halt
        self._releaser = releaser
        self._is_gone = is_gone
        self._prefetch = prefetch
        self._in_q = in_q
        self._out_q = out_q
        # Images fetched and decoded.
        self.downloaded = 0

    async def run(self) -> None:
        while True:
            batch = await self._in_q.get()
            if self._halt.is_set():
                # Shutting down: the batch stays registered and is released from there.
                self._prefetch.release()
                continue
            if self._is_gone(batch.job.id) or not batch.still_held(self.held):
                self._prefetch.release()
                await self._releaser.release(batch.tasks, f"job {batch.job.id} ended")
                continue
            if self._pipelines[batch.job.pipeline_slug].needs_pixels:
                await self._download(batch)
            self.held.set_state(batch.subjects, TaskState.WAITING)
            await self._out_q.put(batch)

    async def _download(self, batch: Batch) -> None:
        runnable = batch.runnable()
        self.held.set_state((t.reply_subject for t in runnable), TaskState.DOWNLOADING)

        async def one(task: HeldTask) -> None:
            try:
                data = await self._downloader.fetch(task.image_url)
                batch.pixels[task.reply_subject] = await asyncio.to_thread(decode_rgb, data)
                self.downloaded += 1
            except DownloadFailed as exc:
                batch.errors[task.reply_subject] = exc.reason
                # Reported as an error result: the image will be failed with this reason.
                logger.warning("job %s image %s: %s", batch.job.id, task.image_id, exc.reason)

        await asyncio.gather(*(one(t) for t in runnable))
