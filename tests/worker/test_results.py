"""Pipeline results → Antenna result items."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from tests.worker.pipelines import PixelPipeline
from trapline.pipelines.base import Classification, Detection, ImageResult
from trapline.pipelines.null import NullPipeline
from trapline.worker.client import JobRef
from trapline.worker.compute import build_items
from trapline.worker.leases import HeldTask
from trapline.worker.results import (
    ResultConverter,
    error_item,
    is_error_item,
    item_image_id,
    match_results,
    utc_timestamp,
)
from trapline.worker.tasks import Batch


def test_success_item_has_exactly_antenna_fields() -> None:
    converter = ResultConverter(PixelPipeline())
    result = ImageResult(
        image_id="1042",
        detections=[
            Detection(
                bbox=(812, 404.5, 901, 470),
                score=0.77,
                algorithm_key="box",
                inference_time=0.02,
                classifications=[Classification("big", ["big", "small"], [0.93, 0.07], "size")],
            )
        ],
        seconds=0.41,
    )
    item = converter.success_item("$JS.ACK.1", "1042", "https://x/1042.jpg", result, timestamp="T")
    assert item == {
        "reply_subject": "$JS.ACK.1",
        "result": {
            "pipeline": "pixels",
            "algorithms": {
                "box": {
                    "name": "Whole-image box",
                    "key": "box",
                    "task_type": "detection",
                    "version": 1,
                },
                "size": {
                    "name": "Size",
                    "key": "size",
                    "task_type": "classification",
                    "version": 1,
                },
            },
            "total_time": 0.41,
            "source_images": [{"id": "1042", "url": "https://x/1042.jpg"}],
            "detections": [
                {
                    "source_image_id": "1042",
                    "bbox": {"x1": 812.0, "y1": 404.5, "x2": 901.0, "y2": 470.0},
                    "inference_time": 0.02,
                    "algorithm": {"name": "Whole-image box", "key": "box"},
                    "timestamp": "T",
                    "classifications": [
                        {
                            "classification": "big",
                            "labels": ["big", "small"],
                            "scores": [0.93, 0.07],
                            "algorithm": {"name": "Size", "key": "size"},
                            "terminal": True,
                            "timestamp": "T",
                        }
                    ],
                }
            ],
            "errors": None,
        },
    }
    # Antenna's detection schema has no score field: it is not sent.
    assert "score" not in item["result"]["detections"][0]
    assert item_image_id(item) == "1042" and not is_error_item(item)


def test_error_item_and_unknown_algorithm_reference() -> None:
    assert error_item("S", "7", "image download failed: HTTP 404") == {
        "reply_subject": "S",
        "result": {"error": "image download failed: HTTP 404", "image_id": "7"},
    }
    converter = ResultConverter(NullPipeline())
    item = converter.item(
        "S", "7", "u", ImageResult("7", detections=[Detection((0, 0, 1, 1), 1.0, "mystery")])
    )
    assert item["result"]["detections"][0]["algorithm"] == {"name": "mystery", "key": "mystery"}
    failed = converter.item("S", "7", "u", ImageResult("7", error="pipeline exploded"))
    assert is_error_item(failed) and item_image_id(failed) == "7"


def test_timestamp_is_utc_with_z() -> None:
    assert (
        utc_timestamp(datetime(2026, 11, 28, 14, 0, 0, 123, tzinfo=UTC)) == "2026-11-28T14:00:00Z"
    )
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", utc_timestamp())


def test_match_results_by_order_by_id_and_missing() -> None:
    a, b = ImageResult("a"), ImageResult("b")
    assert match_results(["a", "b"], [a, b]) == [a, b]
    assert match_results(["a", "b"], [b, a]) == [a, b]
    assert match_results(["a", "b", "c"], [b]) == [None, b, None]


def _batch(*image_ids: str) -> Batch:
    tasks = [HeldTask(1, f"1:{i}", i, f"http://x/{i}", f"S{i}") for i in image_ids]
    return Batch(JobRef(1, "null"), tasks)


def test_build_items_covers_every_task_once() -> None:
    batch = _batch("a", "b", "c", "d")
    batch.errors["Sb"] = "image download failed: HTTP 404"
    converter = ResultConverter(NullPipeline())
    # The pipeline answered for a and c only (d is missing), and c has NaN scores.
    nan = ImageResult(
        "c",
        detections=[
            Detection(
                (0, 0, 1, 1), 1.0, "null", [Classification("x", ["x"], [float("nan")], "null")]
            )
        ],
    )
    items = build_items(batch, [ImageResult("a"), nan], converter, None)
    by_id = {item_image_id(i): i for i in items}
    assert sorted(by_id) == ["a", "b", "c", "d"] and len(items) == 4
    assert not is_error_item(by_id["a"])
    assert by_id["b"]["result"]["error"] == "image download failed: HTTP 404"
    assert by_id["c"]["result"]["error"].startswith("pipeline result could not be encoded")
    assert by_id["d"]["result"]["error"] == "pipeline returned no result for this image"

    failed = build_items(_batch("a", "b"), None, converter, "pipeline null failed: OSError: x")
    assert [i["result"]["error"] for i in failed] == ["pipeline null failed: OSError: x"] * 2
