"""Test pipelines for chaos scenarios: one detection per image, optional compute time and failures.

Usable in-process (``pipeline_factory``) and in worker subprocesses through
:mod:`tests.chaos.worker_main`. They need no pixels, so no image is downloaded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from trapline.pipelines.base import (
    Algorithm,
    Classification,
    Detection,
    ImageInput,
    ImageResult,
    Pipeline,
)

ONE_BOX = "one-box"
FAIL_REASON = "injected failure"


class OneBoxPipeline(Pipeline):
    """One detection per image; ``compute_s`` of sleep per batch; images in ``fail_ids`` fail."""

    slug = ONE_BOX
    name = "One box per image (test)"
    description = "One detection per image, for exact counts under faults."
    needs_pixels = False

    def __init__(self, compute_s: float = 0.0, fail_ids: frozenset[str] = frozenset()) -> None:
        self.compute_s = compute_s
        self.fail_ids = fail_ids
        self.batches = 0

    def algorithms(self) -> list[Algorithm]:
        return [
            Algorithm(key="one-box", name="One box"),
            Algorithm(key="one-class", name="One class", task_type="classification"),
        ]

    def process(self, images: Sequence[ImageInput]) -> list[ImageResult]:
        self.batches += 1
        if self.compute_s:
            time.sleep(self.compute_s)
        results = []
        for image in images:
            if image.id in self.fail_ids:
                results.append(ImageResult(image_id=image.id, error=FAIL_REASON))
                continue
            box = Detection(
                bbox=(10.0, 20.0, 50.0, 60.0),
                score=0.9,
                algorithm_key="one-box",
                classifications=[
                    Classification(
                        label="insect",
                        labels=["insect", "not-insect"],
                        scores=[0.9, 0.1],
                        algorithm_key="one-class",
                    )
                ],
            )
            results.append(ImageResult(image_id=image.id, detections=[box]))
        return results


def factory(
    compute_s: float = 0.0, fail_ids: frozenset[str] = frozenset()
) -> Callable[[str], Pipeline]:
    """A ``pipeline_factory`` for :func:`trapline.worker.run_worker` that knows ``one-box``."""

    def make(slug: str) -> Pipeline:
        if slug != ONE_BOX:
            raise ValueError(f"test factory only makes {ONE_BOX!r}, not {slug!r}")
        return OneBoxPipeline(compute_s, fail_ids)

    return make
