"""The diffusion engine GPU workers run: load (and keep warm) optimized pipelines, run batches, encode outputs.

Plain Python on diffusers and torch, no Django. Models come from the built-in tiny configs or a local
diffusers folder; nothing here reaches the network.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from inference.engine.batch_shares import BatchMeter, MeterReading, largest_remainder
    from inference.engine.cache import AnyEngine, LoadedPipeline, PipelineCache
    from inference.engine.engine import BatchIncompatible, Engine, RunOptions, batch_key
    from inference.engine.kinds import BUILTIN_MODELS, KINDS_OF_FAMILY, SUB_PATHS, Family, PipelineKind
    from inference.engine.loading import (
        LoadOptions,
        ModelSourceError,
        Pipeline,
        builtin_source,
        default_device,
        load_pipeline,
        pipeline_nbytes,
        save_builtin_model,
        source_family,
    )
    from inference.engine.media import MediaEngine, frames_to_generate, media_batch_key
    from inference.engine.optimize import ModuleOptimizations, configure_compile_cache
    from inference.engine.outputs import (
        EncodedAudio,
        EncodedImage,
        EncodedVideo,
        encode_audio,
        encode_image,
        encode_video,
        video_poster,
    )
    from inference.engine.previews import LatentProjection, Preview, PreviewOptions, latents_to_rgb, make_preview
    from inference.engine.profile import STOCK_PROFILE, OptimizationProfile, ProfileError, resolve, validate_profile
    from inference.engine.runtime import Cancelled, GenerationRequest, GenerationResult, run_pipeline
    from inference.engine.tiny import PRESETS, TinyPreset, build_tiny_pipeline
    from inference.engine.tiny_media import build_tiny_audio_pipeline, build_tiny_video_pipeline

# Where each public name lives; the heavy modules (torch, diffusers) load on first use, so the
# web process can use the light ones (outputs, profile, batch_shares) without importing the engine.
_HOMES = {
    "AnyEngine": "cache",
    "LoadedPipeline": "cache",
    "PipelineCache": "cache",
    "BatchIncompatible": "runtime",
    "Engine": "engine",
    "RunOptions": "engine",
    "batch_key": "engine",
    "BatchMeter": "batch_shares",
    "MeterReading": "batch_shares",
    "largest_remainder": "batch_shares",
    "ModuleOptimizations": "optimize",
    "configure_compile_cache": "optimize",
    "OptimizationProfile": "profile",
    "STOCK_PROFILE": "profile",
    "ProfileError": "profile",
    "resolve": "profile",
    "validate_profile": "profile",
    "BUILTIN_MODELS": "kinds",
    "Family": "kinds",
    "KINDS_OF_FAMILY": "kinds",
    "SUB_PATHS": "kinds",
    "source_family": "loading",
    "MediaEngine": "media",
    "frames_to_generate": "media",
    "media_batch_key": "media",
    "EncodedAudio": "outputs",
    "EncodedVideo": "outputs",
    "encode_audio": "outputs",
    "encode_video": "outputs",
    "video_poster": "outputs",
    "build_tiny_audio_pipeline": "tiny_media",
    "build_tiny_video_pipeline": "tiny_media",
    "LoadOptions": "loading",
    "ModelSourceError": "loading",
    "Pipeline": "loading",
    "PipelineKind": "kinds",
    "builtin_source": "loading",
    "default_device": "loading",
    "load_pipeline": "loading",
    "pipeline_nbytes": "loading",
    "save_builtin_model": "loading",
    "EncodedImage": "outputs",
    "LatentProjection": "previews",
    "Preview": "previews",
    "PreviewOptions": "previews",
    "latents_to_rgb": "previews",
    "make_preview": "previews",
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
    "KINDS_OF_FAMILY",
    "PRESETS",
    "STOCK_PROFILE",
    "SUB_PATHS",
    "AnyEngine",
    "BatchIncompatible",
    "BatchMeter",
    "Cancelled",
    "EncodedAudio",
    "EncodedImage",
    "EncodedVideo",
    "Engine",
    "Family",
    "GenerationRequest",
    "GenerationResult",
    "LatentProjection",
    "LoadOptions",
    "LoadedPipeline",
    "MediaEngine",
    "MeterReading",
    "ModelSourceError",
    "ModuleOptimizations",
    "OptimizationProfile",
    "Pipeline",
    "PipelineCache",
    "PipelineKind",
    "Preview",
    "PreviewOptions",
    "ProfileError",
    "RunOptions",
    "TinyPreset",
    "batch_key",
    "build_tiny_audio_pipeline",
    "build_tiny_pipeline",
    "build_tiny_video_pipeline",
    "builtin_source",
    "configure_compile_cache",
    "default_device",
    "encode_audio",
    "encode_image",
    "encode_video",
    "frames_to_generate",
    "largest_remainder",
    "latents_to_rgb",
    "load_pipeline",
    "make_preview",
    "media_batch_key",
    "pipeline_nbytes",
    "resolve",
    "run_pipeline",
    "save_builtin_model",
    "source_family",
    "validate_profile",
    "video_poster",
]
