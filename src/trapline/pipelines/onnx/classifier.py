"""The classifier stage: one crop per detection, one set of scores per crop."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from trapline.errors import PipelineError
from trapline.pipelines.base import Algorithm, Classification, RGBImage
from trapline.pipelines.onnx.config import ClassifierSection, RuntimeSection
from trapline.pipelines.onnx.preprocess import InputSpec, Tensor, prepare
from trapline.pipelines.onnx.runtime import Array, OnnxModel

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]


def softmax(logits: FloatArray) -> FloatArray:
    shifted = np.exp(logits - np.max(logits))
    out: FloatArray = shifted / shifted.sum()
    return out


def to_classification(
    scores: FloatArray, labels: Sequence[str], top_k: int | None, key: str
) -> Classification:
    """The best label, and the scores kept (all, or the ``top_k`` best), in label order."""
    best = int(np.argmax(scores))
    if top_k is None or top_k >= len(labels):
        kept: list[int] = list(range(len(labels)))
    else:
        # Stable sort: equal scores keep the earlier label, the same one argmax picks.
        kept = sorted(int(i) for i in np.argsort(-scores, kind="stable")[:top_k])
    return Classification(
        label=labels[best],
        labels=[labels[i] for i in kept],
        scores=[float(scores[i]) for i in kept],
        algorithm_key=key,
        terminal=True,
    )


@dataclass(frozen=True)
class Classified:
    """One crop's classification and the model time spent on it."""

    classification: Classification
    seconds: float


class Classifier:
    """The crop model of an ONNX pipeline; :meth:`load` creates the session."""

    def __init__(self, section: ClassifierSection, labels: list[str], key: str) -> None:
        self.section = section
        self.labels = labels
        self.key = key
        self.spec = InputSpec.of(section)
        self.model: OnnxModel | None = None
        self._output = ""

    def algorithm(self, version: int) -> Algorithm:
        return Algorithm(
            key=self.key,
            name=self.section.name or f"ONNX classifier ({self.section.model.name})",
            task_type="classification",
            version=version,
            description=f"ONNX model {self.section.model.name} on each detection's crop.",
            category_map={
                "labels": list(self.labels),
                "data": [{"index": i, "label": label} for i, label in enumerate(self.labels)],
            },
        )

    def load(self, runtime: RuntimeSection) -> None:
        """Create the session and check it against the configuration; PipelineError if not."""
        model = OnnxModel(self.section.model, runtime, "classifier")
        model.check_input_size(*self.section.input_size, self.section.normalization.layout)
        names = model.output_names
        output = self.section.output or names[0]
        if output not in names:
            raise PipelineError(
                f"classifier model {model.path} has no output {output!r} "
                f"(outputs: {', '.join(names)})"
            )
        shape = next(o.shape for o in model.session.get_outputs() if o.name == output) or []
        classes = shape[-1] if shape else None
        if isinstance(classes, int) and classes > 0 and classes != len(self.labels):
            raise PipelineError(
                f"classifier output {output!r} has {classes} classes "
                f"but there are {len(self.labels)} labels"
            )
        model.batched = model.batch_dynamic and model.output_rank(output) == 2
        self.spec = replace(self.spec, dtype=model.input_dtype)
        self._output = output
        self.model = model
        logger.info(
            "classifier %s: input %s, %d labels, %s",
            model.path.name,
            model.input_shape,
            len(self.labels),
            "batched" if model.batched else "one crop per run",
        )

    def classify(self, crops: Sequence[RGBImage]) -> list[Classified | Exception]:
        """A classification per crop, or the exception that crop's run raised.

        Crops are turned into tensors one batch at a time, so a frame with
        hundreds of detections never holds hundreds of input tensors at once.
        """
        if self.model is None:
            raise PipelineError("the classifier is not loaded; call load() first")
        results: list[Classified | Exception] = []
        step = self.section.batch_size
        for first in range(0, len(crops), step):
            results.extend(self._classify_chunk(self.model, crops[first : first + step]))
        return results

    def _classify_chunk(
        self, model: OnnxModel, crops: Sequence[RGBImage]
    ) -> list[Classified | Exception]:
        results: list[Classified | Exception | None] = [None] * len(crops)
        tensors: list[Tensor] = []
        positions: list[int] = []
        for i, crop in enumerate(crops):
            try:
                tensors.append(prepare(crop, self.spec)[0])
                positions.append(i)
            except Exception as exc:
                results[i] = exc
        outcomes = model.run(tensors, [self._output], self.section.batch_size)
        for i, outcome in zip(positions, outcomes, strict=True):
            if isinstance(outcome, Exception):
                results[i] = outcome
                continue
            try:
                scores = self.scores(outcome.outputs[0])
                classification = to_classification(
                    scores, self.labels, self.section.top_k, self.key
                )
                results[i] = Classified(classification, outcome.seconds)
            except Exception as exc:
                results[i] = exc
        # Every slot is filled above: by its outcome or by the error preparing it.
        return [r if r is not None else RuntimeError("crop was not classified") for r in results]

    def scores(self, output: Array) -> FloatArray:
        """One crop's scores in label order: the output flattened, softmaxed if configured."""
        values = np.asarray(output, dtype=np.float64)
        if values.size != len(self.labels):
            raise ValueError(
                f"classifier output has shape {values.shape}; {len(self.labels)} scores expected"
            )
        values = values.reshape(-1)
        return softmax(values) if self.section.softmax else values
