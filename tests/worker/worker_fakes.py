"""Real local HTTP servers for worker tests (stdlib ``http.server`` in a thread).

``LocalServer`` answers every request through a Python function, so a test can
script statuses, delays and dropped connections. ``FakeAntenna`` builds the
worker API of PROTOCOL.md on it (jobs, leases with receipts, results with
per-item status, extend/release, capabilities, pagination, images) with
switches for the faults the worker must survive. It is a test double of the
server at the HTTP boundary; the real server's tests live elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from PIL import Image

from trapline.errors import PipelineError
from trapline.pipelines.base import (
    Algorithm,
    Classification,
    Detection,
    ImageInput,
    ImageResult,
    Pipeline,
)
from trapline.pipelines.null import NullPipeline
from trapline.settings import WorkerSettings


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass
class Reply:
    status: int = 200
    body: Any = b""
    headers: dict[str, str] = field(default_factory=dict)
    # Wait for this event (max 10 s) before answering: a hanging server.
    wait: threading.Event | None = None
    # Close the connection without answering: a reset after the request was sent.
    drop: bool = False


Handler = Callable[[Request], Reply]


class LocalServer:
    """A threaded HTTP/1.1 server on 127.0.0.1 with a Python function as the handler."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        outer = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in separate writes: without this, Nagle plus
            # delayed ACKs add ~40 ms to every keep-alive request.
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
                request = Request(
                    self.command,
                    parts.path,
                    query,
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                    time.monotonic(),
                )
                with outer._lock:
                    outer.requests.append(request)
                reply = outer.handler(request)
                if reply.wait is not None:
                    reply.wait.wait(10)
                if reply.drop:
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                payload = reply.body
                content_type = "application/octet-stream"
                if not isinstance(payload, bytes):
                    payload = json.dumps(payload).encode()
                    content_type = "application/json"
                try:
                    self.send_response(reply.status)
                    self.send_header(
                        "Content-Type", reply.headers.get("Content-Type", content_type)
                    )
                    for key, value in reply.headers.items():
                        if key != "Content-Type":
                            self.send_header(key, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> LocalServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def requests_to(self, method: str, path_prefix: str) -> list[Request]:
        with self._lock:
            return [
                r for r in self.requests if r.method == method and r.path.startswith(path_prefix)
            ]


def jpeg_bytes(width: int = 32, height: int = 24) -> bytes:
    image = Image.new("RGB", (width, height), (200, 180, 40))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


@dataclass
class FakeJob:
    id: int
    pipeline_slug: str
    images: dict[str, str]
    ready: deque[str] = field(default_factory=deque)
    leases: dict[str, str] = field(default_factory=dict)
    issued: dict[str, str] = field(default_factory=dict)
    outcomes: dict[str, dict[str, Any]] = field(default_factory=dict)
    deliveries: dict[str, int] = field(default_factory=dict)
    raw_tasks: list[Any] = field(default_factory=list)
    cancelled: bool = False

    @property
    def complete(self) -> bool:
        return len(self.outcomes) == len(self.images)


class FakeAntenna:
    """The worker API of PROTOCOL.md over a :class:`LocalServer`, with fault switches."""

    def __init__(
        self,
        *,
        trapline: bool = True,
        ack_wait_seconds: float = 30,
        page_size: int = 2,
    ) -> None:
        self.trapline = trapline
        self.ack_wait_seconds = ack_wait_seconds
        self.page_size = page_size
        self.lock = threading.Lock()
        self.jobs: dict[int, FakeJob] = {}
        self.calls: list[tuple[str, int]] = []
        self.registrations: list[Any] = []
        # Replies used, in order, for the next result POSTs instead of storing them.
        self.result_script: deque[Reply] = deque()
        # Extra say over result POSTs: return a Reply to answer instead of storing.
        self.result_hook: Callable[[Request, FakeJob], Reply | None] | None = None
        self.image_auth_headers: list[str | None] = []
        self.flaky_served: set[str] = set()
        self._seq = 0
        self._jpeg = jpeg_bytes()
        self.server = LocalServer(self.handle)

    # -- set-up --------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return self.server.url

    def image_url(self, job_id: int, image_id: str) -> str:
        return f"{self.url}/img/{job_id}/{image_id}.jpg"

    def add_job(self, job_id: int, slug: str, image_ids: list[str]) -> FakeJob:
        job = FakeJob(job_id, slug, {i: self.image_url(job_id, i) for i in image_ids})
        job.ready.extend(image_ids)
        with self.lock:
            self.jobs[job_id] = job
        return job

    def inject_task(self, job_id: int, raw: Any, image_id: str | None = None) -> None:
        """Hand out ``raw`` as-is on the next reserve; its receipt counts as issued for ``image_id``."""
        with self.lock:
            job = self.jobs[job_id]
            job.raw_tasks.append(raw)
            subject = raw.get("reply_subject") if isinstance(raw, dict) else None
            if image_id is not None and isinstance(subject, str):
                if image_id in job.ready:
                    job.ready.remove(image_id)
                job.issued[subject] = image_id
                job.leases[subject] = image_id

    # -- routing -------------------------------------------------------------------------------

    def handle(self, req: Request) -> Reply:
        parts = [p for p in req.path.split("/") if p]
        if parts[:1] == ["img"]:
            return self._image(req, parts)
        if req.headers.get("authorization") != "Token secret":
            return Reply(401, {"detail": "missing or unknown token"})
        if parts == ["api", "v2", "capabilities"]:
            if not self.trapline:
                return Reply(404, {"detail": "Not found."})
            return Reply(
                200,
                {
                    "trapline": "test",
                    "lease_extension": True,
                    "release": True,
                    "ack_wait_seconds": self.ack_wait_seconds,
                    "max_deliver": 3,
                },
            )
        if parts == ["api", "v2", "jobs"] and req.method == "GET":
            return self._list(req)
        if parts[:3] == ["api", "v2", "projects"] and parts[-1] == "pipelines":
            with self.lock:
                self.registrations.append(req.json())
            return Reply(
                200, {"pipelines_created": [], "pipelines_updated": [], "processing_service_id": 1}
            )
        if parts[:3] == ["api", "v2", "jobs"] and len(parts) >= 5:
            job_id = int(parts[3])
            with self.lock:
                job = self.jobs.get(job_id)
            if job is None:
                return Reply(404, {"detail": "job not found"})
            action = "/".join(parts[4:])
            if action == "tasks":
                return self._reserve(req, job)
            if action == "result":
                return self._result(req, job)
            if action == "tasks/extend" and self.trapline:
                return self._receipts(req, job, "extend")
            if action == "tasks/release" and self.trapline:
                return self._receipts(req, job, "release")
        return Reply(404, {"detail": "Not found."})

    def _image(self, req: Request, parts: list[str]) -> Reply:
        with self.lock:
            self.image_auth_headers.append(req.headers.get("authorization"))
        name = parts[-1].removesuffix(".jpg")
        if name.startswith("missing"):
            return Reply(404, b"no such image")
        if name.startswith("gone"):
            return Reply(410, b"gone")
        if name.startswith("junk"):
            return Reply(200, b"this is not an image")
        if name.startswith("flaky"):
            with self.lock:
                first = name not in self.flaky_served
                self.flaky_served.add(name)
            if first:
                return Reply(503, b"try later")
        return Reply(200, self._jpeg, {"Content-Type": "image/jpeg"})

    def _list(self, req: Request) -> Reply:
        slugs = req.query.get("pipeline__slug__in", "").split(",")
        offset = int(req.query.get("offset", "0"))
        with self.lock:
            rows = [
                {"id": j.id, "pipeline_slug": j.pipeline_slug}
                for j in sorted(self.jobs.values(), key=lambda j: j.id)
                if j.pipeline_slug in slugs and not j.cancelled and not j.complete
            ]
            self.calls.append(("list", 0))
        page = rows[offset : offset + self.page_size]
        nxt = None
        if offset + self.page_size < len(rows):
            query = "&".join(f"{k}={v}" for k, v in req.query.items() if k != "offset")
            nxt = f"{self.url}/api/v2/jobs?{query}&offset={offset + self.page_size}"
        return Reply(200, {"count": len(rows), "next": nxt, "previous": None, "results": page})

    def _reserve(self, req: Request, job: FakeJob) -> Reply:
        size = int((req.json() or {}).get("batch_size", 1))
        tasks: list[Any] = []
        with self.lock:
            self.calls.append(("reserve", job.id))
            if job.cancelled:
                return Reply(200, {"tasks": []})
            while job.raw_tasks and len(tasks) < size:
                tasks.append(job.raw_tasks.pop(0))
            while job.ready and len(tasks) < size:
                image_id = job.ready.popleft()
                self._seq += 1
                subject = f"$JS.ACK.job{job.id}.{self._seq}"
                job.leases[subject] = image_id
                job.issued[subject] = image_id
                job.deliveries[image_id] = job.deliveries.get(image_id, 0) + 1
                tasks.append(
                    {
                        "id": f"{job.id}:{image_id}",
                        "image_id": image_id,
                        "image_url": job.images[image_id],
                        "reply_subject": subject,
                    }
                )
        return Reply(200, {"tasks": tasks})

    def _result(self, req: Request, job: FakeJob) -> Reply:
        with self.lock:
            self.calls.append(("result", job.id))
            if self.result_script:
                return self.result_script.popleft()
        if self.result_hook is not None:
            override = self.result_hook(req, job)
            if override is not None:
                return override
        items = req.json()["results"]
        answers = []
        with self.lock:
            for item in items:
                subject = item["reply_subject"]
                image_id = job.issued.get(subject)
                if image_id is None:
                    answers.append(
                        {
                            "reply_subject": subject,
                            "status": "rejected",
                            "reason": "unknown reply_subject",
                        }
                    )
                    continue
                job.leases.pop(subject, None)
                if image_id in job.outcomes:
                    answers.append(
                        {"reply_subject": subject, "status": "duplicate", "task_id": image_id}
                    )
                    continue
                job.outcomes[image_id] = item["result"]
                answers.append(
                    {"reply_subject": subject, "status": "accepted", "task_id": image_id}
                )
        return Reply(
            200,
            {
                "status": "accepted",
                "job_id": job.id,
                "results_queued": len(items),
                "tasks": answers,
            },
        )

    def _receipts(self, req: Request, job: FakeJob, action: str) -> Reply:
        subjects = req.json()["reply_subjects"]
        done, unknown = [], []
        with self.lock:
            self.calls.append((action, job.id))
            for subject in subjects:
                image_id = job.leases.get(subject)
                if image_id is None:
                    unknown.append(subject)
                    continue
                done.append(subject)
                if action == "release":
                    del job.leases[subject]
                    job.ready.appendleft(image_id)
        key = "extended" if action == "extend" else "released"
        return Reply(200, {key: done, "unknown": unknown})

    # -- queries for assertions ----------------------------------------------------------------

    def count(self, action: str, job_id: int | None = None) -> int:
        with self.lock:
            return sum(1 for a, j in self.calls if a == action and (job_id is None or j == job_id))

    def outcomes(self, job_id: int) -> dict[str, dict[str, Any]]:
        with self.lock:
            return dict(self.jobs[job_id].outcomes)

    def at_rest(self, job_id: int) -> tuple[int, int, int]:
        """(ready, leased, with outcome) of a job."""
        with self.lock:
            job = self.jobs[job_id]
            return len(job.ready), len(job.leases), len(job.outcomes)


async def until(predicate: Callable[[], bool], limit_s: float = 10.0) -> None:
    """Poll a condition on a server thread's state from a test coroutine."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``predicate`` until true (for synchronous subprocess tests)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


# -- settings and test pipelines ------------------------------------------------------------


def make_settings(url: str, state_dir: Path, **overrides: object) -> WorkerSettings:
    values: dict[str, object] = {
        "server_url": url,
        "token": "secret",
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


class PixelPipeline(Pipeline):
    """Needs pixels; one detection per image covering the image, with one classification."""

    slug = "pixels"
    name = "Pixel test pipeline"

    def algorithms(self) -> list[Algorithm]:
        return [
            Algorithm(key="box", name="Whole-image box"),
            Algorithm(key="size", name="Size", task_type="classification"),
        ]

    def process(self, images: Sequence[ImageInput]) -> list[ImageResult]:
        results = []
        for image in images:
            assert image.pixels is not None and image.pixels.ndim == 3
            h, w, _ = image.pixels.shape
            results.append(
                ImageResult(
                    image_id=image.id,
                    detections=[
                        Detection(
                            bbox=(0, 0, w, h),
                            score=0.9,
                            algorithm_key="box",
                            classifications=[
                                Classification("big", ["big", "small"], [0.8, 0.2], "size")
                            ],
                        )
                    ],
                    seconds=0.01,
                )
            )
        return results


class GatedPipeline(NullPipeline):
    """Like ``null`` but each batch waits until ``gate`` is set; ``started`` counts batches."""

    slug = "gated"
    gate = threading.Event()
    started = threading.Event()
    batches = 0

    def process(self, images: Sequence[ImageInput]) -> list[ImageResult]:
        type(self).batches += 1
        type(self).started.set()
        type(self).gate.wait(20)
        return super().process(images)


class SlowPipeline(NullPipeline):
    """Like ``null`` but each batch takes ``seconds``."""

    slug = "slow"
    seconds = 0.5

    def process(self, images: Sequence[ImageInput]) -> list[ImageResult]:
        time.sleep(self.seconds)
        return super().process(images)


class RaisingPipeline(NullPipeline):
    slug = "raising"

    def process(self, images: Sequence[ImageInput]) -> list[ImageResult]:
        raise RuntimeError("CUDA error: device-side assert triggered")


class GarbagePipeline(NullPipeline):
    """Breaks the interface: odd batches return None, even ones malformed detections."""

    slug = "garbage"
    calls = 0

    def process(self, images: Sequence[ImageInput]) -> list[ImageResult]:
        type(self).calls += 1
        if type(self).calls % 2:
            return None  # type: ignore[return-value]
        bad = Detection(bbox=(0, 0, 1, 1), score=1.0, algorithm_key="null")
        bad.classifications = [None]  # type: ignore[list-item]
        return [ImageResult(image_id=i.id, detections=[bad]) for i in images]


class BrokenLoadPipeline(NullPipeline):
    slug = "broken"

    def load(self) -> None:
        raise PipelineError("model weights not found at /nowhere/model.onnx")


TEST_PIPELINES: dict[str, type[Pipeline]] = {
    cls.slug: cls
    for cls in (
        NullPipeline,
        PixelPipeline,
        GatedPipeline,
        SlowPipeline,
        RaisingPipeline,
        GarbagePipeline,
        BrokenLoadPipeline,
    )
}


def pipeline_factory(slug: str) -> Pipeline:
    return TEST_PIPELINES[slug]()
