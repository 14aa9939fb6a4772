"""JSON views of jobs and images in the shapes of docs/protocol.md §3 (Antenna's progress shape)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import TextClause, text
from sqlalchemy.ext.asyncio import AsyncSession

from trapline.ledger.models import (
    ALERTS_WHERE,
    Detection,
    Job,
    JobEvent,
    JobImage,
    JobStatus,
    utcnow,
)
from trapline.ledger.queries import Counts, job_counts


def _iso(dt: datetime | None) -> str | None:
    return dt.isoformat().replace("+00:00", "Z") if dt else None


def _stage(
    key: str, name: str, status: str, progress: float, params: dict[str, Any]
) -> dict[str, Any]:
    return {
        "key": key,
        "name": name,
        "status": status,
        "progress": round(progress, 4),
        "params": [
            {"key": k, "name": k.replace("_", " ").capitalize(), "value": v}
            for k, v in params.items()
        ],
    }


def waiting_reason(job: Job, counts: Counts, *, waiting_after_s: float) -> str | None:
    """Why a running job makes no progress, if it is simply waiting for a worker: queued
    images, none reserved, and nothing changed for ``waiting_after_s``. Waiting is a state
    to report, never a reason to fail the job."""
    if job.status != JobStatus.STARTED or counts.reserved or not counts.queued:
        return None
    since = max(
        filter(None, [counts.changed_at, job.queued_at, job.started_at]), default=job.created_at
    )
    if (utcnow() - since).total_seconds() < waiting_after_s:
        return None
    return f"waiting for a worker for pipeline {job.pipeline_slug!r} since {_iso(since)}"


async def job_view(session: AsyncSession, job: Job, *, waiting_after_s: float) -> dict[str, Any]:
    counts = await job_counts(session, job.id)
    detections = counts.detections
    status = JobStatus(job.status)
    total = counts.total or 1
    processed = counts.done + counts.failed
    collect_status = (
        "SUCCESS" if job.queue_generation else ("PENDING" if not status.finished else status.value)
    )
    process_status = (
        status.value if status.finished else ("STARTED" if job.queue_generation else "PENDING")
    )
    stages = [
        _stage(
            "collect",
            "Collect",
            collect_status,
            1.0 if job.queue_generation else 0.0,
            {"total_images": counts.total},
        ),
        _stage(
            "process",
            "Process",
            process_status,
            processed / total,
            {"processed": processed, "remaining": counts.remaining, "failed": counts.failed},
        ),
        _stage(
            "results",
            "Results",
            process_status,
            processed / total,
            {"captures": counts.done, "detections": detections, "failed": counts.failed},
        ),
    ]
    errors = (await session.scalars(_latest_alerts(session), {"job_id": job.id})).all()
    waiting = waiting_reason(job, counts, waiting_after_s=waiting_after_s)
    return {
        "id": job.id,
        "name": job.name,
        "project_id": job.project_id,
        "pipeline_slug": job.pipeline_slug,
        "dispatch_mode": "async_api",
        "status": status.value,
        "failure_threshold": job.failure_threshold,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "deadline_at": _iso(job.deadline_at),
        "progress": {
            "summary": {"status": status.value, "progress": round(processed / total, 4)},
            "stages": stages,
            "errors": list(reversed(errors)),
        },
        "counts": counts.as_dict(),
        "detections": detections,
        "waiting": waiting,
    }


def _latest_alerts(session: AsyncSession) -> TextClause:
    """The job's last 10 alerts, newest first, read from their partial index (whose own
    condition the query repeats word for word, so the planner may use it). SQLite is
    told to: for ``image_id IS NULL`` it would rather walk the (job, image) index, through
    every job-level line of the job."""
    sqlite = session.get_bind().dialect.name == "sqlite"
    hint = "INDEXED BY ix_job_events_job_alerts" if sqlite else ""
    return text(
        f"SELECT message FROM job_events {hint} WHERE job_id = :job_id AND {ALERTS_WHERE}"
        " ORDER BY id DESC LIMIT 10"
    )


def image_view(row: JobImage) -> dict[str, Any]:
    return {
        "image_id": row.image_id,
        "url": row.url,
        "state": row.state,
        "deliveries": row.deliveries,
        "leases": row.leases,
        "expiries": row.expiries,
        "holder": row.holder_name or row.holder_token,
        "holder_id": row.holder_id,
        "leased_at": _iso(row.leased_at),
        "lease_deadline": _iso(row.lease_deadline),
        "result_at": _iso(row.result_at),
        "failed_at": _iso(row.failed_at),
        "reason": row.reason,
    }


def event_view(ev: JobEvent) -> dict[str, Any]:
    return {"at": _iso(ev.at), "level": ev.level, "image_id": ev.image_id, "message": ev.message}


def detection_view(d: Detection) -> dict[str, Any]:
    return {
        "image_id": d.image_id,
        "index": d.idx,
        "bbox": {"x1": d.x1, "y1": d.y1, "x2": d.x2, "y2": d.y2},
        "algorithm": d.algorithm_key,
        "inference_time": d.inference_time,
        "timestamp": d.timestamp,
        "classifications": d.classifications,
    }
