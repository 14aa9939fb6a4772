"""The ONNX pipeline: a detector, optionally a crop classifier, described by a TOML file.

Construction checks the files (models exist, labels readable) so a bad path
fails when the worker starts; :meth:`OnnxPipeline.load` creates the sessions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import cast

from trapline.errors import PipelineError
from trapline.pipelines.base import (
    Algorithm,
    Classification,
    Detection,
    ImageInput,
    ImageResult,
    Pipeline,
    RGBImage,
)
from trapline.pipelines.onnx.classifier import Classifier
from trapline.pipelines.onnx.config import OnnxPipelineConfig, load_config
from trapline.pipelines.onnx.detector import Box, Detector
from trapline.pipelines.onnx.preprocess import Geometry, Tensor, as_rgb, crop, prepare

logger = logging.getLogger(__name__)


def read_labels(path: Path, role: str) -> list[str]:
    """One label per line; trailing blank lines are ignored, blank lines inside are errors."""
    try:
        # utf-8-sig: label files saved on Windows often start with a BOM.
        lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    except FileNotFoundError as exc:
        raise PipelineError(f"{role} labels file not found: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(f"cannot read {role} labels file {path}: {exc}") from exc
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise PipelineError(f"{role} labels file {path} has no labels")
    blank = [n for n, line in enumerate(lines, start=1) if not line]
    if blank:
        # A blank line inside would shift every later label by one class index.
        raise PipelineError(f"{role} labels file {path} has a blank line at line {blank[0]}")
    if len(set(lines)) != len(lines):
        logger.warning("%s labels file %s repeats some labels", role, path)
    return lines


def _labels(inline: list[str] | None, file: Path | None, role: str) -> list[str] | None:
    if inline is not None:
        return list(inline)
    if file is not None:
        return read_labels(file, role)
    return None


class OnnxPipeline(Pipeline):
    """Runs an ONNX detector (and crop classifier) configured by an :class:`OnnxPipelineConfig`.

    Make instances with :meth:`from_config`: the class attributes the worker reads
    (``slug``, ``name``, ...) come from the file, so each file gets its own subclass.
    """

    needs_pixels = True

    def __init__(self, config: OnnxPipelineConfig) -> None:
        if type(self) is OnnxPipeline:
            # The base class has no slug or name; those belong to a file's subclass.
            raise TypeError("make ONNX pipelines with OnnxPipeline.from_config(config)")
        self.settings = config
        det = config.detector
        if not det.model.is_file():
            raise PipelineError(f"detector model file not found: {det.model}")
        self.detector = Detector(
            det,
            _labels(det.labels, det.labels_file, "detector"),
            det.key or f"{config.pipeline.slug}-detector",
        )
        self.classifier: Classifier | None = None
        if config.classifier is not None:
            cls = config.classifier
            if not cls.model.is_file():
                raise PipelineError(f"classifier model file not found: {cls.model}")
            labels = _labels(cls.labels, cls.labels_file, "classifier")
            assert labels is not None  # the schema requires labels or labels_file
            self.classifier = Classifier(
                cls, labels, cls.key or f"{config.pipeline.slug}-classifier"
            )
        self._loaded = False

    @classmethod
    def from_config(cls, config: OnnxPipelineConfig) -> OnnxPipeline:
        """A (not yet loaded) pipeline instance for ``config``."""
        section = config.pipeline
        subclass = type(
            f"OnnxPipeline_{section.slug.replace('-', '_')}",
            (cls,),
            {
                "slug": section.slug,
                "name": section.name,
                "version": section.version,
                "description": section.description,
                "__doc__": section.description or cls.__doc__,
            },
        )
        return cast(type[OnnxPipeline], subclass)(config)

    def load(self) -> None:
        """Create the onnxruntime sessions; PipelineError when a model does not fit its config."""
        if self._loaded:
            return
        self.detector.load(self.settings.runtime)
        if self.classifier is not None:
            self.classifier.load(self.settings.runtime)
        self._loaded = True

    def algorithms(self) -> list[Algorithm]:
        algorithms = [self.detector.algorithm(self.version)]
        if self.classifier is not None:
            algorithms.append(self.classifier.algorithm(self.version))
        return algorithms

    def process(self, images: Sequence[ImageInput]) -> list[ImageResult]:
        if not self._loaded:
            raise PipelineError(f"pipeline {self.slug!r} is not loaded; call load() first")
        errors: dict[int, str] = {}
        seconds = [0.0] * len(images)
        rgbs: dict[int, RGBImage] = {}  # images that made it into ``tensors``, in order
        tensors: list[Tensor] = []
        geometries: list[Geometry] = []
        for i, image in enumerate(images):
            start = time.perf_counter()
            try:
                if image.pixels is None:
                    raise ValueError("no pixels: the image was not decoded")
                rgb = as_rgb(image.pixels)
                tensor, geometry = prepare(rgb, self.detector.spec)
            except Exception as exc:
                errors[i] = f"{type(exc).__name__}: {exc}"
            else:
                rgbs[i] = rgb
                tensors.append(tensor)
                geometries.append(geometry)
            seconds[i] += time.perf_counter() - start

        boxes: dict[int, list[Box]] = {}
        start = time.perf_counter()
        outcomes = self.detector.detect(tensors, geometries)
        # Decoding and NMS time, shared out like the model time.
        overhead = (
            time.perf_counter()
            - start
            - sum(o.seconds for o in outcomes if not isinstance(o, Exception))
        ) / max(1, len(outcomes))
        for i, outcome in zip(rgbs, outcomes, strict=True):
            seconds[i] += overhead
            if isinstance(outcome, Exception):
                errors[i] = f"detector: {type(outcome).__name__}: {outcome}"
                continue
            seconds[i] += outcome.seconds
            boxes[i] = outcome.boxes

        classes: dict[int, list[Classification]] = {}
        if self.classifier is not None:
            classes = self._classify(rgbs, boxes, seconds, errors)

        results: list[ImageResult] = []
        for i, image in enumerate(images):
            if i in errors:
                logger.warning(
                    "onnx pipeline %s failed on image %s: %s", self.slug, image.id, errors[i]
                )
                results.append(ImageResult(image_id=image.id, error=errors[i], seconds=seconds[i]))
                continue
            try:
                detections = self._detections(boxes[i], classes.get(i), seconds[i])
            except Exception as exc:
                message = f"{type(exc).__name__}: {exc}"
                logger.warning(
                    "onnx pipeline %s failed on image %s: %s", self.slug, image.id, message
                )
                results.append(ImageResult(image_id=image.id, error=message, seconds=seconds[i]))
                continue
            results.append(
                ImageResult(image_id=image.id, detections=detections, seconds=seconds[i])
            )
        return results

    def _classify(
        self,
        rgbs: dict[int, RGBImage],
        boxes: dict[int, list[Box]],
        seconds: list[float],
        errors: dict[int, str],
    ) -> dict[int, list[Classification]]:
        """Classify every box of every image in one go (batches span images)."""
        assert self.classifier is not None
        owners: list[tuple[int, int]] = []  # (image, detection) of each crop
        crops: list[RGBImage] = []
        margin = self.classifier.section.crop_margin
        for i, image_boxes in boxes.items():
            for j, box in enumerate(image_boxes):
                crops.append(crop(rgbs[i], box.bbox, margin))
                owners.append((i, j))
        out: dict[int, list[Classification]] = {i: [] for i in boxes}
        start = time.perf_counter()
        outcomes = self.classifier.classify(crops)
        overhead = (time.perf_counter() - start) / max(1, len(crops))
        for (i, j), outcome in zip(owners, outcomes, strict=True):
            seconds[i] += overhead
            if isinstance(outcome, Exception):
                # A detection without its class would read as unclassified: fail the image.
                reason = f"{type(outcome).__name__}: {outcome}"
                errors.setdefault(i, f"classifier on detection {j}: {reason}")
                continue
            out[i].append(outcome.classification)
        return out

    def _detections(
        self, boxes: list[Box], classes: list[Classification] | None, seconds: float
    ) -> list[Detection]:
        detections: list[Detection] = []
        for n, box in enumerate(boxes):
            found: list[Classification] = []
            own = self.detector.classification(box, terminal=classes is None)
            if own is not None:
                found.append(own)
            if classes is not None:
                found.append(classes[n])
            detections.append(
                Detection(
                    bbox=box.bbox,
                    score=box.score,
                    algorithm_key=self.detector.key,
                    classifications=found,
                    # One pass of each model per image: every box shares the image's time.
                    inference_time=seconds,
                )
            )
        return detections


def load_pipeline_file(path: Path) -> Pipeline:
    """The pipeline a TOML file describes, not yet loaded (``load()`` creates the sessions).

    Raises PipelineError for an unreadable or invalid file, or a missing model or
    labels file. Works without onnxruntime installed; ``load()`` then says to
    install ``trapline[onnx]``.
    """
    return OnnxPipeline.from_config(load_config(Path(path)))
