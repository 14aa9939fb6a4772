"""Test pipelines for worker tests; all state is per instance, so no test leaks into another.

Hand a test's own instances to the worker with :func:`factory`; slugs without
an instance get a fresh one of :data:`TEST_PIPELINES`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

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

# A gated batch that is never let through gives up after this long (a test that failed
# must not leave a compute thread blocked for ever).
GATE_LIMIT_S = 30.0


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
    """Like ``null``, but each batch waits to be let through.

    ``let_through(n)`` lets ``n`` more batches pass, ``open()`` all of them from
    now on. ``started`` is set when the first batch arrives; ``batches`` counts
    the batches that arrived, ``passed`` those that went through.
    """

    slug = "gated"

    def __init__(self) -> None:
        self.started = threading.Event()
        self._open = threading.Event()
        self._permits = threading.Semaphore(0)
        self._lock = threading.Lock()
        self.batches = 0
        self.passed = 0

    def open(self) -> None:
        self._open.set()

    def let_through(self, batches: int = 1) -> None:
        self._permits.release(batches)

    def process(self, images: Sequence[ImageInput]) -> list[ImageResult]:
        with self._lock:
            self.batches += 1
        self.started.set()
        deadline = time.monotonic() + GATE_LIMIT_S
        while not self._open.is_set() and not self._permits.acquire(timeout=0.01):
            if time.monotonic() > deadline:
                raise RuntimeError("gated batch never let through")
        with self._lock:
            self.passed += 1
        return super().process(images)


class RaisingPipeline(NullPipeline):
    slug = "raising"

    def process(self, images: Sequence[ImageInput]) -> list[ImageResult]:
        raise RuntimeError("CUDA error: device-side assert triggered")


class GarbagePipeline(NullPipeline):
    """Breaks the interface: odd batches return None, even ones malformed detections."""

    slug = "garbage"

    def __init__(self) -> None:
        self.calls = 0

    def process(self, images: Sequence[ImageInput]) -> list[ImageResult]:
        self.calls += 1
        if self.calls % 2:
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
        RaisingPipeline,
        GarbagePipeline,
        BrokenLoadPipeline,
    )
}


def factory(*instances: Pipeline) -> Callable[[str], Pipeline]:
    """A ``pipeline_factory`` giving these instances for their slugs, fresh test pipelines else."""
    given = {p.slug: p for p in instances}

    def make(slug: str) -> Pipeline:
        return given[slug] if slug in given else TEST_PIPELINES[slug]()

    return make
