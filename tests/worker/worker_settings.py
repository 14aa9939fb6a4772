"""Worker settings for fast tests: small batches, quick polls, short backoff."""

from __future__ import annotations

from pathlib import Path

from trapline.settings import WorkerSettings


def make_settings(url: str, token: str, state_dir: Path, **overrides: object) -> WorkerSettings:
    values: dict[str, object] = {
        "server_url": url,
        "token": token,
        "batch_size": 4,
        "state_dir": state_dir,
        "poll_interval_s": 0.05,
        "prefetch_batches": 2,
        "download_timeout_s": 2.0,
        "download_retries": 2,
        "http_timeout_s": 5.0,
        "delivery_deadline_s": 10.0,
        "delivery_backoff_cap_s": 0.05,
        "grace_s": 5.0,
        "project_id": 1,
    }
    values.update(overrides)
    return WorkerSettings(**values)  # type: ignore[arg-type]
