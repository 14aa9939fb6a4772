"""The worker API: Antenna v2 compatible (list, reserve, result, register) plus extensions."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from sqlalchemy import func, select

import trapline
from trapline.errors import InvalidRequest, NotFound
from trapline.ledger.models import Job, JobStatus, PipelineRow, ProcessingService, utcnow
from trapline.ledger.tokens import Principal
from trapline.ledger.transitions import Holder
from trapline.server import dispatch, ingest
from trapline.server.auth import Caller, Ctx, check_project
from trapline.server.context import AppContext
from trapline.server.edge import read_json
from trapline.server.schemas import ReceiptsIn, RegisterIn, ReleaseIn, ReserveIn, ResultsIn
from trapline.server.views import job_view

router = APIRouter(prefix="/api/v2", tags=["worker"])


def holder_of(request: Request, caller: Principal) -> Holder:
    return Holder(
        token_name=caller.name,
        worker_name=(request.headers.get("x-worker-name") or "")[:300] or None,
        worker_id=(request.headers.get("x-worker-id") or "")[:200] or None,
    )


def base_url(request: Request, ctx: AppContext) -> str:
    return ctx.settings.public_url or str(request.base_url)


async def load_job(ctx: AppContext, caller: Principal, job_id: int) -> Job:
    async with ctx.reads() as session:
        job = await session.get(Job, job_id)
    if job is None:
        raise NotFound(f"job {job_id} not found")
    check_project(caller, job.project_id)
    return job


@router.get("/capabilities/")
async def capabilities(ctx: Ctx, caller: Caller) -> dict[str, Any]:
    # Behind the token like every worker call: the worker's first request, so a wrong
    # token stops it at start-up (exit 2) before it touches its outbox.
    return {
        "trapline": trapline.__version__,
        "lease_extension": True,
        "release": True,
        "ack_wait_seconds": ctx.settings.ack_wait_s,
        "max_deliver": ctx.settings.max_deliver,
        "max_batch_size": ctx.settings.reserve_cap,
    }


@router.get("/jobs/")
async def list_jobs(
    request: Request,
    ctx: Ctx,
    caller: Caller,
    pipeline__slug__in: str | None = None,
    ids_only: bool = False,
    incomplete_only: bool = False,
    status: str | None = None,
    project_id: int | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> dict[str, Any]:
    query = select(Job)
    if caller.project_id is not None:
        query = query.where(Job.project_id == caller.project_id)
    if project_id is not None:
        query = query.where(Job.project_id == project_id)
    if pipeline__slug__in:
        query = query.where(Job.pipeline_slug.in_([s for s in pipeline__slug__in.split(",") if s]))
    if incomplete_only:
        query = query.where(Job.status.not_in([s.value for s in JobStatus if s.finished]))
    if status:
        query = query.where(Job.status.in_(status.upper().split(",")))
    # Workers serve the oldest job first; people want the newest first.
    query = query.order_by(Job.id.asc() if ids_only else Job.id.desc())
    async with ctx.sessions() as session:
        count = int(await session.scalar(select(func.count()).select_from(query.subquery())) or 0)
        jobs = (await session.scalars(query.limit(limit).offset(offset))).all()
        if ids_only:
            results = [{"id": j.id, "pipeline_slug": j.pipeline_slug} for j in jobs]
        else:
            results = [
                await job_view(session, j, waiting_after_s=ctx.settings.waiting_after_s)
                for j in jobs
            ]

    def page(off: int) -> str:
        return str(request.url.include_query_params(limit=limit, offset=off))

    return {
        "count": count,
        "next": page(offset + limit) if offset + limit < count else None,
        "previous": page(max(0, offset - limit)) if offset > 0 else None,
        "results": results,
    }


@router.post("/jobs/{job_id}/tasks/")
async def reserve_tasks(
    job_id: int, body: ReserveIn, request: Request, ctx: Ctx, caller: Caller
) -> dict[str, Any]:
    job = await load_job(ctx, caller, job_id)
    tasks = await dispatch.reserve(
        ctx, job, body.batch_size, holder_of(request, caller), base_url(request, ctx)
    )
    return {"tasks": [t.__dict__ for t in tasks]}


@router.post("/jobs/{job_id}/tasks/extend/")
async def extend_tasks(job_id: int, body: ReceiptsIn, ctx: Ctx, caller: Caller) -> dict[str, Any]:
    job = await load_job(ctx, caller, job_id)
    extended, unknown = await dispatch.extend(ctx, job, body.reply_subjects)
    return {"extended": extended, "unknown": unknown}


@router.post("/jobs/{job_id}/tasks/release/")
async def release_tasks(job_id: int, body: ReleaseIn, ctx: Ctx, caller: Caller) -> dict[str, Any]:
    job = await load_job(ctx, caller, job_id)
    released, unknown = await dispatch.release(ctx, job, body.reply_subjects, body.delay_seconds)
    return {"released": released, "unknown": unknown}


@router.post("/jobs/{job_id}/result/")
async def post_results(job_id: int, request: Request, ctx: Ctx, caller: Caller) -> dict[str, Any]:
    job = await load_job(ctx, caller, job_id)
    items = ResultsIn.model_validate(await read_results_body(request)).results
    report = await ingest.ingest(ctx, job, items, holder_of(request, caller))
    return {
        "status": "accepted",
        "job_id": job.id,
        "results_queued": report.count("accepted") + report.count("duplicate"),
        "accepted": report.count("accepted"),
        "duplicates": report.count("duplicate"),
        "rejected": report.count("rejected"),
        "tasks": [s.as_dict() for s in report.items],
    }


async def read_results_body(request: Request) -> Any:
    """The results body; Antenna also takes a bare list of items."""
    data = await read_json(request)
    if isinstance(data, list):
        return {"results": data}
    if not isinstance(data, dict):
        raise InvalidRequest("body must be an object with a 'results' list")
    return data


@router.post("/projects/{project_id}/pipelines/")
async def register_pipelines(
    project_id: int, body: RegisterIn, ctx: Ctx, caller: Caller
) -> dict[str, Any]:
    check_project(caller, project_id)
    created: list[str] = []
    updated: list[str] = []
    now = utcnow()
    async with ctx.sessions() as session, session.begin():
        for p in body.pipelines:
            row = await session.scalar(select(PipelineRow).where(PipelineRow.slug == p.slug))
            if row is None:
                session.add(
                    PipelineRow(
                        slug=p.slug,
                        name=p.name,
                        version=p.version,
                        description=p.description,
                        algorithms=p.algorithms,
                        updated_at=now,
                    )
                )
                created.append(p.slug)
            else:
                row.name, row.version, row.description = p.name, p.version, p.description
                row.algorithms, row.updated_at = p.algorithms, now
                updated.append(p.slug)
        service = await session.scalar(
            select(ProcessingService).where(
                ProcessingService.project_id == project_id,
                ProcessingService.name == body.processing_service_name,
            )
        )
        if service is None:
            service = ProcessingService(
                project_id=project_id,
                name=body.processing_service_name,
                pipelines=[],
            )
            session.add(service)
        service.pipelines = [p.slug for p in body.pipelines]
        service.last_seen_at = now
        service.active = True
        await session.flush()
        service_id = service.id
    return {
        "pipelines_created": created,
        "pipelines_updated": updated,
        "processing_service_id": service_id,
    }
