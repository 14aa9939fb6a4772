"""SQLAlchemy models of the ledger: the single source of truth for jobs and their images."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class JobStatus(enum.StrEnum):
    CREATED = "CREATED"
    PENDING = "PENDING"
    STARTED = "STARTED"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    CANCELING = "CANCELING"
    REVOKED = "REVOKED"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCESS, JobStatus.FAILURE, JobStatus.REVOKED)


class ImageState(enum.StrEnum):
    QUEUED = "queued"
    RESERVED = "reserved"
    DONE = "done"
    FAILED = "failed"

    # Named once: every transition guards on these sets (set after the class below).
    OPEN: ClassVar[tuple[ImageState, ...]]  # no outcome yet: a worker may still deliver one
    SETTLED: ClassVar[tuple[ImageState, ...]]  # an outcome is known


ImageState.OPEN = (ImageState.QUEUED, ImageState.RESERVED)
ImageState.SETTLED = (ImageState.DONE, ImageState.FAILED)


# Job log lines that are alerts: job-level (no image) warnings and worse.
ALERTS_WHERE = "image_id IS NULL AND level IN ('WARNING', 'ERROR', 'CRITICAL')"


class Role(enum.StrEnum):
    ADMIN = "admin"
    WORKER = "worker"


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON,
        list[Any]: JSON,
    }


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Token(Base):
    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    project_id: Mapped[int | None] = mapped_column(ForeignKey("projects.id"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ServerSecret(Base):
    """Secrets shared by every server replica (e.g. the key that signs image URLs)."""

    __tablename__ = "server_secrets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(128))


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(300))
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    pipeline_slug: Mapped[str] = mapped_column(String(200), index=True)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.CREATED, index=True)
    failure_threshold: Mapped[float] = mapped_column(Float, default=0.5)
    total: Mapped[int] = mapped_column(Integer, default=0)
    images_dir: Mapped[str | None] = mapped_column(Text, nullable=True)
    deadline_at: Mapped[datetime | None] = mapped_column(nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    queued_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # Bumped whenever the job's queue resources are (re)created, so receipts of an
    # earlier incarnation of the stream never match images of a later one.
    queue_generation: Mapped[int] = mapped_column(Integer, default=0)


class JobImage(Base):
    """One row per (job, image): the image's state and everything needed to explain it."""

    __tablename__ = "job_images"
    __table_args__ = (
        UniqueConstraint("job_id", "image_id", name="uq_job_images_job_image"),
        Index("ix_job_images_job_state", "job_id", "state"),
        Index("ix_job_images_job_seq", "job_id", "msg_seq"),
        Index("ix_job_images_lease", "state", "lease_deadline"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    image_id: Mapped[str] = mapped_column(String(200))
    url: Mapped[str | None] = mapped_column(Text, nullable=True)
    path: Mapped[str | None] = mapped_column(Text, nullable=True)
    state: Mapped[str] = mapped_column(String(16), default=ImageState.QUEUED)
    msg_seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # JetStream's delivery number of the current lease (receipts are checked against it).
    deliveries: Mapped[int] = mapped_column(Integer, default=0)
    # Leases handed to workers in this queue generation: the retry budget counts these.
    leases: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    receipt: Mapped[str | None] = mapped_column(Text, nullable=True)
    holder_name: Mapped[str | None] = mapped_column(String(300), nullable=True)
    holder_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    holder_token: Mapped[str | None] = mapped_column(String(200), nullable=True)
    leased_at: Mapped[datetime | None] = mapped_column(nullable=True)
    lease_deadline: Mapped[datetime | None] = mapped_column(nullable=True)
    expiries: Mapped[int] = mapped_column(Integer, default=0)
    result_at: Mapped[datetime | None] = mapped_column(nullable=True)
    failed_at: Mapped[datetime | None] = mapped_column(nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobCount(Base):
    """How many images of a job are in each state (and how many detections it has),
    kept by database triggers on every change, so reading a job's counts costs the
    same at ten images as at ten million (see migration 0003).

    On SQLite one row per (job, name) is updated in place; on PostgreSQL each statement
    adds a row of deltas, so concurrent transactions never queue on a counter row, and
    the reconciler folds them (:func:`trapline.ledger.transitions.compact_counts`). A
    job's count of a name is always the sum of its rows.
    """

    __tablename__ = "job_counts"
    __table_args__ = (Index("ix_job_counts_job_name", "job_id", "name"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(16))  # an ImageState, or "detections"
    n: Mapped[int] = mapped_column(BigInteger)
    # When an image of the job last changed state (for "waiting for a worker since").
    changed_at: Mapped[datetime | None] = mapped_column(nullable=True)


class Detection(Base):
    __tablename__ = "detections"
    __table_args__ = (
        UniqueConstraint("job_id", "image_id", "idx", name="uq_detections_job_image_idx"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    image_id: Mapped[str] = mapped_column(String(200))
    idx: Mapped[int] = mapped_column(Integer)
    x1: Mapped[float] = mapped_column(Float)
    y1: Mapped[float] = mapped_column(Float)
    x2: Mapped[float] = mapped_column(Float)
    y2: Mapped[float] = mapped_column(Float)
    algorithm_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    inference_time: Mapped[float | None] = mapped_column(Float, nullable=True)
    timestamp: Mapped[str | None] = mapped_column(String(64), nullable=True)
    classifications: Mapped[list[Any]] = mapped_column(JSON, default=list)


class ImageResultRow(Base):
    """The result envelope of a done image (pipeline, algorithms, timing), one per image."""

    __tablename__ = "image_results"
    __table_args__ = (UniqueConstraint("job_id", "image_id", name="uq_image_results_job_image"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    image_id: Mapped[str] = mapped_column(String(200))
    pipeline: Mapped[str | None] = mapped_column(String(200), nullable=True)
    algorithms: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    total_time: Mapped[float | None] = mapped_column(Float, nullable=True)
    detections_count: Mapped[int] = mapped_column(Integer, default=0)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobEvent(Base):
    """A job log line; ``image_id`` set when the line concerns one image (its history)."""

    __tablename__ = "job_events"
    __table_args__ = (
        Index("ix_job_events_job_image", "job_id", "image_id"),
        # The job's latest warnings and errors, newest first, without reading its history.
        Index(
            "ix_job_events_job_alerts",
            "job_id",
            "id",
            sqlite_where=text(ALERTS_WHERE),
            postgresql_where=text(ALERTS_WHERE),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    image_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    level: Mapped[str] = mapped_column(String(10), default="INFO")
    message: Mapped[str] = mapped_column(Text)


class PipelineRow(Base):
    __tablename__ = "pipelines"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    slug: Mapped[str] = mapped_column(String(200), unique=True)
    name: Mapped[str] = mapped_column(String(300))
    version: Mapped[int] = mapped_column(Integer, default=1)
    description: Mapped[str] = mapped_column(Text, default="")
    algorithms: Mapped[list[Any]] = mapped_column(JSON, default=list)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class ProcessingService(Base):
    __tablename__ = "processing_services"
    __table_args__ = (UniqueConstraint("project_id", "name", name="uq_services_project_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    name: Mapped[str] = mapped_column(String(300))
    pipelines: Mapped[list[Any]] = mapped_column(JSON, default=list)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
