"""Request bodies of the HTTP API (responses are plain dicts in the shapes of docs/protocol.md)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from trapline.server.lifecycle import PAGE as MAX_PAGE_IMAGES


class _In(BaseModel):
    model_config = ConfigDict(extra="allow")


class ReserveIn(_In):
    batch_size: int = Field(default=16, ge=1)


class ReceiptsIn(_In):
    reply_subjects: list[Any] = Field(max_length=10_000)


class ReleaseIn(ReceiptsIn):
    delay_seconds: float = Field(default=0.0, ge=0, le=3600)


class ResultsIn(_In):
    results: list[Any] = Field(max_length=10_000)


class PipelineIn(_In):
    name: str
    slug: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.\-]+$")
    version: int = 1
    description: str = ""
    algorithms: list[Any] = Field(default_factory=list)
    stages: list[Any] = Field(default_factory=list)


class RegisterIn(_In):
    processing_service_name: str = Field(min_length=1, max_length=300)
    pipelines: list[PipelineIn]


class JobCreateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="", max_length=300)
    project_id: int = 1
    pipeline: str = Field(min_length=1, max_length=200)
    images: list[dict[str, Any]] = Field(default_factory=list, max_length=1_000_000)
    images_dir: str | None = None
    failure_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    deadline_seconds: float | None = Field(default=None, gt=0)
    # False: the job waits in CREATED, its images appended a page at a time
    # (JobImagesIn), until POST /api/v2/jobs/{id}/start/.
    start_now: bool = True


class JobImagesIn(BaseModel):
    """A page of images appended to a job that has not been started."""

    model_config = ConfigDict(extra="forbid")

    images: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_PAGE_IMAGES)
