"""Images to model tensors, and model boxes back to image pixels.

Resizing is done on the uint8 image before any float conversion, so a 4K frame
costs one OpenCV resize and the float work happens at model resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np
import numpy.typing as npt

from trapline.pipelines.base import RGBImage
from trapline.pipelines.onnx.config import ModelSection, Normalization

FloatArray = npt.NDArray[np.float64]
Tensor = npt.NDArray[np.floating[Any]]

_INTERPOLATION = {
    "linear": cv2.INTER_LINEAR,
    "area": cv2.INTER_AREA,
    "nearest": cv2.INTER_NEAREST,
    "cubic": cv2.INTER_CUBIC,
}


@dataclass(frozen=True)
class Geometry:
    """How one image sits in the model input: ``model = original * scale + pad``, per axis.

    The scales are the ones the resize really applied (rounded size over original
    size), not the nominal ratio, so mapping back is the exact inverse.
    """

    width: int
    height: int
    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float

    def to_original(self, boxes: FloatArray) -> FloatArray:
        """Model-pixel boxes (N, 4) x1, y1, x2, y2 in original pixels, clipped to the image."""
        out = np.array(boxes, dtype=np.float64, copy=True).reshape(-1, 4)
        out[:, [0, 2]] = (out[:, [0, 2]] - self.pad_x) / self.scale_x
        out[:, [1, 3]] = (out[:, [1, 3]] - self.pad_y) / self.scale_y
        out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0.0, float(self.width))
        out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0.0, float(self.height))
        return out


@dataclass(frozen=True)
class InputSpec:
    """Everything needed to turn an RGB image into one model input (without batch axis)."""

    width: int
    height: int
    resize: Literal["letterbox", "stretch"]
    pad_value: int
    pad_position: Literal["center", "top_left"]
    interpolation: Literal["linear", "area", "nearest", "cubic"]
    normalization: Normalization
    # float32, or float16 for a half-precision model input.
    dtype: type[np.floating[Any]] = np.float32

    @classmethod
    def of(cls, section: ModelSection) -> InputSpec:
        """The input a detector or classifier section describes (float32 until loaded)."""
        return cls(
            width=section.input_size[0],
            height=section.input_size[1],
            resize=section.resize,
            pad_value=section.pad_value,
            pad_position=section.pad_position,
            interpolation=section.interpolation,
            normalization=section.normalization,
        )

    def tensor_shape(self) -> tuple[int, int, int]:
        if self.normalization.layout == "NCHW":
            return (3, self.height, self.width)
        return (self.height, self.width, 3)


def as_rgb(pixels: npt.NDArray[np.generic]) -> RGBImage:
    """Coerce a grayscale, RGB or RGBA uint8 array to contiguous RGB; ValueError otherwise."""
    if pixels.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {pixels.dtype}")
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    elif pixels.ndim == 3 and pixels.shape[2] == 4:
        pixels = pixels[:, :, :3]
    elif pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an image of shape (H, W, 3), got {pixels.shape}")
    if pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise ValueError(f"empty image of shape {pixels.shape}")
    rgb: RGBImage = np.ascontiguousarray(pixels, dtype=np.uint8)
    return rgb


def fit(rgb: RGBImage, spec: InputSpec) -> tuple[RGBImage, Geometry]:
    """Resize (stretch, or letterbox: keep aspect ratio and pad) to the model's input size."""
    height, width = rgb.shape[:2]
    interpolation = _INTERPOLATION[spec.interpolation]
    if spec.resize == "stretch":
        resized = cv2.resize(rgb, (spec.width, spec.height), interpolation=interpolation)
        geometry = Geometry(
            width, height, spec.width / width, spec.height / height, pad_x=0.0, pad_y=0.0
        )
        out: RGBImage = np.asarray(resized, dtype=np.uint8)
        return out, geometry
    ratio = min(spec.width / width, spec.height / height)
    new_w = min(spec.width, max(1, round(width * ratio)))
    new_h = min(spec.height, max(1, round(height * ratio)))
    if spec.pad_position == "center":
        left, top = (spec.width - new_w) // 2, (spec.height - new_h) // 2
    else:
        left, top = 0, 0
    canvas = np.full((spec.height, spec.width, 3), spec.pad_value, dtype=np.uint8)
    if (new_w, new_h) == (width, height):
        canvas[top : top + new_h, left : left + new_w] = rgb
    else:
        resized = cv2.resize(rgb, (new_w, new_h), interpolation=interpolation)
        canvas[top : top + new_h, left : left + new_w] = resized
    geometry = Geometry(width, height, new_w / width, new_h / height, float(left), float(top))
    return canvas, geometry


def to_tensor(fitted: RGBImage, spec: InputSpec) -> Tensor:
    """Normalize a fitted image into the model's channel order, layout and dtype."""
    norm = spec.normalization
    if norm.channel_order == "BGR":
        fitted = fitted[:, :, ::-1]
    std = np.asarray(norm.std, dtype=np.float32)
    # (p * scale - mean) / std as one multiply-add per pixel.
    gain = np.float32(norm.scale) / std
    offset = -np.asarray(norm.mean, dtype=np.float32) / std
    values = fitted.astype(np.float32) * gain + offset
    if norm.layout == "NCHW":
        values = values.transpose(2, 0, 1)
    tensor: Tensor = np.ascontiguousarray(values, dtype=spec.dtype)
    return tensor


def prepare(rgb: RGBImage, spec: InputSpec) -> tuple[Tensor, Geometry]:
    """One image as a model input (no batch axis) and the geometry to map boxes back."""
    fitted, geometry = fit(rgb, spec)
    return to_tensor(fitted, spec), geometry


def crop(rgb: RGBImage, bbox: tuple[float, float, float, float], margin: float) -> RGBImage:
    """The box (grown by ``margin`` of its size on each side) as a view of the image, >= 1 px."""
    height, width = rgb.shape[:2]
    x1, y1, x2, y2 = bbox
    dx, dy = (x2 - x1) * margin, (y2 - y1) * margin
    # Outward rounding: a box edge inside a pixel keeps that pixel.
    left = int(np.clip(np.floor(x1 - dx), 0, width - 1))
    top = int(np.clip(np.floor(y1 - dy), 0, height - 1))
    right = int(np.clip(np.ceil(x2 + dx), left + 1, width))
    bottom = int(np.clip(np.ceil(y2 + dy), top + 1, height))
    # A view, not a copy: only the resized crop is ever materialised.
    out: RGBImage = rgb[top:bottom, left:right]
    return out
