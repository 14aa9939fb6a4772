"""Pipelines: the plugin interface and the built-in pipelines."""

from trapline.pipelines.base import (
    Algorithm,
    Classification,
    Detection,
    ImageInput,
    ImageResult,
    Pipeline,
)
from trapline.pipelines.registry import available_pipelines, load_pipeline

__all__ = [
    "Algorithm",
    "Classification",
    "Detection",
    "ImageInput",
    "ImageResult",
    "Pipeline",
    "available_pipelines",
    "load_pipeline",
]
