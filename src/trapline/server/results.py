"""Validation of one result item (Antenna's result shapes), item by item.

Each item stands alone: a bad item is rejected with a reason while the others
of the same POST are applied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class _Loose(BaseModel):
    # Workers send fields we don't know (client_info, …); they are accepted and ignored.
    model_config = ConfigDict(extra="allow")


class BBox(_Loose):
    x1: float
    y1: float
    x2: float
    y2: float

    @field_validator("x1", "y1", "x2", "y2")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be finite")
        return v


class AlgorithmRef(_Loose):
    name: str | None = None
    key: str | None = None


class ClassificationIn(_Loose):
    classification: str
    labels: list[str] | None = None
    scores: list[float] = Field(default_factory=list)
    logits: list[float] | None = None
    algorithm: AlgorithmRef | None = None
    terminal: bool = True
    timestamp: str | None = None


class DetectionIn(_Loose):
    source_image_id: str
    bbox: BBox | None = None
    inference_time: float | None = None
    algorithm: AlgorithmRef | None = None
    timestamp: str | None = None
    classifications: list[ClassificationIn] = Field(default_factory=list)

    @field_validator("source_image_id", mode="before")
    @classmethod
    def _id_str(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) else v


class SourceImage(_Loose):
    id: str
    url: str | None = None

    @field_validator("id", mode="before")
    @classmethod
    def _id_str(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) else v


class SuccessResult(_Loose):
    pipeline: str | None = None
    algorithms: dict[str, Any] = Field(default_factory=dict)
    total_time: float | None = None
    source_images: list[SourceImage]
    detections: list[DetectionIn] = Field(default_factory=list)


@dataclass
class CheckedItem:
    """One result item after validation: an outcome for one image, or a rejection."""

    index: int
    reply_subject: str
    image_id: str | None = None
    error: str | None = None
    success: SuccessResult | None = None
    rejected: str | None = None
    detections: list[DetectionIn] = field(default_factory=list)


def check_item(index: int, item: Any) -> CheckedItem:
    """Validate shape and content; the receipt itself is checked against the ledger later."""
    if not isinstance(item, dict):
        return CheckedItem(index, "", rejected="item must be an object")
    subject = item.get("reply_subject")
    checked = CheckedItem(index, subject if isinstance(subject, str) else "")
    result = item.get("result")
    if not isinstance(result, dict):
        checked.rejected = "result must be an object"
        return checked
    if "error" in result and result.get("error") is not None:
        error = result.get("error")
        image_id = result.get("image_id")
        if not isinstance(error, str) or not error.strip():
            checked.rejected = "error must be a non-empty string"
        elif image_id is None or (isinstance(image_id, str) and not image_id.strip()):
            checked.rejected = "error result names no image_id"
        else:
            checked.image_id = str(image_id)
            checked.error = error.strip()[:2000]
        return checked
    try:
        success = SuccessResult.model_validate(result)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        checked.rejected = f"invalid result: {where}: {first['msg']}"
        return checked
    if len(success.source_images) != 1:
        checked.rejected = (
            "result must name exactly one source image"
            if success.source_images
            else "result names no source image"
        )
        return checked
    image_id = success.source_images[0].id
    for det in success.detections:
        if det.source_image_id != image_id:
            checked.rejected = (
                f"detection names source image {det.source_image_id!r}, result is for {image_id!r}"
            )
            return checked
        if det.bbox is not None and (det.bbox.x2 < det.bbox.x1 or det.bbox.y2 < det.bbox.y1):
            checked.rejected = "bbox has x2 < x1 or y2 < y1"
            return checked
    checked.image_id = image_id
    checked.success = success
    return checked
