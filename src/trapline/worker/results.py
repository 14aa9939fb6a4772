"""Conversion of pipeline results into Antenna result items.

Only fields Antenna's result schemas know are sent (``PipelineResultsResponse``
and ``PipelineResultsError``), so the same body is valid for Antenna and trapline.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from trapline.pipelines.base import Algorithm, ImageResult, Pipeline

JsonDict = dict[str, Any]


def utc_timestamp(when: datetime | None = None) -> str:
    """ISO 8601 UTC with a ``Z`` suffix, the form Antenna's examples use."""
    moment = (when or datetime.now(UTC)).astimezone(UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


class ResultConverter:
    """Turns one pipeline's :class:`ImageResult` objects into result items."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline_slug = pipeline.slug
        self._algorithms: list[Algorithm] = list(pipeline.algorithms())
        self._by_key = {a.key: a for a in self._algorithms}
        # The same for every item of this pipeline; built once.
        self._algorithm_configs: dict[str, JsonDict] = {
            a.key: {"name": a.name, "key": a.key, "task_type": a.task_type, "version": a.version}
            for a in self._algorithms
        }

    def _reference(self, key: str) -> JsonDict:
        algorithm = self._by_key.get(key)
        return {"name": algorithm.name if algorithm else key, "key": key}

    def success_item(
        self,
        reply_subject: str,
        image_id: str,
        image_url: str,
        result: ImageResult,
        *,
        timestamp: str | None = None,
    ) -> JsonDict:
        """A result item for an image the pipeline processed (``result.error`` must be None)."""
        stamp = timestamp or utc_timestamp()
        detections = []
        for det in result.detections:
            x1, y1, x2, y2 = (float(v) for v in det.bbox)
            detections.append(
                {
                    "source_image_id": image_id,
                    "bbox": {"x1": x1, "y1": y1, "x2": x2, "y2": y2},
                    "inference_time": float(det.inference_time),
                    "algorithm": self._reference(det.algorithm_key),
                    "timestamp": stamp,
                    "classifications": [
                        {
                            "classification": c.label,
                            "labels": list(c.labels),
                            "scores": [float(s) for s in c.scores],
                            "algorithm": self._reference(c.algorithm_key),
                            "terminal": bool(c.terminal),
                            "timestamp": stamp,
                        }
                        for c in det.classifications
                    ],
                }
            )
        return {
            "reply_subject": reply_subject,
            "result": {
                "pipeline": self.pipeline_slug,
                "algorithms": self._algorithm_configs,
                "total_time": float(result.seconds),
                "source_images": [{"id": image_id, "url": image_url}],
                "detections": detections,
                "errors": None,
            },
        }

    def item(
        self, reply_subject: str, image_id: str, image_url: str, result: ImageResult
    ) -> JsonDict:
        """Success or error item, whichever ``result`` is."""
        if result.error is not None:
            return error_item(reply_subject, image_id, result.error)
        return self.success_item(reply_subject, image_id, image_url, result)


def error_item(reply_subject: str, image_id: str, reason: str) -> JsonDict:
    """An error result: the server records the image as failed with ``reason``."""
    return {"reply_subject": reply_subject, "result": {"error": reason, "image_id": image_id}}


def is_error_item(item: JsonDict) -> bool:
    result = item.get("result")
    return isinstance(result, dict) and "error" in result


def item_image_id(item: JsonDict) -> str:
    """The image an item is about (error items name it; success items via source_images)."""
    result = item.get("result")
    if not isinstance(result, dict):
        return "?"
    if "image_id" in result:
        return str(result["image_id"])
    sources = result.get("source_images")
    if isinstance(sources, list) and sources and isinstance(sources[0], dict):
        return str(sources[0].get("id", "?"))
    return "?"


def item_subject(item: JsonDict) -> str:
    subject = item.get("reply_subject")
    return subject if isinstance(subject, str) else ""


def match_results(
    image_ids: Sequence[str], results: Sequence[ImageResult]
) -> list[ImageResult | None]:
    """Pair each input with its result: in order when ids line up, else by id; None if missing."""
    if len(results) == len(image_ids) and all(
        r.image_id == i for r, i in zip(results, image_ids, strict=True)
    ):
        return list(results)
    by_id: dict[str, ImageResult] = {}
    for result in results:
        by_id.setdefault(result.image_id, result)
    return [by_id.get(i) for i in image_ids]
