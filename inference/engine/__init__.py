"""The diffusion engine GPU workers call: load (and keep warm) pipelines, run requests, encode outputs.

Plain Python on diffusers and torch, no Django. Models come from the built-in tiny configs or a local
diffusers folder; nothing here reaches the network.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

# Where each public name lives; the heavy modules (torch, diffusers) load on first use, so the
# web process can use the light ones (outputs) without importing the engine.
_HOMES = {
    "LoadedPipeline": "cache",
    "PipelineCache": "cache",
    "BUILTIN_MODELS": "loading",
    "LoadOptions": "loading",
    "ModelSourceError": "loading",
    "Pipeline": "loading",
    "PipelineKind": "loading",
    "builtin_source": "loading",
    "load_pipeline": "loading",
    "pipeline_nbytes": "loading",
    "save_builtin_model": "loading",
    "EncodedImage": "outputs",
    "encode_image": "outputs",
    "Cancelled": "runtime",
    "GenerationRequest": "runtime",
    "GenerationResult": "runtime",
    "run_pipeline": "runtime",
    "PRESETS": "tiny",
    "TinyPreset": "tiny",
    "build_tiny_pipeline": "tiny",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)


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
