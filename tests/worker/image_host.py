"""An image host for download tests: JPEG files, and the failures a worker meets on the way.

The file name says what the host does with it: ``missing*`` 404, ``gone*`` 410,
``junk*`` 200 with bytes that are no image, ``flaky*`` 503 on the first request
and the image after; anything else is a small JPEG.
"""

from __future__ import annotations

import io
import threading

from PIL import Image

from tests.worker.local_server import LocalServer, Reply, Request

JPEG_SIZE = (32, 24)


def jpeg_bytes(width: int = JPEG_SIZE[0], height: int = JPEG_SIZE[1]) -> bytes:
    image = Image.new("RGB", (width, height), (200, 180, 40))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


class ImageHost:
    """Serves ``/img/<name>.jpg``; records the Authorization header of every request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jpeg = jpeg_bytes()
        self._flaky_served: set[str] = set()
        self.auth_headers: list[str | None] = []
        self.server = LocalServer(self._handle)

    def start(self) -> ImageHost:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def url(self, name: str) -> str:
        return f"{self.server.url}/img/{name}.jpg"

    def _handle(self, req: Request) -> Reply:
        with self._lock:
            self.auth_headers.append(req.headers.get("authorization"))
        name = req.path.rsplit("/", 1)[-1].removesuffix(".jpg")
        if name.startswith("missing"):
            return Reply(404, b"no such image")
        if name.startswith("gone"):
            return Reply(410, b"gone")
        if name.startswith("junk"):
            return Reply(200, b"this is not an image")
        if name.startswith("flaky"):
            with self._lock:
                first = name not in self._flaky_served
                self._flaky_served.add(name)
            if first:
                return Reply(503, b"try later")
        return Reply(200, self._jpeg, {"Content-Type": "image/jpeg"})
