"""ONNX pipelines described by a TOML file (``trapline worker --pipeline-file my.toml``).

A file names a detector model, optionally a crop classifier, and how to feed and
read them; see ``docs/onnx-pipelines.md``. Importing this package does not import
onnxruntime (the ``trapline[onnx]`` extra): only ``Pipeline.load()`` needs it.
"""

from trapline.pipelines.onnx.config import OnnxPipelineConfig, load_config
from trapline.pipelines.onnx.pipeline import OnnxPipeline, load_pipeline_file

__all__ = ["OnnxPipeline", "OnnxPipelineConfig", "load_config", "load_pipeline_file"]
