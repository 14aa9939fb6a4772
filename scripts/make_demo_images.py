"""Generate the small synthetic trap images shipped in ``src/trapline/demo_images/``.

Each image is a lit white sheet (off-centre hot spot, vignetting, a slight
colour cast, sensor noise and faint weave) with a few moth-like shapes: brown
folded-wing deltas, spread-wing geometrids and slim micro-moths of varying
sizes, with bodies, antennae and wing bands. The seed is fixed, so running the
script again reproduces the same files.

Usage: python scripts/make_demo_images.py [--out DIR] [--count N] [--seed S]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

WIDTH, HEIGHT = 1024, 768
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "trapline" / "demo_images"
JPEG_QUALITY = 82

FloatImage = npt.NDArray[np.float32]
Points = npt.NDArray[np.float64]


def _sheet(rng: np.random.Generator) -> FloatImage:
    """A white sheet under a lamp: hot spot, darker corners, slight tint, weave and noise."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    cx = WIDTH * rng.uniform(0.35, 0.65)
    cy = HEIGHT * rng.uniform(0.3, 0.6)
    spot = np.exp(-(((xx - cx) / (WIDTH * 0.35)) ** 2 + ((yy - cy) / (HEIGHT * 0.4)) ** 2))
    rx, ry = (xx - WIDTH / 2) / (WIDTH / 2), (yy - HEIGHT / 2) / (HEIGHT / 2)
    vignette = 1.0 - 0.22 * (rx**2 + ry**2)
    tilt = 1.0 + rng.uniform(-0.06, 0.06) * rx + rng.uniform(-0.06, 0.06) * ry
    light = (0.72 + 0.26 * spot) * vignette * tilt
    tint = np.array([rng.uniform(0.95, 1.0), rng.uniform(0.96, 1.0), rng.uniform(0.93, 1.0)])
    sheet = 250.0 * light[:, :, None] * tint[None, None, :].astype(np.float32)
    # Faint horizontal weave, then sensor noise: enough to make thresholds work.
    weave = cv2.GaussianBlur(rng.normal(0, 6, (HEIGHT, WIDTH)).astype(np.float32), (0, 0), 0.8)
    weave = cv2.blur(weave, (9, 1))
    sheet += weave[:, :, None]
    sheet += rng.normal(0, 1.5, sheet.shape).astype(np.float32)
    return np.asarray(sheet, dtype=np.float32)


def _rotate(points: Points, angle: float, cx: float, cy: float) -> Points:
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return np.asarray(points @ rot.T + np.array([cx, cy]), dtype=np.float64)


Shape = tuple[Points | tuple[float, float, float, float], tuple[float, float, float], str]

# Wing colours (RGB): buff, mid brown, dark brown, grey-brown, straw.
PALETTE = np.array(
    [[196, 160, 112], [150, 108, 68], [104, 76, 52], [128, 118, 104], [205, 180, 120]],
    dtype=np.float64,
)


def _rgb(values: Points) -> tuple[float, float, float]:
    return float(values[0]), float(values[1]), float(values[2])


def _moth_layers(kind: str, length: float, rng: np.random.Generator) -> list[Shape]:
    """Shapes of one moth in its own frame (head towards -y): outline, colour (RGB), how to draw."""
    wing = PALETTE[int(rng.integers(len(PALETTE)))] * rng.uniform(0.85, 1.05)
    wing_c, band, body = _rgb(wing), _rgb(wing * 0.72), _rgb(wing * 0.55)
    half = length / 2
    shapes: list[Shape] = []
    if kind == "delta":
        # Resting noctuid: wings folded into a triangle, apex at the head.
        w = length * rng.uniform(0.35, 0.5)
        outline = np.array([[0, -half], [w, half * 0.9], [0, half * 0.7], [-w, half * 0.9]])
        shapes.append((outline, wing_c, "poly"))
        for side in (-1, 1):
            chevron = np.array([[0, -half * 0.1], [side * w * 0.7, half * 0.45]])
            shapes.append((chevron, band, "line"))
        head_y = -half * 0.85
    elif kind == "spread":
        # Geometrid: wings held flat and wide on both sides of the body.
        span = length * rng.uniform(0.75, 0.95)
        for side in (-1, 1):
            fore = np.array(
                [
                    [0, -half * 0.45],
                    [side * span * 0.95, -half * 0.6],
                    [side * span, -half * 0.35],
                    [side * span * 0.55, half * 0.15],
                    [0, half * 0.05],
                ]
            )
            hind = np.array(
                [
                    [0, -half * 0.05],
                    [side * span * 0.6, half * 0.05],
                    [side * span * 0.55, half * 0.5],
                    [side * span * 0.25, half * 0.6],
                    [0, half * 0.45],
                ]
            )
            shapes.append((fore, wing_c, "poly"))
            shapes.append((hind, wing_c, "poly"))
            line = np.array([[side * span * 0.12, -half * 0.3], [side * span * 0.8, -half * 0.25]])
            shapes.append((line, band, "line"))
        head_y = -half * 0.55
    else:
        # Micro-moth: a slim folded tube.
        w = length * rng.uniform(0.13, 0.18)
        outline = np.array([[-w * 0.8, -half], [w * 0.8, -half], [w * 1.2, half], [-w * 1.2, half]])
        shapes.append((outline, wing_c, "poly"))
        head_y = -half * 0.95
    shapes.append(
        ((0.0, head_y + half * 0.5, max(1.5, length * 0.05), half * 0.45), body, "ellipse")
    )
    ant = length * rng.uniform(0.15, 0.25)
    for side in (-1, 1):
        feeler = np.array([[side * 1.0, head_y], [side * ant * 0.6, head_y - ant]])
        shapes.append((feeler, body, "antenna"))
    return shapes


def _draw_moth(
    image: FloatImage, cx: float, cy: float, length: float, kind: str, rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """Composite one moth at (cx, cy); returns its approximate box (x1, y1, x2, y2)."""
    angle = rng.uniform(-math.pi, math.pi)
    ss = 4  # coordinates in quarter pixels (shift=2): smooth anti-aliased outlines
    colour = np.zeros((HEIGHT, WIDTH, 3), np.float32)
    alpha = np.zeros((HEIGHT, WIDTH), np.float32)
    thickness = max(1, round(length / 60))
    for shape, rgb, how in _moth_layers(kind, length, rng):
        layer = np.zeros((HEIGHT, WIDTH), np.uint8)
        if how == "ellipse":
            assert isinstance(shape, tuple)
            ex, ey, ax, ay = shape
            centre = _rotate(np.array([[ex, ey]]), angle, cx, cy)[0]
            cv2.ellipse(
                layer,
                (round(centre[0] * ss), round(centre[1] * ss)),
                (max(1, round(ax * ss)), max(1, round(ay * ss))),
                math.degrees(angle),
                0,
                360,
                255,
                -1,
                cv2.LINE_AA,
                shift=2,
            )
        else:
            assert not isinstance(shape, tuple)
            pts = np.round(_rotate(shape, angle, cx, cy) * ss).astype(np.int32)
            if how == "poly":
                cv2.fillPoly(layer, [pts], 255, cv2.LINE_AA, shift=2)
            else:
                width = 1 if how == "antenna" else thickness
                cv2.line(layer, tuple(pts[0]), tuple(pts[1]), 255, width, cv2.LINE_AA, shift=2)
        mask = layer.astype(np.float32) / 255.0
        colour = colour * (1 - mask[:, :, None]) + np.array(rgb, np.float32) * mask[:, :, None]
        alpha = np.maximum(alpha, mask)
    # Scale pattern: mottle the moth a little so it is not a flat cut-out.
    mottle = cv2.GaussianBlur(
        rng.normal(1.0, 0.08, (HEIGHT, WIDTH)).astype(np.float32), (0, 0), 1.2
    )
    colour *= mottle[:, :, None]
    alpha = np.asarray(cv2.GaussianBlur(alpha, (0, 0), 0.6), dtype=np.float32)
    image[:] = image * (1 - alpha[:, :, None]) + colour * alpha[:, :, None]
    ys, xs = np.nonzero(alpha > 0.3)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def make_image(
    rng: np.random.Generator,
) -> tuple[npt.NDArray[np.uint8], list[tuple[int, int, int, int]]]:
    """One demo frame (RGB) and the boxes of the moths drawn on it."""
    image = _sheet(rng)
    boxes: list[tuple[int, int, int, int]] = []
    placed: list[tuple[float, float, float]] = []
    n = int(rng.integers(3, 8))
    tries = 0
    while len(placed) < n and tries < 500:
        tries += 1
        kind = str(rng.choice(["delta", "spread", "micro"], p=[0.45, 0.3, 0.25]))
        length = float(rng.uniform(18, 45) if kind == "micro" else rng.uniform(30, 120))
        reach = length * 0.9 + 8
        cx = float(rng.uniform(reach, WIDTH - reach))
        cy = float(rng.uniform(reach, HEIGHT - reach))
        if any(math.hypot(cx - px, cy - py) < reach + pr + 10 for px, py, pr in placed):
            continue
        placed.append((cx, cy, reach))
        boxes.append(_draw_moth(image, cx, cy, length, kind, rng))
    return np.clip(image, 0, 255).astype(np.uint8), boxes


def main() -> None:
    """Write the demo JPEGs and print each file's size and moth count."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--count", type=int, default=6)
    parser.add_argument("--seed", type=int, default=20240611)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    for i in range(args.count):
        rgb, boxes = make_image(rng)
        path = args.out / f"demo_{i + 1:02d}.jpg"
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(path), bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        print(f"{path}  {path.stat().st_size // 1024} KB  {len(boxes)} moths")


if __name__ == "__main__":
    main()
