"""The detector stage: decode a box model's outputs, threshold, map back, NMS.

Two output layouts are read:

- ``boxes_scores``: boxes ``[N, 4]``, scores ``[N]`` (or per-class ``[N, C]``),
  optional label ids ``[N]``; each may carry a leading batch axis;
- ``yolo``: one ``[1, N, 4+C]`` or ``[1, 4+C, N]`` tensor of box + class scores
  (YOLOv5-style exports add an objectness column: ``4+1+C``).

Thresholding happens first (cheap, drops most of a YOLO grid), NMS last, on
boxes already in original pixels and clipped, which is what a user sees.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from trapline.errors import PipelineError
from trapline.pipelines.base import Algorithm, Classification
from trapline.pipelines.onnx.config import DetectorOutput, DetectorSection, RuntimeSection
from trapline.pipelines.onnx.preprocess import Geometry, InputSpec, Tensor
from trapline.pipelines.onnx.runtime import Array, OnnxModel

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoxFormat = Literal["xyxy", "cxcywh", "yxyx"]


@dataclass(frozen=True)
class Candidates:
    """One image's decoded boxes (x1, y1, x2, y2 in model-input pixels), before any filtering."""

    boxes: FloatArray
    scores: FloatArray
    class_ids: IntArray | None = None
    class_scores: FloatArray | None = None


@dataclass(frozen=True)
class Box:
    """A kept detection in original pixels, with the detector's class when it has one."""

    bbox: tuple[float, float, float, float]
    score: float
    class_id: int | None = None
    class_scores: tuple[float, ...] | None = None


def to_xyxy(
    raw: Array, box_format: BoxFormat, normalized: bool, width: int, height: int
) -> FloatArray:
    """Boxes (N, 4) in any supported format as x1, y1, x2, y2 in model-input pixels."""
    b = np.asarray(raw, dtype=np.float64).reshape(-1, 4)
    if box_format == "cxcywh":
        half_w, half_h = b[:, 2] / 2.0, b[:, 3] / 2.0
        out = np.stack([b[:, 0] - half_w, b[:, 1] - half_h, b[:, 0] + half_w, b[:, 1] + half_h], 1)
    elif box_format == "yxyx":
        out = b[:, [1, 0, 3, 2]]
    else:
        out = b.copy()
    if normalized:
        out *= np.array([width, height, width, height], dtype=np.float64)
    return out


def _single(array: Array, what: str) -> Array:
    """``array``'s only item along its leading (batch) axis."""
    if array.ndim == 0 or array.shape[0] != 1:
        raise ValueError(f"{what} output has shape {array.shape}; a batch of 1 expected")
    inner: Array = array[0]
    return inner


def decode_boxes_scores(
    boxes: Array,
    scores: Array,
    labels: Array | None,
    output: DetectorOutput,
    width: int,
    height: int,
) -> Candidates:
    """Read a boxes + scores (+ labels) model's outputs for one image."""
    boxes, scores = np.asarray(boxes), np.asarray(scores)
    if boxes.ndim == 3:
        # A batch axis on the boxes means one on every output (here, a batch of 1).
        boxes, scores = _single(boxes, "boxes"), _single(scores, "scores")
        labels = _single(np.asarray(labels), "labels") if labels is not None else None
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes output has shape {boxes.shape}; [N, 4] expected")
    n = boxes.shape[0]
    xyxy = to_xyxy(
        boxes, output.resolved_box_format, output.box_units == "normalized", width, height
    )
    score_array = np.asarray(scores, dtype=np.float64)
    if score_array.shape[:1] != (n,) or score_array.ndim not in (1, 2):
        raise ValueError(f"scores output has shape {score_array.shape}; [{n}] or [{n}, C] expected")
    class_ids: IntArray | None = None
    if labels is not None:
        label_array = np.asarray(labels)
        if label_array.shape != (n,):
            raise ValueError(f"labels output has shape {label_array.shape}; [{n}] expected")
        # Some exporters emit class ids as floats.
        class_ids = np.rint(label_array).astype(np.int64)
    if score_array.ndim == 1:
        return Candidates(xyxy, score_array, class_ids)
    # Per-class scores: the box's class is the labels output's, else the best column.
    if class_ids is None:
        class_ids = np.argmax(score_array, axis=1).astype(np.int64)
    if n and (class_ids.min() < 0 or class_ids.max() >= score_array.shape[1]):
        raise ValueError(f"label ids outside the {score_array.shape[1]} score columns")
    best = score_array[np.arange(n), class_ids]
    return Candidates(xyxy, best, class_ids, score_array)


def yolo_attributes(output: DetectorOutput, n_labels: int | None) -> int | None:
    """Length of one YOLO detection row (box, objectness, classes), when the labels tell it."""
    if n_labels is None:
        return None
    return (5 if output.objectness else 4) + n_labels


def decode_yolo(
    raw: Array, output: DetectorOutput, n_labels: int | None, width: int, height: int
) -> Candidates:
    """Read a YOLO-style ``[N, 4+C]`` / ``[4+C, N]`` output (optional batch axis of 1)."""
    table = np.asarray(raw, dtype=np.float64)
    if table.ndim == 3:
        table = _single(table, "yolo")
    if table.ndim != 2:
        raise ValueError(
            f"yolo output has shape {np.shape(raw)}; [1, N, 4+C] or [1, 4+C, N] expected"
        )
    layout = output.yolo_layout
    if layout == "auto":
        rows, cols = table.shape
        width_needed = yolo_attributes(output, n_labels)
        if width_needed is None:
            # Anchors far outnumber 4 + classes in any real export (8400 vs 84).
            layout = "attributes_first" if rows < cols else "detections_first"
        elif cols == width_needed and rows != width_needed:
            layout = "detections_first"
        elif rows == width_needed and cols != width_needed:
            layout = "attributes_first"
        elif rows == cols == width_needed:
            raise ValueError(
                f"yolo output shape {table.shape} is ambiguous; "
                "set yolo_layout in [detector.output]"
            )
        else:
            raise ValueError(
                f"yolo output has shape {table.shape}; no axis of {width_needed} "
                f"(box + {'objectness + ' if output.objectness else ''}{n_labels} labels)"
            )
    if layout == "attributes_first":
        table = table.T
    first_class = 5 if output.objectness else 4
    if table.shape[1] <= first_class:
        raise ValueError(f"yolo output rows have {table.shape[1]} values; no class scores")
    class_scores = table[:, first_class:]
    if output.objectness:
        class_scores = class_scores * table[:, 4:5]
    if n_labels is not None and class_scores.shape[1] != n_labels:
        raise ValueError(f"yolo output has {class_scores.shape[1]} classes but {n_labels} labels")
    n = table.shape[0]
    class_ids = np.argmax(class_scores, axis=1).astype(np.int64) if n else np.zeros(0, np.int64)
    scores = class_scores[np.arange(n), class_ids] if n else np.zeros(0)
    xyxy = to_xyxy(
        table[:, :4], output.resolved_box_format, output.box_units == "normalized", width, height
    )
    return Candidates(xyxy, scores, class_ids, class_scores)


def nms(
    boxes: FloatArray,
    scores: FloatArray,
    iou_threshold: float,
    limit: int,
    class_ids: IntArray | None = None,
) -> IntArray:
    """Greedy non-maximum suppression: indices kept, best first, at most ``limit``.

    A box is dropped when its IoU with a kept, higher-scoring box exceeds the
    threshold (so 1.0 keeps everything). With ``class_ids`` only boxes of the
    same class suppress each other.
    """
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    b = np.asarray(boxes, dtype=np.float64)
    if class_ids is not None:
        # Move each class to its own region: boxes of different classes never overlap.
        span = float(b.max() - b.min()) + 1.0
        b = b + (class_ids.astype(np.float64) * span)[:, None]
    areas = np.maximum(b[:, 2] - b[:, 0], 0.0) * np.maximum(b[:, 3] - b[:, 1], 0.0)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size and len(keep) < limit:
        best = int(order[0])
        keep.append(best)
        rest = order[1:]
        w = np.minimum(b[best, 2], b[rest, 2]) - np.maximum(b[best, 0], b[rest, 0])
        h = np.minimum(b[best, 3], b[rest, 3]) - np.maximum(b[best, 1], b[rest, 1])
        inter = np.maximum(w, 0.0) * np.maximum(h, 0.0)
        union = areas[best] + areas[rest] - inter
        iou = inter / np.maximum(union, 1e-12)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def select(candidates: Candidates, geometry: Geometry, section: DetectorSection) -> list[Box]:
    """Threshold, map to original pixels (clipped), drop empty boxes, NMS, cap the count."""
    boxes, scores = candidates.boxes, candidates.scores
    keep = np.isfinite(scores) & (scores >= section.score_threshold) & np.isfinite(boxes).all(1)
    mapped = geometry.to_original(boxes[keep])
    kept_scores = scores[keep]
    # Boxes wholly in the letterbox padding (or inverted) have no area once clipped.
    valid = (mapped[:, 2] > mapped[:, 0]) & (mapped[:, 3] > mapped[:, 1])
    index = np.flatnonzero(keep)[valid]
    mapped, kept_scores = mapped[valid], kept_scores[valid]
    class_ids = candidates.class_ids[index] if candidates.class_ids is not None else None
    order = nms(
        mapped,
        kept_scores,
        section.iou_threshold,
        section.max_detections,
        None if section.class_agnostic_nms else class_ids,
    )
    out: list[Box] = []
    for i in order:
        x1, y1, x2, y2 = (float(v) for v in mapped[i])
        class_scores = None
        if candidates.class_scores is not None:
            class_scores = tuple(float(v) for v in candidates.class_scores[index[i]])
        out.append(
            Box(
                bbox=(x1, y1, x2, y2),
                score=float(kept_scores[i]),
                class_id=int(class_ids[i]) if class_ids is not None else None,
                class_scores=class_scores,
            )
        )
    return out


@dataclass(frozen=True)
class Detected:
    """One image's kept boxes and the model time spent on it."""

    boxes: list[Box]
    seconds: float


class Detector:
    """The box model of an ONNX pipeline; :meth:`load` creates the session."""

    def __init__(self, section: DetectorSection, labels: list[str] | None, key: str) -> None:
        self.section = section
        self.labels = labels
        self.key = key
        self.spec = InputSpec.of(section)
        self.model: OnnxModel | None = None
        self._outputs: list[str] = []

    def algorithm(self, version: int) -> Algorithm:
        category_map: dict[str, Any] | None = None
        if self.labels is not None:
            category_map = {
                "labels": list(self.labels),
                "data": [{"index": i, "label": label} for i, label in enumerate(self.labels)],
            }
        return Algorithm(
            key=self.key,
            name=self.section.name or f"ONNX detector ({self.section.model.name})",
            task_type="detection",
            version=version,
            description=(
                f"ONNX model {self.section.model.name}, {self.section.output.format} outputs."
            ),
            category_map=category_map,
        )

    def load(self, runtime: RuntimeSection) -> None:
        """Create the session and check it against the configuration; PipelineError if not."""
        model = OnnxModel(self.section.model, runtime, "detector")
        model.check_input_size(*self.section.input_size, self.section.normalization.layout)
        out = self.section.output
        names = model.output_names
        if out.format == "boxes_scores":
            if len(names) < 2 and (out.boxes is None or out.scores is None):
                raise PipelineError(
                    f"detector model {model.path} has outputs {names}; boxes_scores needs "
                    "a boxes and a scores output"
                )
            wanted = [out.boxes or names[0], out.scores or names[1]]
            if out.labels is not None:
                wanted.append(out.labels)
        else:
            wanted = [out.output or names[0]]
        for name in wanted:
            if name not in names:
                raise PipelineError(
                    f"detector model {model.path} has no output {name!r} "
                    f"(outputs: {', '.join(names)})"
                )
        # Batches only when the input's batch axis is free and the main output has one too.
        model.batched = model.batch_dynamic and model.output_rank(wanted[0]) == 3
        if out.format == "yolo":
            self._check_yolo_shape(model, wanted[0])
        self.spec = replace(self.spec, dtype=model.input_dtype)
        self._outputs = wanted
        self.model = model
        logger.info(
            "detector %s: input %s, %s",
            model.path.name,
            model.input_shape,
            "batched" if model.batched else "one image per run",
        )

    def _check_yolo_shape(self, model: OnnxModel, name: str) -> None:
        width_needed = yolo_attributes(
            self.section.output, len(self.labels) if self.labels else None
        )
        shape = next(o.shape for o in model.session.get_outputs() if o.name == name)
        fixed = [d for d in (shape or [])[-2:] if isinstance(d, int) and d > 0]
        if width_needed is not None and len(fixed) == 2 and width_needed not in fixed:
            raise PipelineError(
                f"detector output {name!r} has shape {shape}: no axis of {width_needed} "
                f"for {len(self.labels or [])} labels; check the labels or objectness"
            )

    def detect(
        self, tensors: Sequence[Tensor], geometries: Sequence[Geometry]
    ) -> list[Detected | Exception]:
        """Boxes per image, in original pixels; an exception for an image that failed."""
        if self.model is None:
            raise PipelineError("the detector is not loaded; call load() first")
        outcomes = self.model.run(tensors, self._outputs, self.section.batch_size)
        results: list[Detected | Exception] = []
        for outcome, geometry in zip(outcomes, geometries, strict=True):
            if isinstance(outcome, Exception):
                results.append(outcome)
                continue
            try:
                candidates = self.decode(outcome.outputs)
                results.append(
                    Detected(select(candidates, geometry, self.section), outcome.seconds)
                )
            except Exception as exc:
                results.append(exc)
        return results

    def decode(self, outputs: Sequence[Array]) -> Candidates:
        out = self.section.output
        width, height = self.section.input_size
        if out.format == "yolo":
            n_labels = len(self.labels) if self.labels is not None else None
            return decode_yolo(outputs[0], out, n_labels, width, height)
        labels = outputs[2] if len(outputs) > 2 else None
        return decode_boxes_scores(outputs[0], outputs[1], labels, out, width, height)

    def classification(self, box: Box, terminal: bool) -> Classification | None:
        """The detector's own class for a box, when the detector has labels."""
        if self.labels is None or box.class_id is None:
            return None
        if not 0 <= box.class_id < len(self.labels):
            raise ValueError(
                f"detector label id {box.class_id} is outside the {len(self.labels)} labels"
            )
        if box.class_scores is not None:
            if len(box.class_scores) != len(self.labels):
                raise ValueError(
                    f"detector gives {len(box.class_scores)} class scores "
                    f"but there are {len(self.labels)} labels"
                )
            scores = list(box.class_scores)
        else:
            # Only the chosen class's score is known; the others are reported as 0
            # so the list stays aligned with the labels.
            scores = [0.0] * len(self.labels)
            scores[box.class_id] = box.score
        return Classification(
            label=self.labels[box.class_id],
            labels=list(self.labels),
            scores=scores,
            algorithm_key=self.key,
            terminal=terminal,
        )
