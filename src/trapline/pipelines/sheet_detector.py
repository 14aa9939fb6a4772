"""Finding insects on a lit white sheet: the classical-CV core of ``moth-detector-cv``.

No model, no download: OpenCV and numpy only. The camera looks at a white sheet
lit from the front, so an insect is a sharp-edged blob that is darker or more
coloured than the sheet around it. The detector:

1. downscales the frame so its long side is ``work_long_side`` pixels (1280 by
   default): insects stay several pixels wide there and every later step costs
   a fraction of what it would at 4K;
2. estimates the sheet (brightness and colour) with a large morphological
   closing/opening on an even smaller copy, which erases anything insect-sized
   and keeps the lamp's hot spot and the vignetting;
3. scores each pixel by its relative darkness (Weber contrast) and its extra
   colour saturation over that sheet estimate, against a threshold that rises
   where the sheet itself is grainy or creased (local noise level);
4. thresholds with hysteresis (weak pixels are kept only in blobs that hold
   enough strong ones), cleans the mask with small morphology and takes
   connected components with area bounds relative to the frame;
5. drops blobs that are not insects on the sheet: blurred shapes (something
   out of focus near the lens), near-black perfect discs (the press studs that
   hold the sheet) and the camera's date stamp in the bottom-right corner;
6. merges boxes that mostly overlap (fragments of one insect; the mask closing
   and hysteresis already join most) and maps them back to original pixels.

Speed: about 0.09 s per 4K frame on one core, decoding excluded
(``bench/bench_moth_detector.py``). The module never changes OpenCV's thread
count; a worker that wants one core per frame calls ``cv2.setNumThreads(1)``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from trapline.pipelines.base import RGBImage

logger = logging.getLogger(__name__)

Float32Array = npt.NDArray[np.float32]
UInt8Array = npt.NDArray[np.uint8]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class DetectorParams:
    """Tuning knobs of :func:`detect_insects`; sizes are relative, to hold at any resolution."""

    # Long side of the working copy, in pixels.
    work_long_side: int = 1280
    # The sheet and noise estimates are made on a copy this many times smaller again.
    background_downscale: int = 4
    # Closing kernel for the sheet estimate, as a fraction of the working long
    # side; it must exceed the widest insect, or the insect leaks into the sheet.
    background_kernel_fraction: float = 0.12
    # Window of the local noise estimate, as a fraction of the working long side.
    noise_kernel_fraction: float = 0.08
    # The weak threshold is this many local noise sigmas ...
    weak_sigmas: float = 4.0
    # ... but never below these floors, so a clean frame does not flag paper
    # grain: Weber darkness, and chroma above the sheet's in Lab units.
    min_darkness: float = 0.06
    min_chroma: float = 6.0
    # Strong pixels (hysteresis seeds) are this many times over the weak threshold;
    # 3.3 x 0.06 asks for a spot at least 20 % darker than the sheet.
    strong_ratio: float = 3.3
    # A kept blob needs at least this many strong pixels.
    min_strong_pixels: int = 6
    # Blob pixel area (min) and box area (max) as fractions of the frame.
    min_area_fraction: float = 4e-5
    max_area_fraction: float = 0.1
    # Blobs whose edges are softer than this (95th-percentile gradient over
    # 95th-percentile darkness, per working pixel) are out-of-focus shapes.
    min_edge_sharpness: float = 0.08
    # Boxes merge into one when they share this fraction of the smaller box,
    # or are disjoint but at most this many working pixels apart (0: touching).
    merge_overlap: float = 0.5
    merge_gap: float = 0.0
    # Boxes wholly inside this bottom-right corner (fractions of width, height)
    # are the camera's burnt-in date stamp; (0, 0) turns the rule off.
    stamp_corner: tuple[float, float] = (0.06, 0.04)


DEFAULT_PARAMS = DetectorParams()


@dataclass(frozen=True)
class RawDetection:
    """A box in original pixel coordinates (x1, y1, x2, y2) and its confidence in [0, 1]."""

    bbox: tuple[float, float, float, float]
    score: float


@dataclass(frozen=True)
class _Maps:
    """Per-pixel maps at working resolution."""

    evidence: Float32Array  # foreground evidence in weak-threshold units
    lum: Float32Array  # smoothed Lab luminance, 0-255
    bg_lum: Float32Array  # sheet luminance estimate
    darkness: Float32Array  # Weber darkness against the sheet


def _f32(array: npt.ArrayLike) -> Float32Array:
    """View (or convert) as float32; also pins the type OpenCV's stubs leave open."""
    return np.asarray(array, dtype=np.float32)


def _u8(array: npt.ArrayLike) -> UInt8Array:
    return np.asarray(array, dtype=np.uint8)


def _odd(n: float) -> int:
    k = max(3, round(n))
    return k if k % 2 == 1 else k + 1


def _shrink(image: Float32Array, factor: int) -> Float32Array:
    h, w = image.shape
    size = (max(1, w // factor), max(1, h // factor))
    return _f32(cv2.resize(image, size, interpolation=cv2.INTER_AREA))


def _grow(image: Float32Array, shape: tuple[int, ...]) -> Float32Array:
    return _f32(cv2.resize(image, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR))


def _pad_odd(image: Float32Array, pad: int) -> tuple[Float32Array, int]:
    """Pad by point reflection about the edge, so a brightness ramp runs on straight through it.

    Replicated or mirrored borders turn the vignetting ramp into a plateau or a
    valley, which a closing then fills: the frame's edges would all read dark.
    """
    pad = min(pad, image.shape[0] - 1, image.shape[1] - 1)
    if pad <= 0:
        return image, 0
    padded: Float32Array = np.pad(image, pad, mode="reflect", reflect_type="odd")
    return padded, pad


def _background(channel: Float32Array, params: DetectorParams, dark_objects: bool) -> Float32Array:
    """Smooth sheet estimate of ``channel``; darker (or brighter) insect-sized things erased."""
    small = _shrink(channel, params.background_downscale)
    k = _odd(params.background_kernel_fraction * max(channel.shape) / params.background_downscale)
    padded, pad = _pad_odd(small, k)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    op = cv2.MORPH_CLOSE if dark_objects else cv2.MORPH_OPEN
    est = _f32(cv2.morphologyEx(padded, op, kernel))
    est = _f32(cv2.GaussianBlur(est, (0, 0), k / 4))
    if pad:
        est = est[pad:-pad, pad:-pad]
    return _grow(np.ascontiguousarray(est), channel.shape)


def _noise_map(residual: Float32Array, cap: float, params: DetectorParams) -> Float32Array:
    """Local noise level (about one sigma) of a residual map: high on a grainy or creased sheet.

    A wide weighted mean of the absolute residual over the pixels below ``cap``
    (the channel's detection floor). Leaving out what is already above the floor
    keeps a large moth from raising the threshold over itself, while a worn
    sheet's weave lifts the level everywhere on it.
    """
    dev = np.abs(residual)
    valid = (dev < np.float32(cap)).astype(np.float32)
    f = params.background_downscale
    num = _shrink(dev * valid, f)
    den = _shrink(valid, f)
    k = _odd(params.noise_kernel_fraction * max(residual.shape) / f)
    num = _f32(cv2.GaussianBlur(num, (0, 0), k / 3, borderType=cv2.BORDER_REFLECT))
    den = _f32(cv2.GaussianBlur(den, (0, 0), k / 3, borderType=cv2.BORDER_REFLECT))
    level = _f32(num / np.maximum(den, np.float32(1e-3)))
    # 1.25 turns a Gaussian's mean absolute deviation into its sigma.
    return _grow(level, residual.shape) * np.float32(1.25)


def _maps(work: RGBImage, params: DetectorParams) -> _Maps:
    """Foreground evidence (>= 1 is a weak foreground pixel) and the maps behind it.

    Darkness is Weber contrast against the sheet estimate: the same moth is darker
    in absolute terms under the lamp than in the dim corners, but about equally
    dark relative to its own patch of sheet. Colour is chroma (Lab) above the
    sheet's, for green or orange insects nearly as bright as the sheet.
    """
    lab = _u8(cv2.cvtColor(work, cv2.COLOR_RGB2LAB))
    lum = _f32(cv2.GaussianBlur(lab[:, :, 0], (3, 3), 0))
    a = _f32(lab[:, :, 1]) - np.float32(128.0)
    b = _f32(lab[:, :, 2]) - np.float32(128.0)
    # JPEG subsamples chroma, so it is blockier than luminance: smooth it more.
    chroma = _f32(cv2.GaussianBlur(cv2.magnitude(a, b), (5, 5), 0))

    bg_lum = _background(lum, params, dark_objects=True)
    bg_chroma = _background(chroma, params, dark_objects=False)
    darkness = _f32((bg_lum - lum) / np.maximum(bg_lum, np.float32(32.0)))
    colour = _f32(chroma - bg_chroma)
    # The closing rides on the noise's upper envelope; re-centre on the sheet.
    darkness -= np.float32(np.median(darkness[::4, ::4]))
    colour -= np.float32(np.median(colour[::4, ::4]))

    dark_noise = _noise_map(darkness, params.min_darkness, params)
    colour_noise = _noise_map(colour, params.min_chroma, params)
    dark_t = np.maximum(np.float32(params.weak_sigmas) * dark_noise, params.min_darkness)
    colour_t = np.maximum(np.float32(params.weak_sigmas) * colour_noise, params.min_chroma)
    evidence = _f32(np.maximum(darkness / dark_t, colour / colour_t))
    return _Maps(evidence=evidence, lum=lum, bg_lum=bg_lum, darkness=darkness)


def _should_merge(a: list[float], b: list[float], params: DetectorParams) -> bool:
    """Fragments of one insect: boxes sharing most of the smaller one, or touching.

    A small overlap alone is not enough: a beetle resting against a moth's
    wingtip overlaps its box a little and is still a separate insect.
    """
    ix = min(a[2], b[2]) - max(a[0], b[0])
    iy = min(a[3], b[3]) - max(a[1], b[1])
    if ix > 0 and iy > 0:
        smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
        return ix * iy >= params.merge_overlap * max(smaller, 1e-6)
    # Disjoint (or touching) boxes: the gap along the axis where they separate.
    return max(-ix, -iy) <= params.merge_gap


def _merge_boxes(boxes: list[list[float]], params: DetectorParams) -> list[list[float]]:
    """Union fragment boxes until no pair qualifies. Box: x1, y1, x2, y2, score."""
    merged = [b[:] for b in boxes]
    changed = True
    while changed:
        changed = False
        out: list[list[float]] = []
        for box in merged:
            for other in out:
                if _should_merge(box, other, params):
                    other[0] = min(other[0], box[0])
                    other[1] = min(other[1], box[1])
                    other[2] = max(other[2], box[2])
                    other[3] = max(other[3], box[3])
                    other[4] = max(other[4], box[4])
                    changed = True
                    break
            else:
                out.append(box)
        merged = out
    return merged


def _is_fixture(
    inside: BoolArray,
    origin: tuple[int, int],
    frame: tuple[int, int],
    lum: Float32Array,
    bg_lum: Float32Array,
) -> bool:
    """A near-black, near-perfect disc (a press stud holding the sheet), even if cut by the frame.

    Fits a circle to the outline, leaving out outline points on the frame edge,
    and asks for a small fit residual: beetles are as dark but elliptical.
    """
    relative = float(np.median(lum[inside])) / max(1.0, float(np.median(bg_lum[inside])))
    if relative > 0.35:
        return False
    contours, _ = cv2.findContours(
        inside.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
    )
    if not contours:
        return False
    pts = max(contours, key=len).reshape(-1, 2).astype(np.float64)
    gx, gy = pts[:, 0] + origin[0], pts[:, 1] + origin[1]
    keep = (gx > 0) & (gy > 0) & (gx < frame[1] - 1) & (gy < frame[0] - 1)
    if int(keep.sum()) < 12:
        return False
    x, y = gx[keep], gy[keep]
    # Kasa's algebraic circle fit: x^2 + y^2 + D x + E y + F = 0.
    design = np.column_stack([x, y, np.ones_like(x)])
    (d, e, f), *_ = np.linalg.lstsq(design, -(x * x + y * y), rcond=None)
    cx, cy = -d / 2.0, -e / 2.0
    r2 = cx * cx + cy * cy - f
    if r2 <= 0:
        return False
    radius = math.sqrt(r2)
    rms = float(np.sqrt(np.mean((np.hypot(x - cx, y - cy) - radius) ** 2)))
    # A short arc fits any circle, so the outline must also span most of one.
    spread = (float(x.max() - x.min()) + float(y.max() - y.min())) / (4.0 * radius)
    return radius >= 4.0 and rms < 0.08 * radius and spread > 0.45


def detect_insects(rgb: RGBImage, params: DetectorParams = DEFAULT_PARAMS) -> list[RawDetection]:
    """Find insect-like blobs on a lit sheet; boxes are in ``rgb``'s pixel coordinates.

    Raises ValueError for an array that is not an RGB image of at least 16x16.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {rgb.shape}")
    height, width = rgb.shape[:2]
    if min(height, width) < 16:
        raise ValueError(f"image too small to search: {width}x{height}")
    scale = min(1.0, params.work_long_side / max(height, width))
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        work = _u8(cv2.resize(rgb, size, interpolation=cv2.INTER_AREA))
    else:
        work = np.ascontiguousarray(rgb)
    wh, ww = work.shape[:2]
    sx, sy = width / ww, height / wh

    maps = _maps(work, params)
    weak = _u8(maps.evidence >= 1.0)
    strong = maps.evidence >= params.strong_ratio
    # Opening drops isolated noise pixels and one-pixel creases; closing then
    # rejoins wings, body and legs split by a pale band.
    weak = _u8(cv2.morphologyEx(weak, cv2.MORPH_OPEN, np.ones((2, 2), np.uint8)))
    closer = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    weak = _u8(cv2.morphologyEx(weak, cv2.MORPH_CLOSE, closer))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(weak, connectivity=8)
    strong_counts = np.bincount(labels[strong], minlength=count)

    frame_area = float(wh * ww)
    min_area = params.min_area_fraction * frame_area
    max_area = params.max_area_fraction * frame_area
    gradient: Float32Array | None = None
    boxes: list[list[float]] = []
    for i in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[i])
        if area < min_area or w * h > max_area or strong_counts[i] < params.min_strong_pixels:
            continue
        sl = np.s_[y : y + h, x : x + w]
        inside = labels[sl] == i
        if gradient is None:
            # A 3x3 Sobel answers 8 on a ramp of 1 per pixel: /8 makes it a slope.
            gx = cv2.Sobel(maps.lum, cv2.CV_32F, 1, 0)
            gy = cv2.Sobel(maps.lum, cv2.CV_32F, 0, 1)
            denominator = np.float32(8.0) * np.maximum(maps.bg_lum, np.float32(32.0))
            gradient = _f32(cv2.magnitude(gx, gy) / denominator)
        slope = float(np.percentile(gradient[sl][inside], 95))
        depth = float(np.percentile(maps.darkness[sl][inside], 95))
        if slope < params.min_edge_sharpness * max(depth, 1e-3):
            continue
        # Only dark, roundish blobs pay for the fixture test.
        roundish = area >= 40 and 0.4 < w / h < 2.5 and depth > 0.5
        if roundish and _is_fixture(inside, (x, y), (wh, ww), maps.lum[sl], maps.bg_lum[sl]):
            continue
        peak = float(maps.evidence[sl][inside].max())
        # Confidence: contrast well above threshold and a body-sized area are
        # both what a real insect looks like; faint specks score low.
        contrast_term = min(1.0, (peak - 1.0) / (3.0 * params.strong_ratio))
        size_term = min(1.0, math.log(area / min_area + 1.0) / math.log(30.0))
        score = max(0.01, min(0.99, 0.15 + 0.45 * contrast_term + 0.4 * size_term))
        boxes.append([float(x), float(y), float(x + w), float(y + h), score])

    stamp_x = ww * (1.0 - params.stamp_corner[0])
    stamp_y = wh * (1.0 - params.stamp_corner[1])
    results: list[RawDetection] = []
    for x1, y1, x2, y2, score in _merge_boxes(boxes, params):
        if params.stamp_corner[0] > 0 and x1 >= stamp_x and y1 >= stamp_y:
            continue
        bbox = (
            max(0.0, x1 * sx),
            max(0.0, y1 * sy),
            min(float(width), x2 * sx),
            min(float(height), y2 * sy),
        )
        results.append(RawDetection(bbox=bbox, score=round(score, 4)))
    results.sort(key=lambda d: (d.bbox[1], d.bbox[0]))
    return results
