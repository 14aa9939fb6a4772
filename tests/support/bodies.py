"""Request bodies as an Antenna worker sends them."""

from __future__ import annotations

from typing import Any


def image_list(n: int, start: int = 1) -> list[dict[str, str]]:
    return [
        {"id": str(i), "url": f"https://images.example.org/{i}.jpg"}
        for i in range(start, start + n)
    ]


def success(task: dict[str, Any], detections: int = 1) -> dict[str, Any]:
    image_id = task["image_id"]
    return {
        "reply_subject": task["reply_subject"],
        "result": {
            "pipeline": "null",
            "algorithms": {
                "null": {"name": "Null", "key": "null", "task_type": "detection", "version": 1}
            },
            "total_time": 0.01,
            "source_images": [{"id": image_id, "url": task["image_url"]}],
            "detections": [
                {
                    "source_image_id": image_id,
                    "bbox": {"x1": 10.0 + k, "y1": 20.0, "x2": 50.0 + k, "y2": 60.0},
                    "inference_time": 0.01,
                    "algorithm": {"name": "Null", "key": "null"},
                    "timestamp": "2026-11-28T14:00:00Z",
                    "classifications": [
                        {
                            "classification": "insect",
                            "labels": ["insect", "not-insect"],
                            "scores": [0.9, 0.1],
                            "algorithm": {"name": "Size", "key": "size"},
                            "terminal": True,
                            "timestamp": "2026-11-28T14:00:00Z",
                        }
                    ],
                }
                for k in range(detections)
            ],
            "errors": None,
        },
    }


def failure(
    task: dict[str, Any], reason: str = "image download failed: HTTP 404"
) -> dict[str, Any]:
    return {
        "reply_subject": task["reply_subject"],
        "result": {"error": reason, "image_id": task["image_id"]},
    }
