"""The pipeline interface: what a worker runs on a batch of images.

A pipeline turns decoded images into per-image results (detections with
classifications, or an error). It declares whether it needs pixels at all, so
a worker can skip downloads for pipelines that do not (``null``).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

RGBImage = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class Algorithm:
    """One algorithm of a pipeline, in Antenna's algorithm config shape."""

    key: str
    name: str
    task_type: str = "detection"
    version: int = 1
    description: str = ""
    category_map: dict[str, Any] | None = None

    def as_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "name": self.name,
            "key": self.key,
            "task_type": self.task_type,
            "version": self.version,
            "description": self.description,
        }
        if self.category_map is not None:
            config["category_map"] = self.category_map
        return config


@dataclass
class ImageInput:
    """One image handed to a pipeline. ``pixels`` is RGB (H, W, 3) or None if not needed."""

    id: str
    url: str
    pixels: RGBImage | None = None


@dataclass
class Classification:
    label: str
    labels: list[str]
    scores: list[float]
    algorithm_key: str
    terminal: bool = True


@dataclass
class Detection:
    """A box in original pixel coordinates (x1, y1, x2, y2) with its classifications."""

    bbox: tuple[float, float, float, float]
    score: float
    algorithm_key: str
    classifications: list[Classification] = field(default_factory=list)
    inference_time: float = 0.0


@dataclass
class ImageResult:
    """The outcome of one image: detections, or an error with its reason."""

    image_id: str
    detections: list[Detection] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0


class Pipeline(abc.ABC):
    """A processing pipeline. Subclasses set the class attributes and implement ``process``."""

    slug: ClassVar[str]
    name: ClassVar[str]
    version: ClassVar[int] = 1
    description: ClassVar[str] = ""
    needs_pixels: ClassVar[bool] = True

    def load(self) -> None:  # noqa: B027 - optional hook
        """Load models. Called once before the worker reserves anything; raise PipelineError."""

    @abc.abstractmethod
    def algorithms(self) -> list[Algorithm]:
        """The algorithms this pipeline runs, first the detector."""

    @abc.abstractmethod
    def process(self, images: Sequence[ImageInput]) -> list[ImageResult]:
        """Process a batch; one result per input, in order. Per-image failures go in ``error``."""

    def config(self) -> dict[str, Any]:
        """This pipeline as Antenna's pipeline registration entry."""
        return {
            "name": self.name,
            "slug": self.slug,
            "version": self.version,
            "description": self.description,
            "algorithms": [a.as_config() for a in self.algorithms()],
            "stages": [],
        }
