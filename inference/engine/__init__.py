"""The diffusion engine GPU workers call: load (and keep warm) pipelines, run requests, encode outputs.

Plain Python on diffusers and torch, no Django. Models come from the built-in tiny configs or a local
diffusers folder; nothing here reaches the network.
"""

from inference.engine.cache import LoadedPipeline, PipelineCache
from inference.engine.loading import (
    BUILTIN_MODELS,
    LoadOptions,
    ModelSourceError,
    Pipeline,
    PipelineKind,
    builtin_source,
    load_pipeline,
    pipeline_nbytes,
    save_builtin_model,
)
from inference.engine.outputs import EncodedImage, encode_image
from inference.engine.runtime import Cancelled, GenerationRequest, GenerationResult, run_pipeline
from inference.engine.tiny import PRESETS, TinyPreset, build_tiny_pipeline

__all__ = [
    "BUILTIN_MODELS",
    "PRESETS",
    "Cancelled",
    "EncodedImage",
    "GenerationRequest",
    "GenerationResult",
    "LoadOptions",
    "LoadedPipeline",
    "ModelSourceError",
    "Pipeline",
    "PipelineCache",
    "PipelineKind",
    "TinyPreset",
    "build_tiny_pipeline",
    "builtin_source",
    "encode_image",
    "load_pipeline",
    "pipeline_nbytes",
    "run_pipeline",
    "save_builtin_model",
]
