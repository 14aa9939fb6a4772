"""Pipeline discovery through the ``trapline.pipelines`` entry-point group."""

from __future__ import annotations

from importlib.metadata import entry_points

from trapline.errors import PipelineError
from trapline.pipelines.base import Pipeline

GROUP = "trapline.pipelines"


def available_pipelines() -> dict[str, type[Pipeline]]:
    """Every installed pipeline class by slug."""
    found: dict[str, type[Pipeline]] = {}
    for ep in entry_points(group=GROUP):
        cls = ep.load()
        if not (isinstance(cls, type) and issubclass(cls, Pipeline)):
            raise PipelineError(f"entry point {ep.name!r} does not name a Pipeline subclass")
        found[cls.slug] = cls
    return found


def load_pipeline(slug: str) -> Pipeline:
    """Instantiate and load the pipeline ``slug``; PipelineError names what is installed."""
    classes = available_pipelines()
    if slug not in classes:
        raise PipelineError(f"unknown pipeline {slug!r}; installed: {', '.join(sorted(classes))}")
    pipeline = classes[slug]()
    pipeline.load()
    return pipeline
