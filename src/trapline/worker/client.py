"""HTTP client for the worker API (Antenna v2 compatible, plus trapline's extensions).

Paths use Antenna's exact forms (``/api/v2/jobs`` without a slash, ``.../tasks/``
and ``.../result/`` with one) because not every Antenna-compatible server
redirects. Every non-2xx answer and every transport failure becomes an
:class:`ApiError` carrying the status (None when no response arrived), the
server's ``detail`` and any ``Retry-After``, so callers decide what to retry.
"""

from __future__ import annotations

import email.utils
import json
import logging
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from trapline import __version__ as _version
from trapline.errors import WorkerError

logger = logging.getLogger(__name__)

JsonDict = dict[str, Any]

# Statuses after which the same request may succeed later (docs/protocol.md: a 5xx
# or dropped connection means "nothing is known": retry the same body).
RETRYABLE_STATUSES = frozenset({408, 425, 429})

# A server that keeps answering `next` must not keep the worker paging forever.
MAX_PAGES = 1000


class ApiError(WorkerError):
    """A worker API call failed: ``status`` is None when no HTTP response arrived."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        detail: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        """True for transport failures, 408/425/429 and 5xx."""
        return self.status is None or self.status in RETRYABLE_STATUSES or self.status >= 500

    @property
    def auth_failure(self) -> bool:
        return self.status in (401, 403)


@dataclass(frozen=True)
class Capabilities:
    """What the server supports beyond Antenna's API; ``None`` fields mean unknown."""

    trapline: str | None
    lease_extension: bool
    release: bool
    ack_wait_s: float | None
    max_deliver: int | None

    @classmethod
    def plain_antenna(cls) -> Capabilities:
        return cls(None, lease_extension=False, release=False, ack_wait_s=None, max_deliver=None)


@dataclass(frozen=True, order=True)
class JobRef:
    """A job that has work for one of our pipelines. Ordered by id (oldest first)."""

    id: int
    pipeline_slug: str


@dataclass(frozen=True)
class ReceiptAnswer:
    """Answer of extend/release: which receipts the server acted on and which it did not know."""

    done: list[str]
    unknown: list[str]


def normalize_base_url(url: str) -> str:
    """Server root URL. Accepts the AMI worker's form ``http://host/api/v2`` as well."""
    parts = urlsplit(url.strip())
    path = parts.path.rstrip("/")
    if path.endswith("/api/v2"):
        path = path[: -len("/api/v2")]
    return urlunsplit((parts.scheme, parts.netloc, path, "", "")).rstrip("/")


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def error_detail(response: httpx.Response) -> str:
    """The server's ``detail`` sentence, or a short excerpt of the body."""
    try:
        data = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    if isinstance(data, dict) and data.get("detail"):
        detail = data["detail"]
        return detail if isinstance(detail, str) else json.dumps(detail)[:500]
    text = response.text.strip()
    return text[:300] if text else response.reason_phrase


def api_error(response: httpx.Response, what: str) -> ApiError:
    detail = error_detail(response)
    return ApiError(
        f"{what}: HTTP {response.status_code}: {detail}",
        status=response.status_code,
        detail=detail,
        retry_after=parse_retry_after(response.headers.get("Retry-After")),
    )


def transport_error(exc: httpx.HTTPError, what: str) -> ApiError:
    text = str(exc) or type(exc).__name__
    return ApiError(f"{what}: {type(exc).__name__}: {text}", detail=text)


class WorkerClient:
    """Async client for one server. Use as ``async with WorkerClient(...) as client``."""

    def __init__(
        self,
        server_url: str,
        token: str,
        *,
        worker_name: str,
        worker_id: str,
        timeout_s: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = normalize_base_url(server_url)
        headers = {
            "User-Agent": f"trapline-worker/{_version}",
            "X-Worker-Name": worker_name,
            "X-Worker-Id": worker_id,
        }
        if token:
            headers["Authorization"] = f"Token {token}"
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s),
            transport=transport,
            # Redirects would be followed as GETs for POSTs; the paths are exact anyway.
            follow_redirects=False,
        )

    async def __aenter__(self) -> WorkerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(
        self,
        method: str,
        url: str,
        what: str,
        *,
        json_body: Any = None,
        content: bytes | None = None,
    ) -> httpx.Response:
        headers = {"Content-Type": "application/json"} if content is not None else None
        try:
            return await self._http.request(
                method, url, json=json_body, content=content, headers=headers
            )
        except httpx.HTTPError as exc:
            raise transport_error(exc, what) from exc

    async def _json(self, method: str, url: str, what: str, *, json_body: Any = None) -> Any:
        response = await self._send(method, url, what, json_body=json_body)
        if not response.is_success:
            raise api_error(response, what)
        try:
            return response.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(
                f"{what}: HTTP {response.status_code} with a body that is not JSON",
                status=response.status_code,
                detail="response is not JSON",
            ) from exc

    async def capabilities(self) -> Capabilities:
        """trapline's capabilities; a 404 means a plain Antenna server (no extensions)."""
        what = "capabilities"
        response = await self._send("GET", "/api/v2/capabilities/", what)
        if response.status_code == 404:
            return Capabilities.plain_antenna()
        if not response.is_success:
            raise api_error(response, what)
        try:
            data = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            data = None
        if not isinstance(data, dict):
            # Something answers 200 but is not trapline: treat it as plain Antenna.
            return Capabilities.plain_antenna()
        ack_wait = data.get("ack_wait_seconds")
        max_deliver = data.get("max_deliver")
        trapline = data.get("trapline")
        return Capabilities(
            trapline=str(trapline) if trapline is not None else None,
            lease_extension=data.get("lease_extension") is True,
            release=data.get("release") is True,
            ack_wait_s=float(ack_wait)
            if isinstance(ack_wait, int | float) and ack_wait > 0
            else None,
            max_deliver=max_deliver if isinstance(max_deliver, int) else None,
        )

    async def list_jobs(self, pipeline_slugs: list[str]) -> list[JobRef]:
        """Unfinished async jobs of these pipelines, lowest id first, all pages.

        Antenna's ``ids_only`` answer may omit ``pipeline_slug``; with one slug it
        is implied, with several the listing is repeated per slug to attribute them.
        """
        rows = await self._list_rows(pipeline_slugs)
        jobs: dict[int, JobRef] = {}
        unattributed: set[int] = set()
        for row in rows:
            job_id = _job_id(row)
            if job_id is None:
                logger.warning("job list entry without an integer id ignored: %.200s", row)
                continue
            slug = row.get("pipeline_slug")
            if not isinstance(slug, str):
                pipeline = row.get("pipeline")
                slug = pipeline.get("slug") if isinstance(pipeline, dict) else None
            if isinstance(slug, str) and slug in pipeline_slugs:
                jobs[job_id] = JobRef(job_id, slug)
            elif isinstance(slug, str):
                logger.debug("job %s has pipeline %r that this worker does not run", job_id, slug)
            elif len(pipeline_slugs) == 1:
                jobs[job_id] = JobRef(job_id, pipeline_slugs[0])
            else:
                unattributed.add(job_id)
        if unattributed:
            for slug in pipeline_slugs:
                for row in await self._list_rows([slug]):
                    job_id = _job_id(row)
                    if job_id in unattributed and job_id is not None:
                        jobs.setdefault(job_id, JobRef(job_id, slug))
        return sorted(jobs.values())

    async def _list_rows(self, pipeline_slugs: list[str]) -> list[JsonDict]:
        what = "list jobs"
        params = {
            "pipeline__slug__in": ",".join(pipeline_slugs),
            "ids_only": "1",
            "incomplete_only": "1",
            "dispatch_mode": "async_api",
        }
        url: str | None = "/api/v2/jobs?" + str(httpx.QueryParams(params))
        rows: list[JsonDict] = []
        seen: set[str] = set()
        for _ in range(MAX_PAGES):
            if url is None or url in seen:
                break
            seen.add(url)
            data = await self._json("GET", url, what)
            if isinstance(data, list):  # some servers answer a bare list
                rows.extend(r for r in data if isinstance(r, dict))
                break
            if not isinstance(data, dict):
                raise ApiError(f"{what}: unexpected answer {str(data)[:200]}", detail="bad shape")
            results = data.get("results")
            if isinstance(results, list):
                rows.extend(r for r in results if isinstance(r, dict))
            nxt = data.get("next")
            url = nxt if isinstance(nxt, str) and nxt else None
        return rows

    async def reserve(self, job_id: int, batch_size: int) -> list[Any]:
        """Reserve up to ``batch_size`` tasks; the raw task objects (validated by the caller)."""
        what = f"reserve tasks of job {job_id}"
        data = await self._json(
            "POST", f"/api/v2/jobs/{job_id}/tasks/", what, json_body={"batch_size": batch_size}
        )
        tasks = data.get("tasks") if isinstance(data, dict) else None
        if tasks is None:
            return []
        if not isinstance(tasks, list):
            raise ApiError(f"{what}: 'tasks' is not a list", detail="bad shape")
        return tasks

    async def post_results(self, job_id: int, body: bytes) -> httpx.Response:
        """POST a prepared result body; the caller interprets every status."""
        return await self._send(
            "POST", f"/api/v2/jobs/{job_id}/result/", f"post results of job {job_id}", content=body
        )

    async def extend(self, job_id: int, reply_subjects: list[str]) -> ReceiptAnswer:
        data = await self._json(
            "POST",
            f"/api/v2/jobs/{job_id}/tasks/extend/",
            f"extend leases of job {job_id}",
            json_body={"reply_subjects": reply_subjects},
        )
        return _receipt_answer(data, "extended")

    async def release(
        self, job_id: int, reply_subjects: list[str], delay_seconds: float = 0
    ) -> ReceiptAnswer:
        data = await self._json(
            "POST",
            f"/api/v2/jobs/{job_id}/tasks/release/",
            f"release tasks of job {job_id}",
            json_body={"reply_subjects": reply_subjects, "delay_seconds": delay_seconds},
        )
        return _receipt_answer(data, "released")

    async def register_pipelines(
        self, project_id: int, service_name: str, pipelines: list[JsonDict]
    ) -> Any:
        return await self._json(
            "POST",
            f"/api/v2/projects/{project_id}/pipelines/",
            f"register pipelines in project {project_id}",
            json_body={"processing_service_name": service_name, "pipelines": pipelines},
        )


def _job_id(row: JsonDict) -> int | None:
    value = row.get("id")
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _receipt_answer(data: Any, done_key: str) -> ReceiptAnswer:
    if not isinstance(data, dict):
        return ReceiptAnswer([], [])
    done = data.get(done_key)
    unknown = data.get("unknown")
    return ReceiptAnswer(
        [s for s in done if isinstance(s, str)] if isinstance(done, list) else [],
        [s for s in unknown if isinstance(s, str)] if isinstance(unknown, list) else [],
    )
