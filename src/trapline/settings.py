"""Settings, one class per process kind, read once from flags and ``TRAPLINE_*`` variables.

This is the only module that reads the environment.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class _Base(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRAPLINE_", extra="ignore", populate_by_name=True)

    data_dir: Path = Path(".trapline")
    log_level: str = "INFO"


class ServerSettings(_Base):
    """Settings of ``trapline server`` (and of commands that open the database directly)."""

    host: str = "127.0.0.1"
    port: int = 8000
    database_url: str | None = Field(
        default=None, description="SQLAlchemy async URL; default: SQLite file in the data dir"
    )
    nats_url: str | None = Field(
        default=None, description="NATS URL; default: start the packaged nats-server"
    )
    public_url: str | None = Field(
        default=None,
        description="Base URL workers use to fetch served images; default: request URL",
    )
    ack_wait_s: float = 30.0
    max_deliver: int = 3
    max_ack_pending: int = 10_000
    reserve_cap: int = 256
    reserve_wait_s: float = 0.5
    max_body_bytes: int = 64 * 1024 * 1024
    reconcile_interval_s: float = 1.0
    waiting_after_s: float = Field(
        default=10.0,
        ge=0,
        description="A running job with queued images, none reserved and nothing changed for "
        "this long says 'waiting for a worker' in its view; waiting never fails a job",
    )
    pending_requeue_after_s: float = Field(
        default=60.0,
        ge=0,
        description="A job left PENDING this long (its queue build was interrupted) is "
        "re-queued from the ledger by the reconciler",
    )
    queue_check_interval_s: float = Field(
        default=10.0,
        ge=0,
        description="How often the reconciler checks that every running job still has its "
        "queue (re-queuing from the ledger if not) and removes finished jobs' queues",
    )
    signed_url_ttl_s: int = 24 * 3600
    nats_connect_timeout_s: float = 5.0

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'trapline.db').resolve()}"


class WorkerSettings(_Base):
    """Settings of ``trapline worker``; the AMI worker's variable names are accepted as aliases."""

    server_url: str = Field(
        default="http://127.0.0.1:8000",
        validation_alias=AliasChoices(
            "TRAPLINE_SERVER_URL", "AMI_ANTENNA_API_BASE_URL", "server_url"
        ),
    )
    token: str = Field(
        default="",
        validation_alias=AliasChoices("TRAPLINE_TOKEN", "AMI_ANTENNA_API_AUTH_TOKEN", "token"),
    )
    batch_size: int = Field(
        default=16,
        ge=1,
        validation_alias=AliasChoices(
            "TRAPLINE_BATCH_SIZE", "AMI_ANTENNA_API_BATCH_SIZE", "batch_size"
        ),
    )
    service_name: str = Field(
        default="trapline-worker",
        validation_alias=AliasChoices(
            "TRAPLINE_SERVICE_NAME", "AMI_ANTENNA_SERVICE_NAME", "service_name"
        ),
    )
    project_id: int = 1
    state_dir: Path | None = None
    poll_interval_s: float = 2.0
    prefetch_batches: int = 2
    download_concurrency: int = 8
    download_timeout_s: float = 30.0
    download_retries: int = 3
    http_timeout_s: float = 60.0
    delivery_deadline_s: float = 600.0
    delivery_backoff_cap_s: float = 4.0
    grace_s: float = 30.0
    pipeline_files: list[Path] = Field(
        default_factory=list, description="TOML files describing ONNX pipelines to serve too"
    )
    processes: int | None = Field(
        default=None, ge=1, description="Worker processes; default one per visible GPU, else 1"
    )
    cuda_visible_devices: str | None = Field(
        default=None,
        validation_alias=AliasChoices("CUDA_VISIBLE_DEVICES", "cuda_visible_devices"),
    )


class ClientSettings(_Base):
    """Settings of the CLI commands that talk to a server over HTTP."""

    server_url: str = Field(
        default="http://127.0.0.1:8000",
        validation_alias=AliasChoices("TRAPLINE_SERVER_URL", "TRAPLINE_SERVER", "server_url"),
    )
    token: str = Field(default="", validation_alias=AliasChoices("TRAPLINE_TOKEN", "token"))
