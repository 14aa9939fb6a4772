"""ONNX pipelines from TOML: schema errors, geometry, decoding, NMS, classifier, batching.

The models are tiny graphs built here with ``onnx.helper``: a detector that
finds the bounding box of the bright pixels (so box mapping is checked against
real image content), detectors with constant outputs (thresholds, NMS, YOLO
decoding) and a classifier whose logits are a crop's mean colour. Nothing is
downloaded. Tests that run a model skip when onnxruntime or onnx is missing;
schema and geometry tests run without them.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from trapline.errors import PipelineError
from trapline.pipelines.base import ImageInput, ImageResult, Pipeline
from trapline.pipelines.onnx import OnnxPipeline, load_config, load_pipeline_file
from trapline.pipelines.onnx.classifier import softmax, to_classification
from trapline.pipelines.onnx.config import Normalization
from trapline.pipelines.onnx.detector import nms, to_xyxy
from trapline.pipelines.onnx.preprocess import InputSpec, crop, fit, to_tensor

RGB = npt.NDArray[np.uint8]
OPSET = 17


@pytest.fixture
def onnx_tools() -> Any:
    """The ``onnx`` module, with onnxruntime present too; skip the test otherwise."""
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed (trapline[onnx])")
    return pytest.importorskip("onnx", reason="onnx not installed (trapline[onnx])")


# --- tiny models ------------------------------------------------------------------------------


def _save(
    onnx: Any,
    path: Path,
    nodes: list[Any],
    image_shape: Sequence[int | str],
    outputs: Sequence[tuple[str, int, Sequence[int | str]]],
    initializers: Mapping[str, npt.NDArray[Any]],
    input_type: int | None = None,
) -> Path:
    h, tp = onnx.helper, onnx.TensorProto
    image_type = tp.FLOAT if input_type is None else input_type
    graph = h.make_graph(
        nodes,
        path.stem,
        [h.make_tensor_value_info("image", image_type, list(image_shape))],
        [h.make_tensor_value_info(name, dtype, list(shape)) for name, dtype, shape in outputs],
        [onnx.numpy_helper.from_array(value, name) for name, value in initializers.items()],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET)])
    model.ir_version = 8  # what every onnxruntime >= 1.14 reads
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _zero_per_image(onnx: Any) -> list[Any]:
    """Nodes making ``zero`` = 0.0 per image, shape [B]: ties constant outputs to the batch."""
    h = onnx.helper
    return [
        h.make_node("ReduceMean", ["image"], ["mean"], axes=[1, 2, 3], keepdims=0),
        h.make_node("Mul", ["mean", "c_zero"], ["zero"]),
    ]


def bright_box_detector(
    onnx: Any,
    path: Path,
    width: int,
    height: int,
    layout: str = "NCHW",
    normalized: bool = False,
    batch: int | str = "batch",
    half: bool = False,
) -> Path:
    """Boxes [B, 1, 4] = bounding box (x1, y1, x2, y2) of pixels whose brightest channel > 0.5.

    Scores [B, 1]: 1 when such pixels exist. Coordinates in model-input pixels,
    or fractions of the input size with ``normalized``. ``half``: a float16 input.
    """
    h = onnx.helper
    channel_axis, row_axis, col_axis = (1, 2, 3) if layout == "NCHW" else (3, 1, 2)
    shape = [batch, 3, height, width] if layout == "NCHW" else [batch, height, width, 3]
    # After the channel reduction the spatial axes are 1 (rows) and 2 (columns).
    del row_axis, col_axis
    big = np.float32(1e6)
    source = "image"
    nodes = []
    if half:
        nodes.append(h.make_node("Cast", ["image"], ["image32"], to=onnx.TensorProto.FLOAT))
        source = "image32"
    nodes += [
        h.make_node("ReduceMax", [source], ["bright"], axes=[channel_axis], keepdims=0),
        h.make_node("ReduceMax", ["bright"], ["cols"], axes=[1], keepdims=0),  # [B, W]
        h.make_node("ReduceMax", ["bright"], ["rows"], axes=[2], keepdims=0),  # [B, H]
    ]
    for axis, ramp, ramp1 in (("cols", "ramp_w", "ramp_w1"), ("rows", "ramp_h", "ramp_h1")):
        nodes += [
            h.make_node("Greater", [axis, "c_half"], [f"{axis}_on"]),
            h.make_node("Cast", [f"{axis}_on"], [f"{axis}_m"], to=onnx.TensorProto.FLOAT),
            # first on index: min over m * (i - BIG) + BIG; one past the last: max over m * (i + 1)
            h.make_node("Mul", [f"{axis}_m", ramp], [f"{axis}_a"]),
            h.make_node("Add", [f"{axis}_a", "c_big"], [f"{axis}_b"]),
            h.make_node("ReduceMin", [f"{axis}_b"], [f"{axis}_lo"], axes=[1], keepdims=1),
            h.make_node("Mul", [f"{axis}_m", ramp1], [f"{axis}_c"]),
            h.make_node("ReduceMax", [f"{axis}_c"], [f"{axis}_hi"], axes=[1], keepdims=1),
        ]
    nodes += [
        h.make_node("Concat", ["cols_lo", "rows_lo", "cols_hi", "rows_hi"], ["box"], axis=1),
        h.make_node("Mul", ["box", "c_units"], ["box_u"]),
        h.make_node("Unsqueeze", ["box_u", "c_axis1"], ["boxes"]),
        h.make_node("ReduceMax", ["cols_m"], ["scores"], axes=[1], keepdims=1),
    ]
    units = [1 / width, 1 / height, 1 / width, 1 / height] if normalized else [1.0] * 4
    init: dict[str, npt.NDArray[Any]] = {
        "c_half": np.array(0.5, np.float32),
        "c_big": np.array(big, np.float32),
        "ramp_w": np.arange(width, dtype=np.float32) - big,
        "ramp_w1": np.arange(1, width + 1, dtype=np.float32),
        "ramp_h": np.arange(height, dtype=np.float32) - big,
        "ramp_h1": np.arange(1, height + 1, dtype=np.float32),
        "c_units": np.array(units, np.float32),
        "c_axis1": np.array([1], np.int64),
    }
    outputs = [
        ("boxes", onnx.TensorProto.FLOAT, [batch, 1, 4]),
        ("scores", onnx.TensorProto.FLOAT, [batch, 1]),
    ]
    half_type = onnx.TensorProto.FLOAT16 if half else None
    return _save(onnx, path, nodes, shape, outputs, init, half_type)


def constant_detector(
    onnx: Any,
    path: Path,
    boxes: Sequence[Sequence[float]],
    scores: Sequence[float] | Sequence[Sequence[float]],
    labels: Sequence[int] | None = None,
    size: tuple[int, int] = (100, 50),
    batch_axis: bool = True,
) -> Path:
    """Outputs the same boxes/scores(/labels) for every image.

    With ``batch_axis`` the input batch is dynamic and outputs are [B, N, 4], [B, N(, C)],
    [B, N]; without, the model takes one image and outputs [N, 4], [N(, C)], [N].
    """
    h, tp = onnx.helper, onnx.TensorProto
    box_array = np.asarray(boxes, np.float32)
    score_array = np.asarray(scores, np.float32)
    n = len(box_array)
    nodes = _zero_per_image(onnx)
    batch: int | str = "batch" if batch_axis else 1
    # zero has shape [B]; reshape it so broadcasting adds the batch axis (or none).
    z_box, z_score = ([-1, 1, 1], [-1, 1]) if batch_axis else ([1, 1], [1])
    if score_array.ndim == 2:
        z_score = [-1, 1, 1] if batch_axis else [1, 1]
    nodes += [
        h.make_node("Reshape", ["zero", "shape_box"], ["z_box"]),
        h.make_node("Reshape", ["zero", "shape_score"], ["z_score"]),
        h.make_node("Add", ["z_box", "c_boxes"], ["boxes"]),
        h.make_node("Add", ["z_score", "c_scores"], ["scores"]),
    ]
    lead = [batch] if batch_axis else []
    outputs: list[tuple[str, int, Sequence[int | str]]] = [
        ("boxes", tp.FLOAT, [*lead, n, 4]),
        ("scores", tp.FLOAT, [*lead, *score_array.shape]),
    ]
    init: dict[str, npt.NDArray[Any]] = {
        "c_zero": np.array(0.0, np.float32),
        "shape_box": np.array(z_box, np.int64),
        "shape_score": np.array(z_score, np.int64),
        "c_boxes": box_array,
        "c_scores": score_array,
    }
    if labels is not None:
        nodes += [
            h.make_node("Reshape", ["zero", "shape_label"], ["z_label"]),
            h.make_node("Cast", ["z_label"], ["z_label_i"], to=tp.INT64),
            h.make_node("Add", ["z_label_i", "c_labels"], ["labels"]),
        ]
        init["shape_label"] = np.array([-1, 1] if batch_axis else [1], np.int64)
        init["c_labels"] = np.asarray(labels, np.int64)
        outputs.append(("labels", tp.INT64, [*lead, n]))
    width, height = size
    return _save(onnx, path, nodes, [batch, 3, height, width], outputs, init)


def yolo_detector(
    onnx: Any, path: Path, table: npt.NDArray[np.float32], size: tuple[int, int] = (100, 50)
) -> Path:
    """Outputs ``table`` (2-D) with a batch axis: [B, *table.shape]."""
    h = onnx.helper
    nodes = [
        *_zero_per_image(onnx),
        h.make_node("Reshape", ["zero", "shape_z"], ["z"]),
        h.make_node("Add", ["z", "c_table"], ["output0"]),
    ]
    init: dict[str, npt.NDArray[Any]] = {
        "c_zero": np.array(0.0, np.float32),
        "shape_z": np.array([-1, 1, 1], np.int64),
        "c_table": np.asarray(table, np.float32),
    }
    width, height = size
    outputs = [("output0", onnx.TensorProto.FLOAT, ["batch", *table.shape])]
    return _save(onnx, path, nodes, ["batch", 3, height, width], outputs, init)


def colour_classifier(onnx: Any, path: Path, size: int = 16, batch: int | str = "batch") -> Path:
    """Logits [B, 3] = the crop's mean of each input channel (so red, green, blue for RGB)."""
    h = onnx.helper
    nodes = [h.make_node("ReduceMean", ["image"], ["logits"], axes=[2, 3], keepdims=0)]
    outputs = [("logits", onnx.TensorProto.FLOAT, [batch, 3])]
    return _save(onnx, path, nodes, [batch, 3, size, size], outputs, {})


def fixed_classifier(onnx: Any, path: Path, logits: Sequence[float], size: int = 8) -> Path:
    """Logits [B, C] = ``logits`` for every crop."""
    h = onnx.helper
    nodes = [
        *_zero_per_image(onnx),
        h.make_node("Reshape", ["zero", "shape_z"], ["z"]),
        h.make_node("Add", ["z", "c_logits"], ["logits"]),
    ]
    init: dict[str, npt.NDArray[Any]] = {
        "c_zero": np.array(0.0, np.float32),
        "shape_z": np.array([-1, 1], np.int64),
        "c_logits": np.asarray(logits, np.float32),
    }
    shape: list[int | str] = ["batch", len(logits)]
    outputs = [("logits", onnx.TensorProto.FLOAT, shape)]
    return _save(onnx, path, nodes, ["batch", 3, size, size], outputs, init)


# --- helpers ----------------------------------------------------------------------------------


def write_toml(folder: Path, body: str, name: str = "pipeline.toml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(body).lstrip(), encoding="utf-8")
    return path


HEADER = """
[pipeline]
slug = "test-onnx"
name = "Test ONNX"
version = 3
description = "tiny generated models"
"""


def scene(width: int, height: int, rect: tuple[int, int, int, int]) -> RGB:
    """Black frame with a white rectangle covering x1 <= x < x2, y1 <= y < y2."""
    image = np.zeros((height, width, 3), np.uint8)
    x1, y1, x2, y2 = rect
    image[y1:y2, x1:x2] = 255
    return image


def run(pipeline: Pipeline, *images: RGB | None) -> list[ImageResult]:
    inputs = [ImageInput(id=f"img{i}", url="", pixels=p) for i, p in enumerate(images)]
    return pipeline.process(inputs)


def loaded(path: Path) -> Pipeline:
    pipeline = load_pipeline_file(path)
    pipeline.load()
    return pipeline


class CountingSession:
    """Wraps an onnxruntime session to count runs and record batch sizes."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.batches: list[int] = []

    def run(self, outputs: list[str], feeds: dict[str, npt.NDArray[Any]]) -> Any:
        self.batches.append(len(next(iter(feeds.values()))))
        return self.session.run(outputs, feeds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


def count_runs(pipeline: Pipeline) -> CountingSession:
    assert isinstance(pipeline, OnnxPipeline) and pipeline.detector.model is not None
    counter = CountingSession(pipeline.detector.model.session)
    pipeline.detector.model.session = counter
    return counter


# --- the TOML schema --------------------------------------------------------------------------

MINIMAL = (
    HEADER
    + """
[detector]
model = "models/det.onnx"
input_size = [64, 48]

[detector.output]
format = "boxes_scores"
"""
)


def test_minimal_file_parses_with_defaults_and_paths_relative_to_the_file(tmp_path: Path) -> None:
    config = load_config(write_toml(tmp_path, MINIMAL))
    det = config.detector
    assert det.model == tmp_path.resolve() / "models" / "det.onnx"
    assert det.input_size == (64, 48)
    assert det.resize == "letterbox" and det.pad_value == 114
    assert det.normalization == Normalization()
    assert det.output.resolved_box_format == "xyxy"
    assert config.classifier is None
    assert config.runtime.device == "auto"
    assert config.pipeline.version == 3


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("input_size = [64, 48]", "input_sise = [64, 48]"), "detector.input_sise: unknown key"),
        (("input_size = [64, 48]", ""), "detector.input_size: missing required key"),
        (("input_size = [64, 48]", "input_size = [64]"), "detector.input_size"),
        (("input_size = [64, 48]", 'input_size = [64, "x"]'), "detector.input_size[1]"),
        (("input_size = [64, 48]", "input_size = [64, 0]"), "detector.input_size[1]"),
        (
            ('format = "boxes_scores"', 'format = "yolov8"'),
            "detector.output.format: Input should be 'boxes_scores' or 'yolo' (got 'yolov8')",
        ),
        (
            ('format = "boxes_scores"', 'format = "boxes_scores"\nobjectness = true'),
            "detector.output: objectness only apply to format = 'yolo'",
        ),
        (('slug = "test-onnx"', 'slug = "Test Onnx"'), "pipeline.slug"),
        (
            ("[detector.output]", "[detector.normalization]\nstd = [1, 0, 1]\n[detector.output]"),
            "detector.normalization.std: every std value must be > 0",
        ),
        (
            ("[detector.output]", 'labels = ["a"]\nlabels_file = "l.txt"\n[detector.output]'),
            "detector: give `labels` or `labels_file`, not both",
        ),
    ],
)
def test_bad_file_names_the_key(tmp_path: Path, change: tuple[str, str], expected: str) -> None:
    path = write_toml(tmp_path, MINIMAL.replace(*change))
    with pytest.raises(PipelineError) as info:
        load_pipeline_file(path)
    message = str(info.value)
    assert expected in message
    assert str(path) in message
    assert "\n" not in message  # one line, for the worker's start-up error


def test_classifier_without_labels_is_an_error(tmp_path: Path) -> None:
    body = MINIMAL + '\n[classifier]\nmodel = "cls.onnx"\ninput_size = [8, 8]\n'
    with pytest.raises(PipelineError, match=r"classifier: a classifier needs `labels_file`"):
        load_config(write_toml(tmp_path, body))


def test_toml_syntax_error_is_a_pipeline_error(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match=r"is not valid TOML.*line 2"):
        load_config(write_toml(tmp_path, "[pipeline]\nslug = \n"))


def test_missing_pipeline_file(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="ONNX pipeline file not found"):
        load_pipeline_file(tmp_path / "nope.toml")


def test_missing_model_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(PipelineError) as info:
        load_pipeline_file(write_toml(tmp_path, MINIMAL))
    assert "detector model file not found" in str(info.value)
    assert str(tmp_path.resolve() / "models" / "det.onnx") in str(info.value)


def test_missing_classifier_files_name_the_path(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "det.onnx").write_bytes(b"never parsed")
    body = (
        MINIMAL + '[classifier]\nmodel = "cls.onnx"\ninput_size = [8, 8]\nlabels_file = "x.txt"\n'
    )
    with pytest.raises(PipelineError, match=r"classifier model file not found: .*cls\.onnx"):
        load_pipeline_file(write_toml(tmp_path, body))
    (tmp_path / "cls.onnx").write_bytes(b"never parsed")
    with pytest.raises(PipelineError, match=r"classifier labels file not found: .*x\.txt"):
        load_pipeline_file(write_toml(tmp_path, body))
    (tmp_path / "x.txt").write_text("a\n\nb\n")
    with pytest.raises(PipelineError, match="blank line at line 2"):
        load_pipeline_file(write_toml(tmp_path, body))


def test_without_onnxruntime_load_says_to_install_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "det.onnx").write_bytes(b"never parsed")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    pipeline = load_pipeline_file(write_toml(tmp_path, MINIMAL))
    assert pipeline.slug == "test-onnx"  # describing the pipeline needs no onnxruntime
    assert [a.key for a in pipeline.algorithms()] == ["test-onnx-detector"]
    with pytest.raises(PipelineError, match=r"install trapline\[onnx\]"):
        pipeline.load()


# --- geometry and decoding (numpy only) -------------------------------------------------------


def spec(width: int, height: int, **kwargs: Any) -> InputSpec:
    options: dict[str, Any] = {
        "resize": "letterbox",
        "pad_value": 114,
        "pad_position": "center",
        "interpolation": "linear",
        "normalization": Normalization(),
    }
    options.update(kwargs)
    return InputSpec(width=width, height=height, **options)


def test_letterbox_geometry_wide_tall_and_top_left() -> None:
    wide = np.zeros((160, 320, 3), np.uint8)
    fitted, g = fit(wide, spec(64, 64))
    assert fitted.shape == (64, 64, 3)
    assert (g.scale_x, g.scale_y, g.pad_x, g.pad_y) == (0.2, 0.2, 0.0, 16.0)
    assert (fitted[:16] == 114).all() and (fitted[48:] == 114).all() and (fitted[16:48] == 0).all()

    tall = np.zeros((300, 100, 3), np.uint8)
    _, g = fit(tall, spec(60, 60))
    assert (g.scale_x, g.scale_y, g.pad_x, g.pad_y) == (0.2, 0.2, 20.0, 0.0)

    _, g = fit(wide, spec(64, 64, pad_position="top_left"))
    assert (g.pad_x, g.pad_y) == (0.0, 0.0)

    # Rounded content size: 333 px wide into 100 gives 33 px tall from 110, scale 30/99.
    odd = np.zeros((110, 333, 3), np.uint8)
    _, g = fit(odd, spec(100, 100))
    assert g.scale_x == 100 / 333 and g.scale_y == 33 / 110
    back = g.to_original(np.array([[0.0, g.pad_y, 100.0, g.pad_y + 33.0]]))
    np.testing.assert_allclose(back, [[0, 0, 333, 110]])


def test_to_original_clips_and_stretch_scales_per_axis() -> None:
    _, g = fit(np.zeros((100, 200, 3), np.uint8), spec(100, 100, resize="stretch"))
    assert (g.scale_x, g.scale_y) == (0.5, 1.0)
    out = g.to_original(np.array([[-10.0, -5.0, 50.0, 120.0]]))
    np.testing.assert_allclose(out, [[0, 0, 100, 100]])


def test_to_tensor_normalization_channel_order_and_layout() -> None:
    image = np.zeros((2, 3, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 255, 51, 0  # RGB
    norm = Normalization(mean=(0.5, 0.1, 0.0), std=(0.25, 0.5, 1.0))
    nchw = to_tensor(image, spec(3, 2, normalization=norm))
    assert nchw.shape == (3, 2, 3) and nchw.dtype == np.float32
    np.testing.assert_allclose(nchw[:, 0, 0], [(1 - 0.5) / 0.25, (0.2 - 0.1) / 0.5, 0.0], rtol=1e-6)

    bgr = Normalization(channel_order="BGR", layout="NHWC", scale=1.0)
    nhwc = to_tensor(image, spec(3, 2, normalization=bgr, dtype=np.float16))
    assert nhwc.shape == (2, 3, 3) and nhwc.dtype == np.float16
    np.testing.assert_array_equal(nhwc[1, 2], [0, 51, 255])


def test_box_formats() -> None:
    raw = np.array([[10.0, 20.0, 4.0, 8.0]])
    np.testing.assert_allclose(to_xyxy(raw, "cxcywh", False, 100, 50), [[8, 16, 12, 24]])
    np.testing.assert_allclose(to_xyxy(raw, "yxyx", False, 100, 50), [[20, 10, 8, 4]])
    norm = np.array([[0.1, 0.2, 0.5, 1.0]])
    np.testing.assert_allclose(to_xyxy(norm, "xyxy", True, 100, 50), [[10, 10, 50, 50]])


def test_nms_threshold_order_limit_and_classes() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 10]], float)
    scores = np.array([0.8, 0.9, 0.5, 0.7])
    # IoU(box0, box1) = 90 / 110 = 0.82; box3 equals box0.
    assert nms(boxes, scores, 0.5, 10).tolist() == [1, 2]
    assert nms(boxes, scores, 0.85, 10).tolist() == [1, 0, 2]  # box3 = box0: IoU 1 > 0.85
    assert nms(boxes, scores, 1.0, 10).tolist() == [1, 0, 3, 2]
    assert nms(boxes, scores, 0.5, 1).tolist() == [1]
    classes = np.array([0, 1, 0, 0])
    assert nms(boxes, scores, 0.5, 10, classes).tolist() == [1, 0, 2]
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5, 10).tolist() == []


def test_classification_keeps_label_order_and_top_k() -> None:
    scores = softmax(np.array([1.0, 3.0, 2.0, 0.0]))
    np.testing.assert_allclose(scores.sum(), 1.0)
    full = to_classification(scores, ["a", "b", "c", "d"], None, "k")
    assert full.label == "b" and full.labels == ["a", "b", "c", "d"]
    assert full.scores == pytest.approx(scores.tolist())
    top = to_classification(scores, ["a", "b", "c", "d"], 2, "k")
    assert top.label == "b" and top.labels == ["b", "c"]
    assert top.scores == pytest.approx([scores[1], scores[2]])


def test_crop_rounds_outward_and_applies_margin() -> None:
    image = np.arange(10 * 20 * 3, dtype=np.uint8).reshape(10, 20, 3)
    assert crop(image, (2.5, 1.2, 5.1, 4.0), 0.0).shape == (3, 4, 3)
    assert crop(image, (4.0, 4.0, 8.0, 6.0), 0.5).shape == (4, 8, 3)
    assert crop(image, (19.6, 9.9, 20.0, 10.0), 0.0).shape == (1, 1, 3)


# --- end to end with onnxruntime --------------------------------------------------------------


BRIGHT = (
    HEADER
    + """
[detector]
model = "bright.onnx"
input_size = [{w}, {h}]
resize = "{resize}"
score_threshold = 0.5

[detector.normalization]
layout = "{layout}"
channel_order = "{order}"

[detector.output]
format = "boxes_scores"
box_units = "{units}"
"""
)


@pytest.mark.parametrize(
    ("resize", "layout", "order", "units"),
    [
        ("letterbox", "NCHW", "RGB", "pixels"),
        ("stretch", "NCHW", "RGB", "pixels"),
        ("letterbox", "NHWC", "BGR", "normalized"),
        ("stretch", "NHWC", "RGB", "normalized"),
    ],
)
def test_boxes_map_back_to_the_original_image(
    onnx_tools: Any, tmp_path: Path, resize: str, layout: str, order: str, units: str
) -> None:
    """The model finds the white rectangle in its input; the box must land on it in the image.

    320x160 into 64x64: letterbox scale 0.2 with 16 px bands top and bottom;
    stretch 0.2 across and 0.4 down. The rectangle's edges fall where the
    bilinear resize keeps them on model-pixel boundaries, so the result is exact.
    """
    bright_box_detector(
        onnx_tools,
        tmp_path / "bright.onnx",
        64,
        64,
        layout=layout,
        normalized=units == "normalized",
    )
    body = BRIGHT.format(w=64, h=64, resize=resize, layout=layout, order=order, units=units)
    pipeline = loaded(write_toml(tmp_path, body))
    [result] = run(pipeline, scene(320, 160, (60, 40, 160, 100)))
    assert result.error is None
    [det] = result.detections
    assert det.bbox == pytest.approx((60.0, 40.0, 160.0, 100.0), abs=1e-3)
    assert det.score == 1.0 and det.algorithm_key == "test-onnx-detector"
    assert det.classifications == []


def test_letterbox_on_a_tall_image_and_a_non_square_input(onnx_tools: Any, tmp_path: Path) -> None:
    # 100x300 into 48x64: scale min(0.48, 0.2133) -> 64/300; content 21x64, 13 px band left.
    bright_box_detector(onnx_tools, tmp_path / "bright.onnx", 48, 64)
    body = BRIGHT.format(w=48, h=64, resize="letterbox", layout="NCHW", order="RGB", units="pixels")
    pipeline = loaded(write_toml(tmp_path, body))
    [result] = run(pipeline, scene(100, 300, (30, 75, 90, 225)))
    [det] = result.detections
    # Model pixels are ~4.7 original pixels here: the box is within one of them.
    step = 300 / 64
    x1, y1, x2, y2 = det.bbox
    assert abs(x1 - 30) < step and abs(y1 - 75) < step
    assert abs(x2 - 90) < step and abs(y2 - 225) < step
    assert 0 <= x1 < x2 <= 100 and 0 <= y1 < y2 <= 300


CONSTANT = (
    HEADER
    + """
[detector]
model = "const.onnx"
input_size = [100, 50]
resize = "stretch"
score_threshold = 0.25
iou_threshold = {iou}
max_detections = {limit}

[detector.output]
format = "boxes_scores"
"""
)

# Model pixels; a 200x100 image is stretched by 0.5 on both axes, so original = 2x.
CONST_BOXES = [
    [10, 10, 30, 30],  # A  0.9
    [11, 10, 31, 30],  # A' 0.8, IoU with A = 380/420 = 0.905
    [50, 20, 70, 40],  # B  0.6
    [80, 5, 95, 20],  # C  0.1, under the threshold
    [90, 40, 130, 70],  # D  0.7, partly outside the input: clipped
]
CONST_SCORES = [0.9, 0.8, 0.6, 0.1, 0.7]


@pytest.mark.parametrize(
    ("iou", "limit", "expected"),
    [
        (0.5, 100, [(20, 20, 60, 60, 0.9), (180, 80, 200, 100, 0.7), (100, 40, 140, 80, 0.6)]),
        (
            0.95,
            100,
            [
                (20, 20, 60, 60, 0.9),
                (22, 20, 62, 60, 0.8),
                (180, 80, 200, 100, 0.7),
                (100, 40, 140, 80, 0.6),
            ],
        ),
        (0.5, 2, [(20, 20, 60, 60, 0.9), (180, 80, 200, 100, 0.7)]),
    ],
)
def test_threshold_nms_and_max_detections(
    onnx_tools: Any,
    tmp_path: Path,
    iou: float,
    limit: int,
    expected: list[tuple[float, ...]],
) -> None:
    constant_detector(onnx_tools, tmp_path / "const.onnx", CONST_BOXES, CONST_SCORES)
    pipeline = loaded(write_toml(tmp_path, CONSTANT.format(iou=iou, limit=limit)))
    [result] = run(pipeline, np.zeros((100, 200, 3), np.uint8))
    got = [(*d.bbox, d.score) for d in result.detections]
    assert got == [pytest.approx(e, abs=1e-5) for e in expected]


def test_boxes_in_the_letterbox_padding_are_dropped(onnx_tools: Any, tmp_path: Path) -> None:
    # 200x50 into 100x50 letterbox: content 100x25 with 12 px bands top and bottom.
    constant_detector(
        onnx_tools,
        tmp_path / "const.onnx",
        [[10, 0, 20, 10], [10, 14, 20, 24], [10, 40, 20, 50]],
        [0.9, 0.8, 0.7],
    )
    body = CONSTANT.format(iou=0.5, limit=100).replace('resize = "stretch"', 'resize = "letterbox"')
    pipeline = loaded(write_toml(tmp_path, body))
    [result] = run(pipeline, np.zeros((50, 200, 3), np.uint8))
    assert [d.bbox for d in result.detections] == [pytest.approx((20, 4, 40, 24))]


def test_detector_labels_and_class_aware_nms(onnx_tools: Any, tmp_path: Path) -> None:
    constant_detector(
        onnx_tools,
        tmp_path / "const.onnx",
        [[10, 10, 30, 30], [11, 10, 31, 30], [50, 20, 70, 40]],
        [0.9, 0.8, 0.6],
        labels=[0, 2, 1],
    )
    body = CONSTANT.format(iou=0.5, limit=100)
    body = body.replace('format = "boxes_scores"', 'format = "boxes_scores"\nlabels = "labels"')
    body = body.replace(
        "[detector.output]",
        'labels = ["animal", "person", "vehicle"]\nclass_agnostic_nms = false\n[detector.output]',
    )
    pipeline = loaded(write_toml(tmp_path, body))
    [result] = run(pipeline, np.zeros((100, 200, 3), np.uint8))
    # Class-aware: A' (vehicle) survives A (animal).
    assert [d.classifications[0].label for d in result.detections] == [
        "animal",
        "vehicle",
        "person",
    ]
    first = result.detections[0].classifications[0]
    assert first.labels == ["animal", "person", "vehicle"]
    assert first.scores == pytest.approx([0.9, 0.0, 0.0])
    assert first.terminal and first.algorithm_key == "test-onnx-detector"
    assert pipeline.algorithms()[0].category_map is not None


def test_per_class_scores_output(onnx_tools: Any, tmp_path: Path) -> None:
    constant_detector(
        onnx_tools,
        tmp_path / "const.onnx",
        [[10, 10, 30, 30], [50, 20, 70, 40]],
        [[0.1, 0.7], [0.2, 0.1]],  # [N, C]: best is class 1 (0.7), then nothing over 0.25
    )
    body = CONSTANT.format(iou=0.5, limit=100).replace(
        "[detector.output]", 'labels = ["moth", "beetle"]\n[detector.output]'
    )
    [result] = run(loaded(write_toml(tmp_path, body)), np.zeros((100, 200, 3), np.uint8))
    [det] = result.detections
    assert det.score == pytest.approx(0.7)
    assert det.classifications[0].label == "beetle"
    assert det.classifications[0].scores == pytest.approx([0.1, 0.7])


YOLO = (
    HEADER
    + """
[detector]
model = "yolo.onnx"
input_size = [100, 50]
resize = "stretch"
labels = ["moth", "beetle", "fly"]
{extra}

[detector.output]
format = "yolo"
{output}
"""
)


def yolo_table(objectness: bool) -> npt.NDArray[np.float32]:
    """[4(+1)+3, 4]: cx, cy, w, h (model pixels), (objectness,) 3 class scores per column."""
    boxes = np.array([[20, 20, 20, 20], [21, 20, 20, 20], [60, 30, 20, 20], [80, 10, 10, 10]])
    classes = np.array(
        [[0.1, 0.9, 0.0], [0.2, 0.85, 0.1], [0.7, 0.1, 0.2], [0.1, 0.1, 0.2]], np.float32
    )
    parts = [boxes.astype(np.float32)]
    if objectness:
        parts.append(np.array([[1.0], [1.0], [0.5], [1.0]], np.float32))
    parts.append(classes)
    table: npt.NDArray[np.float32] = np.concatenate(parts, axis=1).T.copy()
    return table


@pytest.mark.parametrize("attributes_first", [True, False])
@pytest.mark.parametrize("objectness", [False, True])
def test_yolo_output(
    onnx_tools: Any, tmp_path: Path, attributes_first: bool, objectness: bool
) -> None:
    table = yolo_table(objectness)
    yolo_detector(onnx_tools, tmp_path / "yolo.onnx", table if attributes_first else table.T)
    output = "objectness = true" if objectness else ""
    body = YOLO.format(extra="score_threshold = 0.3", output=output)
    [result] = run(loaded(write_toml(tmp_path, body)), np.zeros((100, 200, 3), np.uint8))
    assert [d.classifications[0].label for d in result.detections] == ["beetle", "moth"]
    assert [d.bbox for d in result.detections] == [
        pytest.approx((20, 20, 60, 60)),
        pytest.approx((100, 40, 140, 80)),
    ]
    third = 0.35 if objectness else 0.7
    assert [d.score for d in result.detections] == pytest.approx([0.9, third])
    scores = result.detections[0].classifications[0].scores
    assert scores == pytest.approx([0.1, 0.9, 0.0])


def test_yolo_label_count_mismatch_fails_at_load(onnx_tools: Any, tmp_path: Path) -> None:
    yolo_detector(onnx_tools, tmp_path / "yolo.onnx", yolo_table(False))
    body = YOLO.format(extra="", output="").replace('"fly"]', '"fly", "wasp"]')
    with pytest.raises(PipelineError, match="no axis of 8 for 4 labels"):
        loaded(write_toml(tmp_path, body))


CLASSIFIED = (
    CONSTANT.format(iou=0.5, limit=100)
    + """
[classifier]
model = "{model}"
input_size = [{size}, {size}]
labels_file = "labels.txt"
{extra}
"""
)


def test_classifier_sees_the_right_crops(onnx_tools: Any, tmp_path: Path) -> None:
    """Two coloured patches; the detector boxes them; the colour classifier must name each."""
    constant_detector(
        onnx_tools, tmp_path / "const.onnx", [[10, 10, 30, 30], [60, 20, 80, 40]], [0.9, 0.8]
    )
    colour_classifier(onnx_tools, tmp_path / "colour.onnx")
    (tmp_path / "labels.txt").write_text("red\ngreen\nblue\n\n", encoding="utf-8")
    image = np.zeros((100, 200, 3), np.uint8)
    image[20:60, 20:60] = (255, 0, 0)  # model box [10, 10, 30, 30] x2
    image[40:80, 120:160] = (0, 0, 255)  # model box [60, 20, 80, 40] x2
    body = CLASSIFIED.format(model="colour.onnx", size=16, extra="")
    pipeline = loaded(write_toml(tmp_path, body))
    [result] = run(pipeline, image)
    assert result.error is None
    red, blue = result.detections
    [cls] = red.classifications
    assert cls.label == "red" and cls.labels == ["red", "green", "blue"]
    assert cls.scores == pytest.approx(softmax(np.array([1.0, 0.0, 0.0])).tolist(), abs=1e-6)
    assert cls.algorithm_key == "test-onnx-classifier" and cls.terminal
    assert blue.classifications[0].label == "blue"
    algorithms = pipeline.algorithms()
    assert [a.key for a in algorithms] == ["test-onnx-detector", "test-onnx-classifier"]
    assert algorithms[1].category_map is not None
    assert algorithms[1].category_map["labels"] == ["red", "green", "blue"]

    # BGR input order: the model's first channel is now blue.
    bgr = body.replace(
        'labels_file = "labels.txt"',
        'labels_file = "labels.txt"\nnormalization.channel_order = "BGR"',
    )
    [result] = run(loaded(write_toml(tmp_path, bgr, "bgr.toml")), image)
    assert [d.classifications[0].label for d in result.detections] == ["blue", "red"]


def test_classifier_top_k_softmax_off_and_detector_class_not_terminal(
    onnx_tools: Any, tmp_path: Path
) -> None:
    constant_detector(onnx_tools, tmp_path / "const.onnx", [[10, 10, 30, 30]], [0.9], labels=[0])
    fixed_classifier(onnx_tools, tmp_path / "fixed.onnx", [0.1, 0.5, 0.3, 0.05])
    (tmp_path / "labels.txt").write_text("a\nb\nc\nd\n", encoding="utf-8")
    body = CLASSIFIED.format(model="fixed.onnx", size=8, extra="softmax = false\ntop_k = 2")
    body = body.replace('format = "boxes_scores"', 'format = "boxes_scores"\nlabels = "labels"')
    body = body.replace("[detector.output]", 'labels = ["insect"]\n[detector.output]')
    [result] = run(loaded(write_toml(tmp_path, body)), np.zeros((100, 200, 3), np.uint8))
    [det] = result.detections
    own, cls = det.classifications
    assert own.label == "insect" and not own.terminal
    assert cls.label == "b" and cls.terminal
    assert cls.labels == ["b", "c"] and cls.scores == pytest.approx([0.5, 0.3])


def test_classifier_label_count_mismatch_fails_at_load(onnx_tools: Any, tmp_path: Path) -> None:
    constant_detector(onnx_tools, tmp_path / "const.onnx", [[10, 10, 30, 30]], [0.9])
    colour_classifier(onnx_tools, tmp_path / "colour.onnx")
    (tmp_path / "labels.txt").write_text("red\ngreen\n", encoding="utf-8")
    body = CLASSIFIED.format(model="colour.onnx", size=16, extra="")
    with pytest.raises(PipelineError, match="3 classes but there are 2 labels"):
        loaded(write_toml(tmp_path, body))


def test_dynamic_batch_runs_batches_static_runs_one_by_one(onnx_tools: Any, tmp_path: Path) -> None:
    images = [scene(320, 160, (60, 40, 160, 100)), scene(320, 160, (0, 0, 50, 50))] * 3
    body = BRIGHT.format(w=64, h=64, resize="letterbox", layout="NCHW", order="RGB", units="pixels")

    bright_box_detector(onnx_tools, tmp_path / "bright.onnx", 64, 64)
    batched = loaded(
        write_toml(tmp_path, body.replace("score_threshold", "batch_size = 4\nscore_threshold"))
    )
    counter = count_runs(batched)
    batched_results = run(batched, *images)
    assert counter.batches == [4, 2]

    bright_box_detector(onnx_tools, tmp_path / "bright.onnx", 64, 64, batch=1)
    single = loaded(write_toml(tmp_path, body))
    assert isinstance(single, OnnxPipeline) and single.detector.model is not None
    assert not single.detector.model.batched
    counter = count_runs(single)
    single_results = run(single, *images)
    assert counter.batches == [1] * 6
    assert [d.bbox for r in batched_results for d in r.detections] == [
        d.bbox for r in single_results for d in r.detections
    ]
    assert single_results[1].detections[0].bbox == pytest.approx((0, 0, 50, 50), abs=1e-3)


def test_single_image_model_without_batch_axis(onnx_tools: Any, tmp_path: Path) -> None:
    constant_detector(
        onnx_tools, tmp_path / "const.onnx", CONST_BOXES, CONST_SCORES, batch_axis=False
    )
    pipeline = loaded(write_toml(tmp_path, CONSTANT.format(iou=0.5, limit=100)))
    results = run(pipeline, np.zeros((100, 200, 3), np.uint8), np.zeros((50, 100, 3), np.uint8))
    assert [len(r.detections) for r in results] == [3, 3]
    assert results[1].detections[0].bbox == pytest.approx((10, 10, 30, 30))


def test_bad_images_fail_alone(onnx_tools: Any, tmp_path: Path) -> None:
    bright_box_detector(onnx_tools, tmp_path / "bright.onnx", 64, 64)
    body = BRIGHT.format(w=64, h=64, resize="stretch", layout="NCHW", order="RGB", units="pixels")
    pipeline = loaded(write_toml(tmp_path, body))
    good = scene(320, 160, (60, 40, 160, 100))
    gray = good[:, :, 0].copy()
    results = run(pipeline, good, None, np.zeros((4, 4, 3), np.float32), gray)
    assert [r.image_id for r in results] == ["img0", "img1", "img2", "img3"]
    assert results[0].error is None and len(results[0].detections) == 1
    assert results[1].error is not None and "no pixels" in results[1].error
    assert results[2].error is not None and "uint8" in results[2].error
    assert results[3].error is None
    assert results[3].detections[0].bbox == results[0].detections[0].bbox


def test_model_that_does_not_fit_the_file_fails_at_load(onnx_tools: Any, tmp_path: Path) -> None:
    bright_box_detector(onnx_tools, tmp_path / "bright.onnx", 64, 64)
    base = BRIGHT.format(w=64, h=64, resize="stretch", layout="NCHW", order="RGB", units="pixels")
    with pytest.raises(PipelineError, match="has height 64 but input_size says 48"):
        loaded(write_toml(tmp_path, base.replace("input_size = [64, 64]", "input_size = [64, 48]")))
    with pytest.raises(PipelineError, match="is the layout 'NCHW'"):
        loaded(write_toml(tmp_path, base.replace('layout = "NCHW"', 'layout = "NHWC"')))
    with pytest.raises(PipelineError, match="has no output 'dets' \\(outputs: boxes, scores\\)"):
        loaded(write_toml(tmp_path, base.replace("box_units", 'boxes = "dets"\nbox_units')))
    (tmp_path / "bright.onnx").write_bytes(b"not a model")
    with pytest.raises(PipelineError, match=r"cannot load detector model .*bright\.onnx"):
        loaded(write_toml(tmp_path, base))


def test_pipeline_identity_comes_from_the_file(onnx_tools: Any, tmp_path: Path) -> None:
    bright_box_detector(onnx_tools, tmp_path / "bright.onnx", 64, 64)
    body = BRIGHT.format(w=64, h=64, resize="stretch", layout="NCHW", order="RGB", units="pixels")
    body = body.replace("score_threshold", 'key = "bright"\nname = "Bright box"\nscore_threshold')
    pipeline = load_pipeline_file(write_toml(tmp_path, body))
    assert isinstance(pipeline, Pipeline)
    with pytest.raises(PipelineError, match="not loaded"):
        run(pipeline, scene(320, 160, (0, 0, 10, 10)))
    pipeline.load()
    pipeline.load()  # idempotent
    config = pipeline.config()
    assert config["slug"] == "test-onnx" and config["name"] == "Test ONNX"
    assert config["version"] == 3 and config["description"] == "tiny generated models"
    assert config["algorithms"][0]["key"] == "bright"
    assert config["algorithms"][0]["name"] == "Bright box"
    assert type(pipeline).slug == "test-onnx" and pipeline.needs_pixels


@pytest.mark.parametrize(("batch", "expected"), [("batch", [4, 2]), (1, [1] * 6)])
def test_classifier_batches_crops_across_images(
    onnx_tools: Any, tmp_path: Path, batch: int | str, expected: list[int]
) -> None:
    constant_detector(
        onnx_tools, tmp_path / "const.onnx", [[10, 10, 30, 30], [60, 20, 80, 40]], [0.9, 0.8]
    )
    colour_classifier(onnx_tools, tmp_path / "colour.onnx", batch=batch)
    (tmp_path / "labels.txt").write_text("red\ngreen\nblue\n", encoding="utf-8")
    body = CLASSIFIED.format(model="colour.onnx", size=16, extra="batch_size = 4")
    pipeline = loaded(write_toml(tmp_path, body))
    assert isinstance(pipeline, OnnxPipeline) and pipeline.classifier is not None
    assert pipeline.classifier.model is not None
    counter = CountingSession(pipeline.classifier.model.session)
    pipeline.classifier.model.session = counter
    image = np.zeros((100, 200, 3), np.uint8)
    image[20:60, 20:60] = (0, 255, 0)
    results = run(pipeline, image, image, image)
    assert counter.batches == expected
    labels = [[c.label for d in r.detections for c in d.classifications] for r in results]
    assert labels == [["green", "red"]] * 3  # the black crop's logits tie: the first label


def _cuda_available() -> bool:
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def _bright_pipeline_file(onnx: Any, folder: Path, device: str) -> Path:
    bright_box_detector(onnx, folder / "bright.onnx", 64, 64)
    body = BRIGHT.format(w=64, h=64, resize="stretch", layout="NCHW", order="RGB", units="pixels")
    return write_toml(folder, body + f'\n[runtime]\ndevice = "{device}"\n')


def _provider_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "bright.onnx runs on" in r.getMessage()]


def test_auto_device_takes_cuda_when_there_is_one_and_logs_the_provider(
    onnx_tools: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="trapline.pipelines.onnx"):
        pipeline = loaded(_bright_pipeline_file(onnx_tools, tmp_path, "auto"))
    assert isinstance(pipeline, OnnxPipeline) and pipeline.detector.model is not None
    expected = "CUDAExecutionProvider" if _cuda_available() else "CPUExecutionProvider"
    assert pipeline.detector.model.provider == expected
    assert _provider_lines(caplog) == [f"detector model bright.onnx runs on {expected}"]


@pytest.mark.skipif(
    not _cuda_available(),
    reason="onnxruntime here has no CUDAExecutionProvider (needs onnxruntime-gpu and a GPU)",
)
def test_device_cuda_runs_the_model_on_the_gpu(
    onnx_tools: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="trapline.pipelines.onnx"):
        pipeline = loaded(_bright_pipeline_file(onnx_tools, tmp_path, "cuda"))
    assert isinstance(pipeline, OnnxPipeline) and pipeline.detector.model is not None
    assert pipeline.detector.model.session.get_providers()[0] == "CUDAExecutionProvider"
    assert pipeline.detector.model.provider == "CUDAExecutionProvider"
    assert _provider_lines(caplog) == ["detector model bright.onnx runs on CUDAExecutionProvider"]
    [result] = run(pipeline, scene(320, 160, (60, 40, 160, 100)))
    assert result.error is None
    [det] = result.detections
    assert det.bbox == pytest.approx((60.0, 40.0, 160.0, 100.0), abs=1e-3)


# Whether onnxruntime has a working CUDA provider is down to the machine, not to us: the
# two tests below set it by patching onnxruntime, so both error paths run on every host.


def test_device_cuda_without_a_cuda_provider_is_a_clear_error(
    onnx_tools: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    path = _bright_pipeline_file(onnx_tools, tmp_path, "cuda")
    with pytest.raises(PipelineError, match=r"no CUDAExecutionProvider.*onnxruntime-gpu"):
        loaded(path)


def test_device_cuda_is_an_error_when_the_cuda_provider_falls_back_to_the_cpu(
    onnx_tools: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listed CUDA provider that cannot start (no cuDNN, no GPU) leaves onnxruntime on
    the CPU with only a warning of its own: device = 'cuda' must not carry on like that."""
    import onnxruntime

    real_session = onnxruntime.InferenceSession

    def cuda_that_does_not_start(*args: Any, **kwargs: Any) -> Any:
        return real_session(*args, **{**kwargs, "providers": ["CPUExecutionProvider"]})

    listed = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: listed)
    monkeypatch.setattr(onnxruntime, "InferenceSession", cuda_that_does_not_start)
    path = _bright_pipeline_file(onnx_tools, tmp_path, "cuda")
    with pytest.raises(PipelineError, match="device = 'cuda' but the detector model runs on CPU"):
        loaded(path)


def test_float16_model_input(onnx_tools: Any, tmp_path: Path) -> None:
    bright_box_detector(onnx_tools, tmp_path / "bright.onnx", 64, 64, half=True)
    body = BRIGHT.format(w=64, h=64, resize="stretch", layout="NCHW", order="RGB", units="pixels")
    pipeline = loaded(write_toml(tmp_path, body))
    assert isinstance(pipeline, OnnxPipeline) and pipeline.detector.spec.dtype == np.float16
    [result] = run(pipeline, scene(320, 160, (60, 40, 160, 100)))
    assert result.detections[0].bbox == pytest.approx((60, 40, 160, 100), abs=1e-3)


def test_documented_examples_are_valid(tmp_path: Path) -> None:
    docs = Path(__file__).resolve().parents[2] / "docs" / "onnx-pipelines.md"
    blocks = docs.read_text(encoding="utf-8").split("```toml\n")[1:]
    assert len(blocks) >= 2
    for n, block in enumerate(blocks):
        config = load_config(write_toml(tmp_path, block.split("```")[0], f"doc{n}.toml"))
        assert config.detector.model.is_absolute()
