"""Images of a local-folder job, served by signed URL: no token and no database per download.

The signature vouches for the (job, image) pair, so nothing about the image needs
looking up; the job's folder is read from the ledger once per job and process (it is
fixed when the job is created, and jobs are never deleted). The file is opened by
its path under that folder and refused unless what was opened, links followed, is a
regular file inside the folder. A small file costs one thread hop (open, check, read);
a large one is streamed in chunks, never held whole.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import stat

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.datastructures import State
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from trapline.ledger.models import Job
from trapline.server.context import AppContext

log = logging.getLogger(__name__)

CHUNK_BYTES = 256 * 1024
MAX_CACHED_JOBS = 10_000
_MEDIA_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
    ".webp": "image/webp",
    ".bmp": "image/bmp",
}
# Linux names the file an open descriptor really is, so the check cannot be raced by
# a link swapped in between resolving a path and opening it.
_FD_DIR = "/proc/self/fd"
_HAS_FD_DIR = os.path.isdir(_FD_DIR)
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)  # a FIFO must not block


class JobFolders:
    """job id → its images_dir, links resolved (None for a job without one)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions
        self._roots: dict[int, str | None] = {}

    async def root(self, job_id: int) -> str | None:
        if job_id in self._roots:
            return self._roots[job_id]
        async with self._sessions() as session:
            found = (await session.execute(select(Job.images_dir).where(Job.id == job_id))).first()
        if found is None:
            return None  # not remembered: only signed ids get here, and they exist
        images_dir: str | None = found[0]
        root = await asyncio.to_thread(os.path.realpath, images_dir) if images_dir else None
        if len(self._roots) >= MAX_CACHED_JOBS:
            del self._roots[next(iter(self._roots))]
        self._roots[job_id] = root
        return root


def job_folders(state: State) -> JobFolders:
    """The app's folder cache, made on first use beside its context."""
    folders: JobFolders | None = getattr(state, "job_folders", None)
    if folders is None:
        ctx: AppContext = state.ctx
        folders = state.job_folders = JobFolders(ctx.reads)
    return folders


class FolderFile(Response):
    """An opened file: Content-Length from the open descriptor, the body in chunks."""

    def __init__(self, file: io.FileIO, size: int, head: bytes, media_type: str) -> None:
        self.status_code = 200
        self.background = None
        self.file = file
        self.size = size
        self.head = head
        self.raw_headers = [
            (b"content-type", media_type.encode()),
            (b"content-length", str(size).encode()),
            (b"x-content-type-options", b"nosniff"),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            if scope["method"] == "HEAD":
                await send({"type": "http.response.body", "body": b""})
            elif len(self.head) >= self.size:
                await send({"type": "http.response.body", "body": self.head})
            else:
                await self._stream(receive, send)
        finally:
            self.file.close()

    async def _stream(self, receive: Receive, send: Send) -> None:
        gone = asyncio.Event()

        async def watch() -> None:
            # Servers older than ASGI 2.4 drop sends to a closed connection silently.
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.create_task(watch(), name="file-disconnect-watch")
        try:
            sent = len(self.head)
            await send({"type": "http.response.body", "body": self.head, "more_body": True})
            while sent < self.size and not gone.is_set():
                chunk = await asyncio.to_thread(self.file.read, min(CHUNK_BYTES, self.size - sent))
                if not chunk:
                    # Ending short would promise Content-Length and deliver less.
                    raise OSError(f"{self.file.name} shrank while being sent")
                sent += len(chunk)
                await send(
                    {"type": "http.response.body", "body": chunk, "more_body": sent < self.size}
                )
        finally:
            watcher.cancel()


def open_inside(root: str, image_id: str) -> tuple[io.FileIO, int, bytes] | None:
    """The regular file ``image_id`` names under ``root`` (links followed, but never out of
    it), opened, with its size and first chunk; None if there is no such file."""
    path = os.path.join(root, image_id)
    try:
        file = io.FileIO(os.open(path, _OPEN_FLAGS), "rb")
    except (OSError, ValueError):  # missing, unreadable, or a NUL in the name
        return None
    try:
        real = os.readlink(f"{_FD_DIR}/{file.fileno()}") if _HAS_FD_DIR else os.path.realpath(path)
        info = os.fstat(file.fileno())
        if not real.startswith(root.rstrip(os.sep) + os.sep) or not stat.S_ISREG(info.st_mode):
            file.close()
            return None
        return file, info.st_size, file.read(min(info.st_size, CHUNK_BYTES)) or b""
    except OSError:
        file.close()
        return None


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


def _query(raw: bytes) -> dict[bytes, bytes]:
    """``expires`` and ``sig`` are digits and hex, never percent-encoded by us; anything
    else simply fails the signature check."""
    return dict(part.partition(b"=")[::2] for part in raw.split(b"&"))


class FileServer:
    """GET /api/v2/files/{job_id}/{image_id}/?expires=…&sig=…, the URL a reserve hands
    out. A plain ASGI app: a folder job downloads every image through it, and it needs
    none of a request object, dependencies or validation."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.respond(scope)
        await response(scope, receive, send)

    async def respond(self, scope: Scope) -> Response:
        state: State = scope["app"].state
        ctx: AppContext = state.ctx
        job_id: int = scope["path_params"]["job_id"]
        image_id: str = scope["path_params"]["image_id"]
        query = _query(scope["query_string"])
        try:
            expires = int(query.get(b"expires", b""))
        except ValueError:
            expires = 0  # as good as expired
        sig = query.get(b"sig", b"").decode("latin-1")
        if not ctx.signer.verify(job_id, image_id, expires, sig):
            return _error(403, "invalid or expired signature")
        root = await job_folders(state).root(job_id)
        if root is None:
            return _error(404, "image not found")
        loop = asyncio.get_running_loop()
        opened = await loop.run_in_executor(None, open_inside, root, image_id)
        if opened is None:
            log.warning(
                "job %s image %s: no file of that name inside the job's folder %s (404)",
                job_id,
                image_id,
                root,
            )
            return _error(404, "image not found")
        suffix = os.path.splitext(image_id)[1].lower()
        return FolderFile(*opened, _MEDIA_TYPES.get(suffix, "application/octet-stream"))
