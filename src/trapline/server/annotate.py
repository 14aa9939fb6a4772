"""One image of a job, downscaled, with its detection boxes drawn on it, as JPEG bytes.

The source is either a file inside the job's ``images_dir`` (never outside it, links
included) or a remote URL fetched with a timeout and a size cap. Decoding and drawing
run on a small thread pool of their own so that a burst of thumbnail requests cannot
starve the server's default executor.

Boxes are in the pixel frame the worker saw: the worker decodes images without applying
EXIF orientation (see ``trapline.worker.download.decode_rgb``), so neither does this.
"""

from __future__ import annotations

import asyncio
import functools
import io
import warnings
import zlib
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from PIL import Image, ImageDraw, ImageFont

from trapline import __version__
from trapline.ledger.models import Detection

FETCH_TIMEOUT_S = 15.0
MAX_SOURCE_BYTES = 64 * 1024 * 1024
JPEG_QUALITY = 85
RENDER_THREADS = 4

RGB = tuple[int, int, int]

# Size classes of moth-detector-cv (trapline.pipelines.moth_detector.SIZE_LABELS);
# the dashboard's legend uses the same colours (static/dashboard.css).
SIZE_COLOURS: dict[str, RGB] = {
    "small": (0, 190, 255),
    "medium": (255, 196, 0),
    "large": (255, 64, 64),
}
UNLABELLED_COLOUR: RGB = (64, 255, 64)
_PALETTE: list[RGB] = [
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
]

_pool = ThreadPoolExecutor(max_workers=RENDER_THREADS, thread_name_prefix="trapline-annotate")


class SourceNotFound(Exception):
    """The image has no readable source on this server (HTTP 404)."""


class SourceUnavailable(Exception):
    """The image's source could not be fetched or decoded (HTTP 502)."""


@dataclass(frozen=True)
class Box:
    """A detection box in source-image pixels, with the text and colour to draw it with."""

    x1: float
    y1: float
    x2: float
    y2: float
    index: int
    label: str | None = None
    score: float | None = None

    @property
    def colour(self) -> RGB:
        return label_colour(self.label)

    @property
    def text(self) -> str:
        parts = [f"#{self.index}"]
        if self.label:
            parts.append(self.label)
        if self.score is not None:
            parts.append(f"{self.score:.2f}")
        return " ".join(parts)


def label_colour(label: str | None) -> RGB:
    """Fixed colours for size classes, a stable palette colour for any other label."""
    if not label:
        return UNLABELLED_COLOUR
    if label in SIZE_COLOURS:
        return SIZE_COLOURS[label]
    return _PALETTE[zlib.crc32(label.encode()) % len(_PALETTE)]


def top_classification(classifications: Sequence[Any]) -> tuple[str | None, float | None]:
    """(label, score) of the terminal classification (else the last one) of a detection."""
    items = [c for c in classifications if isinstance(c, dict)]
    if not items:
        return None, None
    terminal = [c for c in items if c.get("terminal")]
    chosen = (terminal or items)[-1]
    label = chosen.get("classification") or chosen.get("label")
    label = str(label) if label is not None else None
    scores = chosen.get("scores") or []
    labels = chosen.get("labels") or []
    score: float | None = None
    try:
        if label is not None and label in labels and len(scores) == len(labels):
            score = float(scores[labels.index(label)])
        elif scores:
            score = float(max(scores))
    except (TypeError, ValueError):
        score = None
    return label, score


def boxes_of(detections: Iterable[Detection]) -> list[Box]:
    boxes = []
    for d in detections:
        label, score = top_classification(d.classifications or [])
        boxes.append(Box(d.x1, d.y1, d.x2, d.y2, index=d.idx, label=label, score=score))
    return boxes


def render(data: bytes, boxes: Sequence[Box], max_size: int, labels: bool = True) -> bytes:
    """JPEG of ``data`` fitted into ``max_size`` x ``max_size`` (never enlarged), boxes drawn."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                # thumbnail() lets the JPEG decoder downscale while decoding (draft mode).
                image.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
                out = image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise SourceUnavailable(f"image could not be decoded: {exc}") from exc
    draw_boxes(out, boxes, out.width / max(1, width), out.height / max(1, height), labels)
    buffer = io.BytesIO()
    # 4:4:4 chroma: thin coloured box lines stay their colour.
    out.save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buffer.getvalue()


def draw_boxes(
    image: Image.Image, boxes: Sequence[Box], sx: float, sy: float, labels: bool
) -> None:
    """Draws ``boxes`` (source pixels, scaled by ``sx``/``sy``) onto ``image`` in place."""
    if not boxes:
        return
    long_side = max(image.size)
    line = max(2, round(long_side / 250))
    font = _font(max(10, min(28, round(long_side / 55))))
    draw = ImageDraw.Draw(image)
    right, bottom = image.width - 1, image.height - 1
    for box in boxes:
        x1, x2 = sorted((box.x1 * sx, box.x2 * sx))
        y1, y2 = sorted((box.y1 * sy, box.y2 * sy))
        x1, x2 = _clamp(x1, 0, right), _clamp(x2, 0, right)
        y1, y2 = _clamp(y1, 0, bottom), _clamp(y2, 0, bottom)
        draw.rectangle((x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)), outline=box.colour, width=line)
    if not labels:
        return
    for box in boxes:
        x1 = _clamp(min(box.x1, box.x2) * sx, 0, right)
        y1 = _clamp(min(box.y1, box.y2) * sy, 0, bottom)
        left, top, text_r, text_b = draw.textbbox((0, 0), box.text, font=font)
        w, h = text_r - left + 4, text_b - top + 4
        # Above the box when there is room, else just inside its top edge.
        ty = y1 - h if y1 - h >= 0 else y1
        tx = min(x1, max(0.0, image.width - w))
        draw.rectangle((tx, ty, tx + w, ty + h), fill=box.colour)
        draw.text((tx + 2 - left, ty + 2 - top), box.text, fill=_ink(box.colour), font=font)


def _clamp(v: float, lo: float, hi: float) -> float:
    return min(max(v, lo), hi)


def _ink(colour: RGB) -> RGB:
    r, g, b = colour
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


@functools.lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (OSError, ImportError):  # Pillow built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def read_local(path: str, images_dir: str | None, max_bytes: int = MAX_SOURCE_BYTES) -> bytes:
    """The bytes of ``path`` if it is a file inside ``images_dir`` (symlinks resolved first)."""
    if not images_dir:
        raise SourceNotFound("the job has no images folder on this server")
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(Path(images_dir).resolve()) or not resolved.is_file():
        raise SourceNotFound("the image file is no longer in the job's folder")
    try:
        size = resolved.stat().st_size
        if size > max_bytes:
            raise SourceUnavailable(f"image file is {size} bytes, over the {max_bytes} byte cap")
        return resolved.read_bytes()
    except OSError as exc:
        raise SourceNotFound(f"the image file cannot be read: {exc.strerror or exc}") from exc


async def fetch_remote(
    url: str,
    *,
    timeout_s: float = FETCH_TIMEOUT_S,
    max_bytes: int = MAX_SOURCE_BYTES,
    transport: httpx.AsyncBaseTransport | None = None,
) -> bytes:
    """The body of ``url`` (http/https), at most ``max_bytes``, within ``timeout_s`` overall."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SourceUnavailable("the image URL is not an http(s) URL")
    host = parts.hostname
    try:
        async with (
            asyncio.timeout(timeout_s),
            httpx.AsyncClient(
                timeout=httpx.Timeout(timeout_s),
                follow_redirects=True,
                headers={"User-Agent": f"trapline-server/{__version__}"},
                transport=transport,
            ) as client,
            client.stream("GET", url) as response,
        ):
            if not response.is_success:
                raise SourceUnavailable(f"image host {host} answered HTTP {response.status_code}")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise SourceUnavailable(f"image is {declared} bytes, over the {max_bytes} byte cap")
            chunks: list[bytes] = []
            total = 0
            async for chunk in response.aiter_bytes():
                total += len(chunk)
                if total > max_bytes:
                    raise SourceUnavailable(f"image is over the {max_bytes} byte cap")
                chunks.append(chunk)
            return b"".join(chunks)
    except (TimeoutError, httpx.TimeoutException) as exc:
        raise SourceUnavailable(f"image host {host} did not answer within {timeout_s:g} s") from exc
    except httpx.HTTPError as exc:
        why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise SourceUnavailable(f"image could not be fetched from {host}: {why}") from exc


async def annotated_jpeg(
    *,
    url: str | None,
    path: str | None,
    images_dir: str | None,
    boxes: Sequence[Box],
    max_size: int,
    labels: bool = True,
    transport: httpx.AsyncBaseTransport | None = None,
) -> bytes:
    """The annotated JPEG of one ledger image: local ``path`` if it has one, else ``url``."""
    loop = asyncio.get_running_loop()
    if path:
        data = await loop.run_in_executor(_pool, read_local, path, images_dir)
    elif url:
        data = await fetch_remote(url, transport=transport)
    else:
        raise SourceNotFound("the image has neither a file nor a URL")
    return await loop.run_in_executor(_pool, render, data, boxes, max_size, labels)
