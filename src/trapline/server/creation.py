"""Creating jobs: validate images (URL lists, folders), insert them a page at a time.

A job may be created empty (``start_now=False``), given its images a page per
request, then started; the server's memory is bounded by the page (``PAGE``
images), not by the job. Queuing is :mod:`trapline.server.lifecycle`'s.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

from sqlalchemy import Table, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from trapline.errors import Conflict, InvalidRequest, NotFound
from trapline.ledger import events
from trapline.ledger.models import ImageState, Job, JobImage, JobStatus, utcnow
from trapline.server.context import AppContext
from trapline.server.lifecycle import PAGE, start_job

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp"}
MAX_IMAGE_ID_LEN = 200
JOB_IMAGES = cast(Table, JobImage.__table__)
# URLs that certainly pass the rule below, accepted without urlsplit (the common case
# of a big manifest); anything else gets the full check.
_PLAIN_URL = re.compile(r"https?://[A-Za-z0-9._~%!$&'()*+,;=:@-]+(?:[/?#]\S*)?")


@dataclass
class NewImage:
    image_id: str
    url: str | None = None
    path: str | None = None


def _url_problem(url: object) -> str | None:
    if not isinstance(url, str) or not url.strip():
        return "missing url"
    if _PLAIN_URL.fullmatch(url):
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc or " " in url:
        return f"malformed url {url[:200]!r} (need http:// or https://)"
    return None


def images_from_urls(raw: Sequence[dict[str, Any]], *, first_position: int = 1) -> list[NewImage]:
    """Validate a list of ``{"id"?, "url"}``; every offending image is named in one error.

    An image without an id is numbered by its position in the job: ``first_position``
    is the position of ``raw[0]`` (1 for a whole job; one past the images already
    added for a page appended to one). An error's ``index`` is the item's place in ``raw``.
    """
    errors: list[dict[str, object]] = []
    images: list[NewImage] = []
    seen: set[str] = set()
    for index, item in enumerate(raw):
        url = item.get("url")
        given = item.get("id")
        image_id = str(first_position + index) if given is None else str(given)
        reason = _url_problem(url)
        if not image_id.strip() or len(image_id) > MAX_IMAGE_ID_LEN:
            reason = reason or f"image id must be 1-{MAX_IMAGE_ID_LEN} characters"
        elif image_id in seen:
            reason = reason or f"duplicate image id {image_id!r}"
        if reason:
            errors.append({"index": index, "id": image_id, "reason": reason})
            continue
        seen.add(image_id)
        images.append(NewImage(image_id=image_id, url=str(url)))
    if errors:
        raise InvalidRequest(f"{len(errors)} image(s) refused: see errors", errors=errors)
    if not images:
        raise InvalidRequest("a job needs at least one image")
    return images


def _image_files(root: Path) -> Iterator[Path]:
    """Image files under ``root`` in the order of ``sorted(root.rglob("*"))``, listed one
    directory at a time (a folder of a million files is never one list of paths)."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=True):
            yield from _image_files(Path(entry.path))
        elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
            yield Path(entry.path)


def images_from_dir(directory: str) -> list[NewImage]:
    """Every image file under ``directory`` (recursive, sorted); ids are relative paths."""
    root = Path(directory)
    if not root.is_absolute():
        raise InvalidRequest(f"images_dir must be an absolute path, got {directory!r}")
    if not root.is_dir():
        raise InvalidRequest(f"images_dir {directory!r} is not a readable directory on the server")
    images = [
        NewImage(image_id=p.relative_to(root).as_posix(), path=str(p)) for p in _image_files(root)
    ]
    if not images:
        raise InvalidRequest(f"images_dir {directory!r} holds no image files")
    too_long = [i.image_id for i in images if len(i.image_id) > MAX_IMAGE_ID_LEN]
    if too_long:
        raise InvalidRequest(f"image paths too long to use as ids: {too_long[:5]}")
    return images


async def _insert_images(
    session: AsyncSession, job_id: int, images: Sequence[NewImage], first_position: int
) -> None:
    """Insert ledger rows, a page per statement.

    ``msg_seq`` starts as the image's position in the job: the sequence its message
    gets when the job is first queued (a fresh stream, published in row order), so
    that publishing usually has nothing to correct. Nothing reads it before then: a
    job is reserved from only once it is STARTED, after :func:`queue_job` checked
    every sequence against the stream's acknowledgements.
    """
    now = utcnow()
    for start in range(0, len(images), PAGE):
        await session.execute(
            insert(JOB_IMAGES),
            [
                {
                    "job_id": job_id,
                    "image_id": i.image_id,
                    "url": i.url,
                    "path": i.path,
                    "state": ImageState.QUEUED.value,
                    "msg_seq": first_position + start + k,
                    "deliveries": 0,
                    "leases": 0,
                    "expiries": 0,
                    "updated_at": now,
                }
                for k, i in enumerate(images[start : start + PAGE])
            ],
        )


async def create_job(
    ctx: AppContext,
    *,
    name: str,
    project_id: int,
    pipeline_slug: str,
    images: Sequence[NewImage],
    failure_threshold: float,
    images_dir: str | None,
    deadline_at: datetime | None,
    start_now: bool,
) -> int:
    """A job with its images in one transaction; queued at once when ``start_now``.

    Without images (and not started) it waits in CREATED for :func:`append_images`.
    """
    async with ctx.sessions() as session, session.begin():
        job = Job(
            name=name,
            project_id=project_id,
            pipeline_slug=pipeline_slug,
            status=JobStatus.CREATED,
            failure_threshold=failure_threshold,
            total=len(images),
            images_dir=images_dir,
            deadline_at=deadline_at,
            created_at=utcnow(),
        )
        session.add(job)
        await session.flush()
        job_id = job.id
        await _insert_images(session, job_id, images, first_position=1)
        events.record(
            session,
            job_id,
            f"created with {len(images)} images for pipeline {pipeline_slug!r}"
            + ("" if start_now else "; not started"),
        )
    if start_now:
        await start_job(ctx, job_id)
    return job_id


async def append_images(ctx: AppContext, job_id: int, raw: Sequence[dict[str, Any]]) -> int:
    """Add a page of ``{"id"?, "url"}`` images to a job not started yet; all or nothing.

    Returns the job's image count. A page naming an image id the job already holds
    is refused whole (422 naming every such image); the unique constraint on
    (job, image) decides, so two concurrent pages cannot both add an id.
    """
    page_ids: list[str] = []
    try:
        async with ctx.sessions() as session, session.begin():
            # The row lock (PostgreSQL; SQLite's write lock serializes anyway) numbers
            # concurrent pages one after the other and orders them against a start.
            job = await session.scalar(select(Job).where(Job.id == job_id).with_for_update())
            if job is None:
                raise NotFound(f"job {job_id} not found")
            if job.status != JobStatus.CREATED or job.queue_generation:
                raise Conflict(
                    f"job {job_id} was already started ({job.status}): images can only be"
                    " added before it starts"
                )
            if job.images_dir:
                raise Conflict(f"job {job_id} takes its images from images_dir {job.images_dir!r}")
            first = job.total + 1
            images = images_from_urls(raw, first_position=first)
            page_ids = [i.image_id for i in images]
            await _insert_images(session, job_id, images, first_position=first)
            job.total += len(images)
            total = job.total
            events.record(session, job_id, f"added {len(images)} images ({total} in all)")
    except IntegrityError:
        held = await _already_in_job(ctx, job_id, page_ids)
        if not held:
            raise
        errors: list[dict[str, object]] = [
            {"index": n, "id": i, "reason": f"image id {i!r} is already in job {job_id}"}
            for n, i in enumerate(page_ids)
            if i in held
        ]
        raise InvalidRequest(
            f"{len(errors)} image(s) refused: already in job {job_id}; nothing of this page"
            " was added",
            errors=errors,
        ) from None
    return total


async def _already_in_job(ctx: AppContext, job_id: int, image_ids: Sequence[str]) -> set[str]:
    async with ctx.reads() as session:
        return set(
            (
                await session.scalars(
                    select(JobImage.image_id).where(
                        JobImage.job_id == job_id, JobImage.image_id.in_(image_ids)
                    )
                )
            ).all()
        )
