"""Time the classical moth detector on real trap frames, single-threaded by default.

Run by hand from the repository root:

    python bench/bench_moth_detector.py [--images DIR] [--repeat 5] [--threads 1]
                                        [--overlays /tmp/moth_overlays]

Prints detections per image and the median and 95th-percentile seconds per frame
of ``MothDetectorPipeline.process`` on decoded pixels (JPEG decoding is timed
separately; a worker pays it whatever the pipeline). ``--overlays`` also writes
a PNG per image with the boxes drawn (orange small, green medium, blue large).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from trapline.pipelines.base import Detection, ImageInput
from trapline.pipelines.moth_detector import MothDetectorPipeline

DEFAULT_IMAGES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "trap-images"
COLOURS = {"small": (0, 160, 255), "medium": (0, 200, 0), "large": (255, 0, 0)}  # BGR


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, q in [0, 100]."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100.0 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def draw(bgr: npt.NDArray[np.uint8], detections: list[Detection], path: Path) -> None:
    """Write a 1400-px-wide overlay of the boxes, labelled with their score."""
    scale = 1400 / bgr.shape[1]
    small = np.asarray(
        cv2.resize(bgr, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA), dtype=np.uint8
    )
    for det in detections:
        label = det.classifications[0].label if det.classifications else "medium"
        x1, y1, x2, y2 = (round(v * scale) for v in det.bbox)
        colour = COLOURS.get(label, (0, 0, 255))
        cv2.rectangle(small, (x1 - 2, y1 - 2), (x2 + 2, y2 + 2), colour, 1)
        cv2.putText(
            small, f"{det.score:.2f}", (x1, y1 - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.35, colour, 1
        )
    cv2.imwrite(str(path), small)


def main() -> None:
    """Benchmark every JPEG under --images and print a per-image table and a summary."""
    parser = argparse.ArgumentParser(description="Benchmark the moth-detector-cv pipeline.")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per image")
    parser.add_argument("--threads", type=int, default=1, help="OpenCV threads (0: default)")
    parser.add_argument("--overlays", type=Path, default=None, help="folder for box overlays")
    args = parser.parse_args()

    if args.threads > 0:
        cv2.setNumThreads(args.threads)
    paths = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg"})
    if not paths:
        raise SystemExit(f"no JPEGs under {args.images.resolve()}")
    if args.overlays is not None:
        args.overlays.mkdir(parents=True, exist_ok=True)

    pipeline = MothDetectorPipeline()
    pipeline.load()
    frame_seconds: list[float] = []
    decode_seconds: list[float] = []
    print(f"OpenCV {cv2.__version__}, threads={cv2.getNumThreads()}, repeat={args.repeat}")
    print(f"{'image':48s} {'size':>10s} {'dets':>4s} {'small/med/large':>18s} {'median s':>9s}")
    for path in paths:
        start = time.perf_counter()
        bgr = cv2.imread(str(path))
        if bgr is None:
            print(f"{path.name}: cannot decode")
            continue
        rgb = np.asarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), dtype=np.uint8)
        decode_seconds.append(time.perf_counter() - start)
        image = ImageInput(id=path.name, url=str(path), pixels=rgb)
        pipeline.process([image])  # warm-up: first-call allocations and code paths
        times: list[float] = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            [result] = pipeline.process([image])
            times.append(time.perf_counter() - start)
        frame_seconds.extend(times)
        if result.error:
            print(f"{path.name}: error {result.error}")
            continue
        labels = [d.classifications[0].label for d in result.detections]
        sizes = "/".join(str(labels.count(k)) for k in ("small", "medium", "large"))
        name = f"{path.parent.name}/{path.name}"
        h, w = rgb.shape[:2]
        print(
            f"{name:48s} {w:>5d}x{h:<4d} {len(result.detections):4d} {sizes:>18s} "
            f"{statistics.median(times):9.3f}"
        )
        if args.overlays is not None:
            draw(
                np.asarray(bgr, dtype=np.uint8),
                result.detections,
                args.overlays / f"{path.stem}.png",
            )

    print(
        f"\nper frame over {len(frame_seconds)} runs: "
        f"median {statistics.median(frame_seconds):.3f} s, "
        f"p95 {percentile(frame_seconds, 95):.3f} s, max {max(frame_seconds):.3f} s"
    )
    print(f"JPEG decode (not included above): median {statistics.median(decode_seconds):.3f} s")


if __name__ == "__main__":
    main()
