"""The ``null`` pipeline: no detections, no pixels needed. For tests and orchestration benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

from trapline.pipelines.base import Algorithm, ImageInput, ImageResult, Pipeline


class NullPipeline(Pipeline):
    """Answers every image with an empty result without downloading it."""

    slug = "null"
    name = "Null pipeline"
    description = "Produces no detections; skips downloads. For tests and benchmarks."
    needs_pixels = False

    def algorithms(self) -> list[Algorithm]:
        return [Algorithm(key="null", name="Null detector")]

    def process(self, images: Sequence[ImageInput]) -> list[ImageResult]:
        return [ImageResult(image_id=image.id) for image in images]
