"""The classical moth detector: synthetic scenes, shipped demo images and real trap frames.

Real frames live outside the repository, in the sibling ``shared`` folder
(``../shared/data/trap-images`` from the repo root) or wherever
TRAPLINE_TEST_IMAGES_DIR points; their tests skip when the folder is absent.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from trapline.pipelines.base import ImageInput, ImageResult
from trapline.pipelines.moth_detector import (
    DETECTOR_KEY,
    MEDIUM_MAX_FRACTION,
    SIZE_KEY,
    SIZE_LABELS,
    SMALL_MAX_FRACTION,
    MothDetectorPipeline,
    size_class,
)
from trapline.pipelines.registry import available_pipelines
from trapline.pipelines.sheet_detector import RawDetection, detect_insects

RGB = npt.NDArray[np.uint8]
Box = tuple[float, float, float, float]

IMAGES_DIR = Path(
    os.environ.get("TRAPLINE_TEST_IMAGES_DIR")
    or Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "trap-images"
)


# --- synthetic scenes -------------------------------------------------------------------------


def sheet(width: int, height: int, seed: int = 0) -> npt.NDArray[np.float32]:
    """A lit sheet: off-centre hot spot, a strong left-right fall-off, vignetting and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    spot = np.exp(
        -(((xx - 0.4 * width) / (0.4 * width)) ** 2 + ((yy - 0.5 * height) / (0.5 * height)) ** 2)
    )
    ramp = 1.0 - 0.25 * xx / width
    vignette = 1.0 - 0.2 * (
        ((xx - width / 2) / (width / 2)) ** 2 + ((yy - height / 2) / (height / 2)) ** 2
    )
    light = (0.75 + 0.25 * spot) * ramp * vignette
    image = 245.0 * light[:, :, None] * np.array([1.0, 0.98, 0.95], np.float32)
    image += rng.normal(0.0, 2.0, image.shape).astype(np.float32)
    return np.asarray(image, dtype=np.float32)


def finish(image: npt.NDArray[np.float32]) -> RGB:
    return np.clip(image, 0, 255).astype(np.uint8)


def read_rgb(path: Path) -> RGB:
    bgr = cv2.imread(str(path))
    assert bgr is not None, f"cannot decode {path}"
    return np.asarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), dtype=np.uint8)


def ellipse_box(cx: int, cy: int, ax: int, ay: int) -> Box:
    return (float(cx - ax), float(cy - ay), float(cx + ax), float(cy + ay))


def draw_blob(image: npt.NDArray[np.float32], cx: int, cy: int, ax: int, ay: int) -> Box:
    """A brown, darker-bodied ellipse: a moth seen from far enough away."""
    cv2.ellipse(image, (cx, cy), (ax, ay), 0, 0, 360, (120.0, 85.0, 55.0), -1, cv2.LINE_AA)
    cv2.ellipse(
        image, (cx, cy), (max(1, ax // 4), max(2, ay * 3 // 4)), 0, 0, 360, (70.0, 50.0, 35.0), -1
    )
    return ellipse_box(cx, cy, ax, ay)


def iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def contains(box: Box, x: float, y: float) -> bool:
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


# 2400x1600 is large enough that the detector downscales, so these also check the
# mapping of boxes back to original pixels. Frame area 3.84 Mpx: small < 3840 px2,
# medium < 19200 px2 of box.
SCENE_W, SCENE_H = 2400, 1600
BLOBS: list[tuple[int, int, int, int, str]] = [
    (300, 300, 18, 12, "small"),  # box 36x24
    (1900, 250, 14, 22, "small"),  # box 28x44, in the dimmer right half
    (1200, 800, 50, 35, "medium"),  # box 100x70 under the hot spot
    (600, 1250, 40, 60, "medium"),  # box 80x120
    (1750, 1150, 110, 80, "large"),  # box 220x160
    (2250, 1450, 16, 16, "small"),  # near the dark corner
]


@pytest.fixture(scope="module")
def scene() -> tuple[RGB, list[tuple[Box, str]]]:
    image = sheet(SCENE_W, SCENE_H, seed=1)
    truth = [(draw_blob(image, cx, cy, ax, ay), label) for cx, cy, ax, ay, label in BLOBS]
    return finish(image), truth


def test_finds_each_blob_once_around_it(scene: tuple[RGB, list[tuple[Box, str]]]) -> None:
    image, truth = scene
    detections = detect_insects(image)
    assert len(detections) == len(truth)
    for box, _ in truth:
        matches = [d for d in detections if iou(d.bbox, box) > 0.5]
        assert len(matches) == 1, f"blob {box} matched {[d.bbox for d in detections]}"
        assert 0.0 <= matches[0].score <= 1.0


def test_pipeline_sizes_blobs_by_box_area(scene: tuple[RGB, list[tuple[Box, str]]]) -> None:
    image, truth = scene
    [result] = MothDetectorPipeline().process([ImageInput(id="scene", url="", pixels=image)])
    assert result.error is None
    assert len(result.detections) == len(truth)
    for box, label in truth:
        [det] = [d for d in result.detections if iou(d.bbox, box) > 0.5]
        assert det.algorithm_key == DETECTOR_KEY
        [cls] = det.classifications
        assert cls.algorithm_key == SIZE_KEY
        assert cls.terminal is True
        assert cls.labels == SIZE_LABELS
        assert cls.label == label, f"blob {box}: {cls.label} {cls.scores}"
        assert cls.scores[SIZE_LABELS.index(label)] == max(cls.scores)
        assert sum(cls.scores) == pytest.approx(1.0, abs=1e-3)
    assert result.seconds > 0


def test_blank_sheet_has_no_detections() -> None:
    for seed in range(3):
        assert detect_insects(finish(sheet(SCENE_W, SCENE_H, seed=seed))) == []


def test_small_frame_without_downscaling() -> None:
    image = sheet(640, 480, seed=2)
    box = draw_blob(image, 320, 240, 20, 14)
    detections = detect_insects(finish(image))
    assert len(detections) == 1
    assert iou(detections[0].bbox, box) > 0.5


def test_sheet_studs_and_blurred_shadows_are_not_insects() -> None:
    """A black disc with a shiny centre (a press stud) and a soft dark smear are left out;
    an equally black but elliptical beetle is kept."""
    image = sheet(SCENE_W, SCENE_H, seed=3)
    cv2.circle(image, (500, 500), 45, (25.0, 25.0, 25.0), -1, cv2.LINE_AA)
    cv2.circle(image, (500, 500), 10, (200.0, 200.0, 200.0), -1, cv2.LINE_AA)
    cv2.circle(image, (1500, SCENE_H - 20), 45, (25.0, 25.0, 25.0), -1, cv2.LINE_AA)  # cut by frame
    smear = np.zeros((SCENE_H, SCENE_W), np.float32)
    cv2.ellipse(smear, (1900, 500), (90, 140), 30, 0, 360, 1.0, -1)
    smear = np.asarray(cv2.GaussianBlur(smear, (0, 0), 45), dtype=np.float32)
    image *= (1.0 - 0.6 * smear / smear.max())[:, :, None]
    beetle = ellipse_box(900, 1100, 22, 34)
    cv2.ellipse(image, (900, 1100), (22, 34), 0, 0, 360, (20.0, 18.0, 16.0), -1, cv2.LINE_AA)
    detections = detect_insects(finish(image))
    assert [iou(d.bbox, beetle) > 0.5 for d in detections] == [True]


def test_missing_or_bad_pixels_become_error_results() -> None:
    pipeline = MothDetectorPipeline()
    good = finish(sheet(800, 600))
    images = [
        ImageInput(id="none", url="http://x/none.jpg", pixels=None),
        ImageInput(id="float", url="", pixels=np.zeros((50, 50, 3), np.float32)),
        ImageInput(id="tiny", url="", pixels=np.zeros((4, 4, 3), np.uint8)),
        ImageInput(id="shape", url="", pixels=np.zeros((50, 50, 2), np.uint8)),
        ImageInput(id="good", url="", pixels=good),
    ]
    results = pipeline.process(images)
    assert [r.image_id for r in results] == ["none", "float", "tiny", "shape", "good"]
    for result in results[:4]:
        assert isinstance(result, ImageResult)
        assert result.error
        assert result.detections == []
    assert results[4].error is None


def test_grayscale_and_rgba_inputs_are_accepted() -> None:
    image = sheet(800, 600, seed=4)
    draw_blob(image, 400, 300, 25, 18)
    rgb = finish(image)
    gray = np.asarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), dtype=np.uint8)
    rgba = np.asarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2RGBA), dtype=np.uint8)
    results = MothDetectorPipeline().process(
        [ImageInput(id="g", url="", pixels=gray), ImageInput(id="a", url="", pixels=rgba)]
    )
    assert [len(r.detections) for r in results] == [1, 1]


@pytest.mark.parametrize(
    ("fraction", "label"),
    [
        (SMALL_MAX_FRACTION * 0.2, "small"),
        (SMALL_MAX_FRACTION * 0.9, "small"),
        (SMALL_MAX_FRACTION * 1.1, "medium"),
        (MEDIUM_MAX_FRACTION * 0.9, "medium"),
        (MEDIUM_MAX_FRACTION * 1.1, "large"),
        (0.2, "large"),
    ],
)
def test_size_class_thresholds(fraction: float, label: str) -> None:
    width, height = 4000, 2000
    side = float(np.sqrt(fraction * width * height))
    got, scores = size_class((10.0, 10.0, 10.0 + side, 10.0 + side), width, height)
    assert got == label
    assert len(scores) == 3
    assert scores.index(max(scores)) == SIZE_LABELS.index(label)


def test_config_and_registry() -> None:
    pipeline = available_pipelines()["moth-detector-cv"]()
    assert isinstance(pipeline, MothDetectorPipeline)
    assert pipeline.needs_pixels is True
    config = pipeline.config()
    assert config["slug"] == "moth-detector-cv"
    assert config["name"] == "Moth detector (CV)"
    detector, sizer = config["algorithms"]
    assert (detector["key"], detector["task_type"]) == (DETECTOR_KEY, "detection")
    assert (sizer["key"], sizer["task_type"]) == (SIZE_KEY, "classification")
    assert sizer["category_map"]["labels"] == ["small", "medium", "large"]


# --- shipped demo images -------------------------------------------------------------------


def demo_images() -> list[Path]:
    folder = Path(str(files("trapline") / "demo_images"))
    return sorted(folder.glob("*.jpg"))


def test_demo_images_ship_and_show_moths() -> None:
    paths = demo_images()
    assert len(paths) >= 3, "run scripts/make_demo_images.py"
    for path in paths:
        assert path.stat().st_size < 100_000, f"{path.name} is too big to ship"
        rgb = read_rgb(path)
        assert rgb.shape == (768, 1024, 3)
        # The generator draws 3 to 7 moths per image, well apart.
        assert 3 <= len(detect_insects(rgb)) <= 7, path.name


# --- real trap frames ----------------------------------------------------------------------

# Per image: (min, max) detections, points (original pixels) that must fall in a
# box (insects seen by eye), and points that must not (sheet studs, a lens smudge).
# Counts as of tuning, with room for small changes; the ranges are not a recall
# claim, the points are.
REAL: dict[str, tuple[tuple[int, int], list[tuple[int, int]], list[tuple[int, int]]]] = {
    "cyprus/141-20220916221959-snapshot.jpg": (
        (7, 14),
        [(2230, 680), (1258, 1645), (2405, 1620), (2350, 1940)],
        [(1141, 775), (690, 942), (3031, 775), (3485, 939), (3900, 600)],
    ),
    "cyprus/183-20220923220000-snapshot.jpg": (
        (9, 17),
        [(1931, 1741), (840, 1170), (3765, 945)],
        [(1141, 775), (690, 942), (3031, 775), (3485, 939)],
    ),
    "cyprus/84-20220916202959-snapshot.jpg": (
        (7, 14),
        [(831, 696), (810, 1141), (1975, 1542), (2370, 957)],
        [(1141, 775), (690, 942), (3031, 775), (3485, 939)],
    ),
    "denmark/20220810232637-00-16.jpg": ((1, 5), [(1791, 1119), (1072, 1495)], []),
    "denmark/20220810232855-00-20.jpg": ((1, 5), [(2140, 1646), (1072, 1495)], []),
    "denmark/20220811005907-00-78.jpg": ((10, 21), [(1152, 1399), (845, 2043)], []),
    "sequential/20220728232239-00-69.jpg": (
        (13, 26),
        [(1536, 930), (1668, 512), (901, 848), (2721, 834)],
        [],
    ),
    "sequential/20220728232322-00-70.jpg": ((13, 26), [(1536, 930), (1668, 512)], []),
    "sequential/20220728232445-00-71.jpg": ((15, 29), [(1536, 930), (1668, 512)], []),
    "sequential/20220728232552-00-72.jpg": ((13, 26), [(1536, 930), (1668, 512)], []),
    "sequential/20220728232652-00-74.jpg": ((15, 29), [(1560, 900), (1668, 512)], []),
}


@pytest.fixture(scope="module")
def real_detections() -> dict[str, list[RawDetection]]:
    if not IMAGES_DIR.is_dir():
        pytest.skip(
            f"real trap images not found at {IMAGES_DIR} (set TRAPLINE_TEST_IMAGES_DIR, "
            "or keep the shared data folder next to the repository)"
        )
    found: dict[str, list[RawDetection]] = {}
    for name in REAL:
        path = IMAGES_DIR / name
        if path.is_file():
            found[name] = detect_insects(read_rgb(path))
    return found


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_frame(name: str, real_detections: dict[str, list[RawDetection]]) -> None:
    if name not in real_detections:
        pytest.skip(f"{name} is not in {IMAGES_DIR}")
    detections = real_detections[name]
    (low, high), insects, not_insects = REAL[name]
    assert low <= len(detections) <= high, f"{len(detections)} detections"
    for x, y in insects:
        assert any(contains(d.bbox, x, y) for d in detections), f"insect at {(x, y)} missed"
    for x, y in not_insects:
        assert not any(contains(d.bbox, x, y) for d in detections), f"box over {(x, y)}"
    for d in detections:
        x1, y1, x2, y2 = d.bbox
        assert 0 <= x1 < x2 and 0 <= y1 < y2 and 0 < d.score <= 1
