"""The job API for people, the CLI and the dashboard (docs/protocol.md §3), and served image files."""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import io
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import Response
from sqlalchemy import select
from starlette.routing import Route

from trapline.errors import InvalidRequest, NotFound
from trapline.ledger.models import (
    Detection,
    Job,
    JobEvent,
    JobImage,
    PipelineRow,
    ProcessingService,
    Project,
    utcnow,
)
from trapline.ledger.queries import image_detections, image_row
from trapline.ledger.tokens import Principal
from trapline.server import creation, files, lifecycle
from trapline.server.api_worker import load_job
from trapline.server.auth import Admin, Caller, Ctx, check_project
from trapline.server.edge import FastJSONResponse
from trapline.server.schemas import JobCreateIn, JobImagesIn
from trapline.server.views import detection_view, event_view, image_view, job_view

router = APIRouter(prefix="/api/v2", tags=["jobs"])


async def _view(ctx: Ctx, job_id: int, caller: Principal | None = None) -> dict[str, Any]:
    """The job's view; with ``caller``, only if the job is in a project the caller may see."""
    async with ctx.reads() as session:
        job = await session.get(Job, job_id)
        if job is None:
            raise NotFound(f"job {job_id} not found")
        if caller is not None:
            check_project(caller, job.project_id)
        return await job_view(session, job, waiting_after_s=ctx.settings.waiting_after_s)


@router.post("/jobs/", status_code=201)
async def create_job(body: JobCreateIn, ctx: Ctx, caller: Admin) -> dict[str, Any]:
    check_project(caller, body.project_id)
    async with ctx.reads() as session:
        if await session.get(Project, body.project_id) is None:
            raise NotFound(f"project {body.project_id} not found")
    if body.images_dir and body.images:
        raise InvalidRequest("give either images or images_dir, not both")
    images: list[creation.NewImage] = []
    if body.images_dir:
        images = await asyncio.to_thread(creation.images_from_dir, body.images_dir)
    elif body.images or body.start_now:
        images = creation.images_from_urls(body.images)
    deadline = (
        utcnow() + timedelta(seconds=body.deadline_seconds) if body.deadline_seconds else None
    )
    job_id = await creation.create_job(
        ctx,
        name=body.name or f"{body.pipeline} job",
        project_id=body.project_id,
        pipeline_slug=body.pipeline,
        images=images,
        failure_threshold=body.failure_threshold,
        images_dir=body.images_dir,
        deadline_at=deadline,
        start_now=body.start_now,
    )
    return await _view(ctx, job_id)


@router.get("/jobs/{job_id}/")
async def get_job(job_id: int, ctx: Ctx, caller: Caller) -> dict[str, Any]:
    return await _view(ctx, job_id, caller)  # one read: the job page is polled all night


@router.post("/jobs/{job_id}/images/")
async def append_images(job_id: int, body: JobImagesIn, ctx: Ctx, caller: Admin) -> dict[str, Any]:
    """A page of images for a job created with ``start_now: false``, before it starts."""
    await load_job(ctx, caller, job_id)
    total = await creation.append_images(ctx, job_id, body.images)
    # Not the job view: counting a big job's rows per page would make paging quadratic.
    return {"job_id": job_id, "added": len(body.images), "total": total}


@router.post("/jobs/{job_id}/start/")
async def start_job(job_id: int, ctx: Ctx, caller: Admin) -> dict[str, Any]:
    """Queue a job created with ``start_now: false`` (409 if already started)."""
    await load_job(ctx, caller, job_id)
    await lifecycle.start_job(ctx, job_id)
    return await _view(ctx, job_id)


@router.post("/jobs/{job_id}/cancel/")
async def cancel_job(job_id: int, ctx: Ctx, caller: Admin) -> dict[str, Any]:
    await load_job(ctx, caller, job_id)
    await lifecycle.cancel_job(ctx, job_id)
    return await _view(ctx, job_id)


@router.post("/jobs/{job_id}/retry/")
async def retry_job(job_id: int, ctx: Ctx, caller: Admin) -> dict[str, Any]:
    await load_job(ctx, caller, job_id)
    await lifecycle.retry_job(ctx, job_id)
    return await _view(ctx, job_id)


@router.get("/jobs/{job_id}/images/")
async def list_images(
    job_id: int,
    ctx: Ctx,
    caller: Caller,
    state: str | None = None,
    redelivered: bool = False,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> dict[str, Any]:
    await load_job(ctx, caller, job_id)
    query = select(JobImage).where(JobImage.job_id == job_id)
    if redelivered:
        query = query.where((JobImage.deliveries > 1) | (JobImage.expiries > 0))
    if state:
        query = query.where(JobImage.state.in_(state.lower().split(",")))
    async with ctx.reads() as session:
        rows = (
            await session.scalars(query.order_by(JobImage.id).limit(limit).offset(offset))
        ).all()
    return {"count": len(rows), "results": [image_view(r) for r in rows]}


@router.get("/jobs/{job_id}/images/{image_id:path}/")
async def show_image(job_id: int, image_id: str, ctx: Ctx, caller: Caller) -> dict[str, Any]:
    """One image's ledger row, its full history and its detections."""
    await load_job(ctx, caller, job_id)
    async with ctx.reads() as session:
        row = await image_row(session, job_id, image_id)
        history = (
            await session.scalars(
                select(JobEvent)
                .where(JobEvent.job_id == job_id, JobEvent.image_id == image_id)
                .order_by(JobEvent.id)
            )
        ).all()
        dets = await image_detections(session, job_id, image_id)
    return {
        **image_view(row),
        "history": [event_view(e) for e in history],
        "detections": [detection_view(d) for d in dets],
    }


@router.get("/jobs/{job_id}/queue/")
async def job_queue(job_id: int, ctx: Ctx, caller: Caller) -> dict[str, Any]:
    """The job's JetStream consumer stats (null once the job finished and its queue is gone)."""
    job = await load_job(ctx, caller, job_id)
    stats = await ctx.queue.consumer_stats(job.id, job.queue_generation)
    return {
        "job_id": job.id,
        "stream": ctx.queue.names.stream(job.id, job.queue_generation),
        "consumer": dataclasses.asdict(stats) if stats else None,
    }


@router.get("/jobs/{job_id}/logs/")
async def job_logs(
    job_id: int,
    ctx: Ctx,
    caller: Caller,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> dict[str, Any]:
    await load_job(ctx, caller, job_id)
    async with ctx.reads() as session:
        rows = (
            await session.scalars(
                select(JobEvent)
                .where(JobEvent.job_id == job_id, JobEvent.image_id.is_(None))
                .order_by(JobEvent.id.desc())
                .limit(limit)
            )
        ).all()
    return {"job_id": job_id, "logs": [event_view(e) for e in reversed(rows)]}


_CSV_FIELDS = ["image_id", "index", "x1", "y1", "x2", "y2", "algorithm", "label", "score"]


@router.get("/jobs/{job_id}/results/", response_model=None)
async def job_results(
    job_id: int,
    ctx: Ctx,
    caller: Caller,
    format: str = "json",
    limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Response:
    await load_job(ctx, caller, job_id)
    async with ctx.reads() as session:
        dets = (
            await session.scalars(
                select(Detection)
                .where(Detection.job_id == job_id)
                .order_by(Detection.id)
                .limit(limit)
                .offset(offset)
            )
        ).all()
    if format == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=_CSV_FIELDS)
        writer.writeheader()
        for d in dets:
            top = d.classifications[0] if d.classifications else {}
            scores = top.get("scores") or []
            writer.writerow(
                {
                    "image_id": d.image_id,
                    "index": d.idx,
                    "x1": d.x1,
                    "y1": d.y1,
                    "x2": d.x2,
                    "y2": d.y2,
                    "algorithm": d.algorithm_key,
                    "label": top.get("classification", ""),
                    "score": max(scores) if scores else "",
                }
            )
        return Response(out.getvalue(), media_type="text/csv")
    if format != "json":
        raise InvalidRequest("format must be json or csv")
    return FastJSONResponse(
        {"job_id": job_id, "count": len(dets), "results": [detection_view(d) for d in dets]}
    )


@router.get("/pipelines/")
async def list_pipelines(ctx: Ctx, caller: Caller) -> dict[str, Any]:
    async with ctx.reads() as session:
        pipelines = (await session.scalars(select(PipelineRow).order_by(PipelineRow.slug))).all()
        services_q = select(ProcessingService).order_by(ProcessingService.id)
        if caller.project_id is not None:
            services_q = services_q.where(ProcessingService.project_id == caller.project_id)
        services = (await session.scalars(services_q)).all()
    return {
        "pipelines": [
            {"slug": p.slug, "name": p.name, "version": p.version, "description": p.description}
            for p in pipelines
        ],
        "processing_services": [
            {
                "id": s.id,
                "name": s.name,
                "project_id": s.project_id,
                "pipelines": s.pipelines,
                "last_seen_at": s.last_seen_at.isoformat().replace("+00:00", "Z"),
            }
            for s in services
        ],
    }


files_router = APIRouter(tags=["files"])


# A signed URL is its own authorization, so the route skips FastAPI's dependencies and
# validation, and the database (see files.py): it is the hot path of a folder job.
files_router.routes.append(
    Route(
        "/api/v2/files/{job_id:int}/{image_id:path}/",
        files.FileServer(),
        methods=["GET"],
        include_in_schema=False,
    )
)
