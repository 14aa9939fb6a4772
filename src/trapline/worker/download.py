"""Image download and decoding.

Images are fetched with a plain GET and no Authorization header (docs/protocol.md:
image URLs work by URL alone). Permanent failures (404, 410, other 4xx, bad
URL, undecodable bytes) become a reason at once; transient ones (timeouts,
connection errors, 408/429/5xx) are retried ``retries`` times first.
"""

from __future__ import annotations

import asyncio
import io
import logging
import random
import warnings

import httpx
import numpy as np
from PIL import Image

from trapline import __version__ as _version
from trapline.pipelines.base import RGBImage
from trapline.worker.client import RETRYABLE_STATUSES, parse_retry_after

logger = logging.getLogger(__name__)

RETRY_BASE_S = 0.5
RETRY_CAP_S = 8.0


class DownloadFailed(Exception):
    """An image could not be fetched or decoded; ``reason`` is what the server records."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Downloader:
    """Fetches image bytes with bounded concurrency, per-request timeouts and bounded retries."""

    def __init__(
        self,
        *,
        concurrency: int,
        timeout_s: float,
        retries: int,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._semaphore = asyncio.Semaphore(max(1, concurrency))
        self.timeout_s = timeout_s
        self.retries = max(0, retries)
        self._rng = rng or random.Random()
        # A separate client on purpose: the API client's token must never reach image hosts.
        self._http = httpx.AsyncClient(
            headers={"User-Agent": f"trapline-worker/{_version}"},
            timeout=httpx.Timeout(timeout_s),
            follow_redirects=True,
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def fetch(self, url: str) -> bytes:
        """The body of ``url``; raises :class:`DownloadFailed` with a readable reason."""
        attempts = self.retries + 1
        cause = ""
        for attempt in range(attempts):
            retry_after: float | None = None
            try:
                async with self._semaphore:
                    response = await self._http.get(url)
            except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
                raise DownloadFailed(f"image download failed: invalid URL ({exc})") from exc
            except httpx.TimeoutException:
                cause = f"timed out ({self.timeout_s:g} s)"
            except httpx.TransportError as exc:
                cause = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                status = response.status_code
                if response.is_success:
                    return response.content
                if not (status in RETRYABLE_STATUSES or status >= 500):
                    raise DownloadFailed(f"image download failed: HTTP {status}")
                cause = f"HTTP {status}"
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
            if attempt + 1 < attempts:
                ceiling = min(RETRY_CAP_S, RETRY_BASE_S * 2**attempt)
                delay = retry_after if retry_after is not None else self._rng.uniform(0, ceiling)
                logger.debug("download of %s failed (%s); retry in %.1f s", url, cause, delay)
                await asyncio.sleep(min(delay, RETRY_CAP_S))
        tries = "attempt" if attempts == 1 else "attempts"
        raise DownloadFailed(f"image download failed: {cause} after {attempts} {tries}")


def decode_rgb(data: bytes) -> RGBImage:
    """Decode image bytes into an RGB (H, W, 3) uint8 array; raises :class:`DownloadFailed`."""
    try:
        with warnings.catch_warnings():
            # Pillow warns (rather than raises) for large images below its hard limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                rgb = image.convert("RGB")
        return np.asarray(rgb, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DownloadFailed(f"image could not be decoded: {exc}") from exc
