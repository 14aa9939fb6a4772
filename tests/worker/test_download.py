"""Image downloads against a real local HTTP server: statuses, retries, timeouts, decoding."""

from __future__ import annotations

import io
import socket
import threading
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from tests.worker.image_host import jpeg_bytes
from tests.worker.local_server import LocalServer, Reply, Request
from trapline.worker.download import Downloader, DownloadFailed, decode_rgb


class Images:
    """Serves /ok, /404, /410, /403, /503 (always), /flaky (503 once), /slow (hangs)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.flaky_seen = False

    def __call__(self, req: Request) -> Reply:
        name = req.path.strip("/")
        if name == "ok":
            return Reply(200, jpeg_bytes(40, 30))
        if name in ("404", "410", "403", "503"):
            return Reply(int(name), b"")
        if name == "flaky":
            if not self.flaky_seen:
                self.flaky_seen = True
                return Reply(503, b"", {"Retry-After": "0"})
            return Reply(200, jpeg_bytes())
        if name == "slow":
            return Reply(200, jpeg_bytes(), wait=self.release)
        return Reply(404)


@pytest.fixture
def images(local_server: list[LocalServer]) -> Iterator[tuple[LocalServer, Images]]:
    handler = Images()
    server = LocalServer(handler).start()
    local_server.append(server)
    yield server, handler
    handler.release.set()


async def fetch_reason(downloader: Downloader, url: str) -> str:
    with pytest.raises(DownloadFailed) as info:
        await downloader.fetch(url)
    return info.value.reason


async def test_statuses_map_to_reasons(images: tuple[LocalServer, Images]) -> None:
    server, _ = images
    downloader = Downloader(concurrency=4, timeout_s=2, retries=2)
    try:
        data = await downloader.fetch(f"{server.url}/ok")
        assert decode_rgb(data).shape == (30, 40, 3)
        assert (
            await fetch_reason(downloader, f"{server.url}/404") == "image download failed: HTTP 404"
        )
        assert (
            await fetch_reason(downloader, f"{server.url}/410") == "image download failed: HTTP 410"
        )
        assert (
            await fetch_reason(downloader, f"{server.url}/403") == "image download failed: HTTP 403"
        )
        # Permanent failures are not retried.
        assert len(server.requests_to("GET", "/404")) == 1
        assert (
            await fetch_reason(downloader, f"{server.url}/503")
            == "image download failed: HTTP 503 after 3 attempts"
        )
        assert len(server.requests_to("GET", "/503")) == 3
        assert decode_rgb(await downloader.fetch(f"{server.url}/flaky")).shape == (24, 32, 3)
        # The worker's token never goes to image hosts.
        assert all("authorization" not in r.headers for r in server.requests)
    finally:
        await downloader.aclose()


async def test_timeouts_are_retried_then_reported(images: tuple[LocalServer, Images]) -> None:
    server, _ = images
    downloader = Downloader(concurrency=2, timeout_s=0.2, retries=1)
    try:
        reason = await fetch_reason(downloader, f"{server.url}/slow")
    finally:
        await downloader.aclose()
    assert reason == "image download failed: timed out (0.2 s) after 2 attempts"
    assert len(server.requests_to("GET", "/slow")) == 2


async def test_bad_urls_and_refused_connections() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    downloader = Downloader(concurrency=1, timeout_s=1, retries=1)
    try:
        assert (await fetch_reason(downloader, "ftp://example/x.jpg")).startswith(
            "image download failed: invalid URL"
        )
        reason = await fetch_reason(downloader, f"http://127.0.0.1:{port}/x.jpg")
        assert reason.startswith("image download failed: ConnectError")
        assert reason.endswith("after 2 attempts")
    finally:
        await downloader.aclose()


def test_decode_converts_to_rgb_and_rejects_junk() -> None:
    buffer = io.BytesIO()
    Image.new("RGBA", (5, 4), (1, 2, 3, 4)).save(buffer, format="PNG")
    rgb = decode_rgb(buffer.getvalue())
    assert rgb.shape == (4, 5, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == (1, 2, 3)
    gray = io.BytesIO()
    Image.new("L", (3, 3), 9).save(gray, format="PNG")
    assert decode_rgb(gray.getvalue()).shape == (3, 3, 3)
    with pytest.raises(DownloadFailed, match="image could not be decoded"):
        decode_rgb(b"<html>not an image</html>")
    with pytest.raises(DownloadFailed, match="image could not be decoded"):
        decode_rgb(jpeg_bytes()[:100])  # truncated
