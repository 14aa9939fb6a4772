"""The TOML schema of an ONNX pipeline file, and its loader.

Every table rejects unknown keys, so a typo (``input_sise``) is an error that
names the key instead of a setting silently left at its default. Paths in the
file are relative to the file itself, so a pipeline folder can be moved whole.
The reference with a full example is ``docs/onnx-pipelines.md``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from trapline.errors import PipelineError

Triple = tuple[float, float, float]


class _Table(BaseModel):
    """A TOML table: unknown keys are errors, values are read-only once parsed."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _resolve(value: Path | None, info: ValidationInfo) -> Path | None:
    """Make a path from the file absolute, relative to the file's folder."""
    if value is None:
        return None
    value = value.expanduser()
    base = (info.context or {}).get("base_dir")
    if value.is_absolute() or base is None:
        return value
    return Path(base) / value


class PipelineSection(_Table):
    """``[pipeline]``: how the pipeline registers itself."""

    slug: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", max_length=64)
    name: str = Field(min_length=1)
    version: PositiveInt = 1
    description: str = ""


class Normalization(_Table):
    """``[detector.normalization]`` / ``[classifier.normalization]``: pixels to tensor.

    Each channel becomes ``(pixel * scale - mean) / std`` with ``pixel`` in 0-255;
    ``mean`` and ``std`` are listed in the model's channel order.
    """

    scale: float = Field(default=1.0 / 255.0, gt=0)
    mean: Triple = (0.0, 0.0, 0.0)
    std: Triple = (1.0, 1.0, 1.0)
    channel_order: Literal["RGB", "BGR"] = "RGB"
    layout: Literal["NCHW", "NHWC"] = "NCHW"

    @field_validator("std")
    @classmethod
    def _std_positive(cls, value: Triple) -> Triple:
        if any(v <= 0 for v in value):
            raise ValueError("every std value must be > 0")
        return value


class ModelSection(_Table):
    """What the detector and the classifier share: the model file and its input."""

    model: Path
    input_size: tuple[PositiveInt, PositiveInt]
    resize: Literal["letterbox", "stretch"] = "letterbox"
    pad_value: int = Field(default=114, ge=0, le=255)
    pad_position: Literal["center", "top_left"] = "center"
    interpolation: Literal["linear", "area", "nearest", "cubic"] = "linear"
    normalization: Normalization = Normalization()
    labels_file: Path | None = None
    labels: list[str] | None = None
    batch_size: PositiveInt = 16
    key: str | None = Field(default=None, min_length=1)
    name: str | None = Field(default=None, min_length=1)

    @field_validator("model", "labels_file")
    @classmethod
    def _relative_to_file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return _resolve(value, info)

    @model_validator(mode="after")
    def _one_label_source(self) -> Self:
        if self.labels is not None and self.labels_file is not None:
            raise ValueError("give `labels` or `labels_file`, not both")
        if self.labels is not None and not self.labels:
            raise ValueError("`labels` is empty")
        return self


class DetectorOutput(_Table):
    """``[detector.output]``: how to read boxes and scores from the model's outputs."""

    format: Literal["boxes_scores", "yolo"]
    # None: "xyxy" for boxes_scores, "cxcywh" for yolo.
    box_format: Literal["xyxy", "cxcywh", "yxyx"] | None = None
    box_units: Literal["pixels", "normalized"] = "pixels"
    # boxes_scores: output names; default the model's first and second outputs.
    boxes: str | None = None
    scores: str | None = None
    labels: str | None = None
    # yolo: output name (default the first), axis order and an objectness column.
    output: str | None = None
    yolo_layout: Literal["auto", "detections_first", "attributes_first"] = "auto"
    objectness: bool = False

    @model_validator(mode="after")
    def _keys_fit_format(self) -> Self:
        if self.format == "yolo":
            stray = [k for k in ("boxes", "scores", "labels") if getattr(self, k) is not None]
            if stray:
                raise ValueError(f"{', '.join(stray)} only apply to format = 'boxes_scores'")
        else:
            stray = [k for k in ("output",) if getattr(self, k) is not None]
            if self.objectness:
                stray.append("objectness")
            if self.yolo_layout != "auto":
                stray.append("yolo_layout")
            if stray:
                raise ValueError(f"{', '.join(stray)} only apply to format = 'yolo'")
        return self

    @property
    def resolved_box_format(self) -> Literal["xyxy", "cxcywh", "yxyx"]:
        if self.box_format is not None:
            return self.box_format
        return "cxcywh" if self.format == "yolo" else "xyxy"


class DetectorSection(ModelSection):
    """``[detector]``: the box model, its thresholds and (optionally) its class names."""

    output: DetectorOutput
    score_threshold: float = Field(default=0.25, ge=0)
    iou_threshold: float = Field(default=0.45, gt=0, le=1)
    max_detections: PositiveInt = 100
    class_agnostic_nms: bool = True


class ClassifierSection(ModelSection):
    """``[classifier]``: a crop classifier run on every detection."""

    resize: Literal["letterbox", "stretch"] = "stretch"
    output: str | None = None
    softmax: bool = True
    top_k: PositiveInt | None = None
    crop_margin: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _needs_labels(self) -> Self:
        if self.labels is None and self.labels_file is None:
            raise ValueError("a classifier needs `labels_file` (or `labels`)")
        return self


class RuntimeSection(_Table):
    """``[runtime]``: where onnxruntime runs."""

    device: Literal["auto", "cuda", "cpu"] = "auto"
    threads: int = Field(default=0, ge=0)


class OnnxPipelineConfig(_Table):
    """A whole ONNX pipeline file."""

    pipeline: PipelineSection
    detector: DetectorSection
    classifier: ClassifierSection | None = None
    runtime: RuntimeSection = RuntimeSection()


# Pydantic's wording for the error types a TOML author meets most, made plainer.
_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "missing required key",
    "model_type": "expected a table",
    "model_attributes_type": "expected a table",
    "dict_type": "expected a table",
}


def _format_location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out or "(top level)"


def _format_error(error: Any) -> str:
    kind = error["type"]
    where = _format_location(error["loc"])
    message = _MESSAGES.get(kind)
    if message is None:
        message = str(error["msg"]).removeprefix("Value error, ")
        if kind != "value_error" and not isinstance(error.get("input"), dict):
            message += f" (got {error['input']!r})"
    return f"{where}: {message}"


def parse_config(data: dict[str, Any], base_dir: Path, source: str) -> OnnxPipelineConfig:
    """Validate parsed TOML; PipelineError lists every bad key as ``table.key: problem``."""
    try:
        return OnnxPipelineConfig.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        problems = "; ".join(_format_error(e) for e in exc.errors(include_url=False))
        raise PipelineError(f"invalid ONNX pipeline file {source}: {problems}") from exc


def load_config(path: Path) -> OnnxPipelineConfig:
    """Read and validate a pipeline TOML file; PipelineError says what is wrong and where."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise PipelineError(f"ONNX pipeline file not found: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(f"cannot read ONNX pipeline file {path}: {exc}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PipelineError(f"ONNX pipeline file {path} is not valid TOML: {exc}") from exc
    return parse_config(data, path.resolve().parent, str(path))
