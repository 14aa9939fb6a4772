"""onnxruntime sessions: lazy import, execution provider choice, batched runs.

onnxruntime is an optional extra, so it is imported only when a session is
made; trapline without it still lists, validates and describes ONNX pipelines.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from trapline.errors import PipelineError
from trapline.pipelines.onnx.config import RuntimeSection

logger = logging.getLogger(__name__)

Array = npt.NDArray[Any]

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

_INPUT_DTYPES: dict[str, type[np.floating[Any]]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
}


def import_onnxruntime() -> ModuleType:
    """The onnxruntime module; PipelineError with the install hint when it is missing."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise PipelineError(
            f"ONNX pipelines need onnxruntime ({exc}): install trapline[onnx], "
            "e.g. pip install 'trapline[onnx]'"
        ) from exc
    module: ModuleType = ort
    return module


def _providers(ort: ModuleType, device: str) -> list[str]:
    available = set(ort.get_available_providers())
    if device == "cpu":
        return [CPU]
    if CUDA in available:
        # CPU stays listed for the operators the CUDA provider lacks.
        return [CUDA, CPU]
    if device == "cuda":
        raise PipelineError(
            "device = 'cuda' but onnxruntime has no CUDAExecutionProvider "
            f"(available: {', '.join(sorted(available))}); install onnxruntime-gpu"
        )
    return [CPU]


@dataclass(frozen=True)
class Outcome:
    """One item's model outputs (batch axis removed when the run was batched) and its time share."""

    outputs: list[Array]
    seconds: float


class OnnxModel:
    """One onnxruntime session over a single-input model, run one by one or in batches."""

    def __init__(self, path: Path, runtime: RuntimeSection, role: str) -> None:
        self.path = path
        self.role = role
        if not path.is_file():
            raise PipelineError(f"{role} model file not found: {path}")
        ort = import_onnxruntime()
        options = ort.SessionOptions()
        if runtime.threads:
            options.intra_op_num_threads = runtime.threads
        try:
            self.session: Any = ort.InferenceSession(
                str(path), sess_options=options, providers=_providers(ort, runtime.device)
            )
        except PipelineError:
            raise
        except Exception as exc:
            raise PipelineError(f"cannot load {role} model {path}: {exc}") from exc
        # What the session really uses: a CUDA provider that fails to initialise
        # (no cuDNN, no GPU) falls back to CPU with only a log line of its own.
        self.provider: str = self.session.get_providers()[0]
        if runtime.device == "cuda" and self.provider != CUDA:
            raise PipelineError(f"device = 'cuda' but the {role} model runs on {self.provider}")
        logger.info("%s model %s runs on %s", role, path.name, self.provider)

        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            names = ", ".join(i.name for i in inputs)
            raise PipelineError(
                f"{role} model {path} has {len(inputs)} inputs ({names}); one image input expected"
            )
        self.input_name: str = inputs[0].name
        self.input_shape: list[int | str | None] = list(inputs[0].shape or [])
        dtype = _INPUT_DTYPES.get(inputs[0].type)
        if dtype is None:
            raise PipelineError(
                f"{role} model {path} input {self.input_name!r} is {inputs[0].type}; "
                "float or float16 expected"
            )
        self.input_dtype: type[np.floating[Any]] = dtype
        if len(self.input_shape) != 4:
            raise PipelineError(
                f"{role} model {path} input {self.input_name!r} has shape {self.input_shape}; "
                "a 4-D image batch (NCHW or NHWC) expected"
            )
        batch = self.input_shape[0]
        self.batch_dynamic = not (isinstance(batch, int) and batch > 0)
        if not self.batch_dynamic and batch != 1:
            raise PipelineError(
                f"{role} model {path} has a fixed batch size of {batch}; "
                "export it with batch size 1 or a dynamic batch axis"
            )
        self.output_names: list[str] = [o.name for o in self.session.get_outputs()]
        self._output_ranks: dict[str, int | None] = {
            o.name: (len(o.shape) if o.shape is not None else None)
            for o in self.session.get_outputs()
        }
        # Set by the detector / classifier once it knows its outputs carry a batch axis.
        self.batched = False

    def output_rank(self, name: str) -> int | None:
        """The output's declared rank, or None when the model does not say."""
        return self._output_ranks.get(name)

    def check_input_size(self, width: int, height: int, layout: str) -> None:
        """PipelineError when the model's fixed input dims contradict the configured ones."""
        shape = self.input_shape
        if layout == "NCHW":
            channels, dims = shape[1], (shape[2], shape[3])
        else:
            channels, dims = shape[3], (shape[1], shape[2])
        where = f"{self.role} model {self.path} input shape {shape}"
        if isinstance(channels, int) and channels != 3:
            other = "NHWC" if layout == "NCHW" else "NCHW"
            raise PipelineError(
                f"{where} has {channels} channels for layout = '{layout}'; is the layout '{other}'?"
            )
        for got, want, what in ((dims[0], height, "height"), (dims[1], width, "width")):
            if isinstance(got, int) and got > 0 and got != want:
                raise PipelineError(
                    f"{where} has {what} {got} but input_size says {want}; fix input_size"
                )

    def run(
        self, items: Sequence[Array], outputs: Sequence[str], batch_size: int
    ) -> list[Outcome | Exception]:
        """Run every item; per item its outputs, or the exception its run raised.

        Batched models take up to ``batch_size`` items per run; when a batch
        fails (a bad item, memory), its items are retried one by one so the
        error stays with the item that caused it.
        """
        results: list[Outcome | Exception] = []
        if not self.batched:
            return [self._run_safely([item], outputs) for item in items]
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            try:
                results.extend(self._run_batch(chunk, outputs))
            except Exception as exc:
                if len(chunk) == 1:
                    results.append(exc)
                    continue
                logger.warning(
                    "%s batch of %d failed (%s); retrying one by one", self.role, len(chunk), exc
                )
                results.extend(self._run_safely([item], outputs) for item in chunk)
        return results

    def _run_safely(self, chunk: Sequence[Array], outputs: Sequence[str]) -> Outcome | Exception:
        try:
            return self._run_batch(chunk, outputs)[0]
        except Exception as exc:
            return exc

    def _run_batch(self, chunk: Sequence[Array], outputs: Sequence[str]) -> list[Outcome]:
        batch = np.stack(chunk) if len(chunk) > 1 else chunk[0][None]
        start = time.perf_counter()
        raw = self.session.run(list(outputs), {self.input_name: batch})
        share = (time.perf_counter() - start) / len(chunk)
        arrays = [np.asarray(a) for a in raw]
        if not self.batched:
            # Not batched: the decoder gets the outputs as they are (with or
            # without a leading axis of 1) and sorts out their ranks itself.
            return [Outcome(arrays, share)]
        for name, array in zip(outputs, arrays, strict=True):
            if array.ndim == 0 or array.shape[0] != len(chunk):
                raise PipelineError(
                    f"{self.role} output {name!r} has shape {array.shape} "
                    f"for a batch of {len(chunk)}"
                )
        return [Outcome([a[i] for a in arrays], share) for i in range(len(chunk))]
