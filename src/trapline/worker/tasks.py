"""Reserved tasks: validation of the server's task objects and the batch that carries them.

The task contract (docs/protocol.md): ``id`` and ``image_id`` are strings,
``image_url`` is never null, ``reply_subject`` is the receipt. A task that
breaks it never aborts the worker: with a receipt it becomes an error result
naming what was wrong; without one it can be neither reported nor released, so
it is logged and left to the server's lease expiry.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from trapline.pipelines.base import RGBImage
from trapline.worker.client import JobRef
from trapline.worker.leases import HeldTask, HeldTasks

logger = logging.getLogger(__name__)


@dataclass
class Batch:
    """One reserve's worth of tasks of one job, as it moves through the stages."""

    job: JobRef
    tasks: list[HeldTask]
    # Receipt -> reason, for tasks that end as error results (malformed, download failed).
    errors: dict[str, str] = field(default_factory=dict)
    # Receipt -> decoded pixels, for pipelines that need them.
    pixels: dict[str, RGBImage] = field(default_factory=dict)

    @property
    def subjects(self) -> list[str]:
        return [t.reply_subject for t in self.tasks]

    def runnable(self) -> list[HeldTask]:
        """Tasks that still go to the pipeline."""
        return [t for t in self.tasks if t.reply_subject not in self.errors]

    def still_held(self, held: HeldTasks) -> bool:
        """Drop tasks released meanwhile (job gone); False if none is left."""
        self.tasks = [t for t in self.tasks if t.reply_subject in held]
        return bool(self.tasks)


@dataclass
class ParsedTasks:
    tasks: list[HeldTask] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    # Tasks without a usable receipt: nothing can be done with them.
    dropped: int = 0


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def parse_tasks(job_id: int, raw_tasks: list[Any]) -> ParsedTasks:
    """Validate the raw task objects of one reserve answer."""
    parsed = ParsedTasks()
    for raw in raw_tasks:
        subject = raw.get("reply_subject") if isinstance(raw, dict) else None
        if not isinstance(subject, str) or not subject:
            parsed.dropped += 1
            logger.warning(
                "job %s: task without a reply_subject ignored (it can be neither reported nor "
                "released; the server's lease expiry will handle it): %.300r",
                job_id,
                raw,
            )
            continue
        assert isinstance(raw, dict)
        problems: list[str] = []
        task_id = raw.get("id")
        if not isinstance(task_id, str):
            problems.append(f"id is {_type_name(task_id)}, not a string")
        image_id = raw.get("image_id")
        if not isinstance(image_id, str) or not image_id:
            problems.append(f"image_id is {_type_name(image_id)}, not a string")
        image_url = raw.get("image_url")
        if not isinstance(image_url, str) or not image_url:
            problems.append(f"image_url is {_type_name(image_url)}, not a URL")
        task = HeldTask(
            job_id=job_id,
            task_id=str(task_id) if task_id is not None else "",
            image_id=str(image_id) if image_id is not None else "",
            image_url=image_url if isinstance(image_url, str) else "",
            reply_subject=subject,
        )
        if task.reply_subject in parsed.errors or any(
            t.reply_subject == subject for t in parsed.tasks
        ):
            logger.warning(
                "job %s: receipt listed twice in one reserve answer; once is used", job_id
            )
            continue
        parsed.tasks.append(task)
        if problems:
            reason = "malformed task: " + "; ".join(problems)
            parsed.errors[subject] = reason
            logger.warning("job %s: %s (image %s): %.300r", job_id, reason, task.image_id, raw)
    return parsed
