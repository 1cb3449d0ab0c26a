"""Where pipelines come from: the built-in tiny models or a local diffusers folder. Never the network."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeAlias

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import StableDiffusionImg2ImgPipeline

from inference.engine.optimize import ModuleOptimizations
from inference.engine.tiny import PRESETS, build_tiny_pipeline, quiet

# What the engine loads, caches and runs: every kind derives from the text-to-image pipeline's modules.
Pipeline: TypeAlias = StableDiffusionPipeline | StableDiffusionImg2ImgPipeline

BUILTIN_PREFIX = "builtin:"
# Source name -> preset: `builtin:tiny-sd` is the `tiny` preset.
BUILTIN_MODELS = {f"{preset}-sd": preset for preset in PRESETS}
# Folders whose model_index.json names one of these hold SD 1.x/2.x-style components we know how to run.
SUPPORTED_PIPELINE_CLASSES = frozenset({"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"})

# No module optimization: the modules as diffusers builds them.
STOCK_MODULES = ModuleOptimizations()
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class PipelineKind(StrEnum):
    TEXT_TO_IMAGE = "text-to-image"
    IMAGE_TO_IMAGE = "image-to-image"


class ModelSourceError(ValueError):
    """The source names no model we can load (unknown built-in, missing folder, unsupported pipeline)."""


@dataclass(frozen=True)
class LoadOptions:
    """How to place the weights and which optimizations change the modules. Hashable: part of a cache key."""

    device: str = "cpu"
    dtype: str = "float32"
    optimizations: ModuleOptimizations = STOCK_MODULES

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, not {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


def default_device() -> str:
    """Where this process runs models: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def builtin_source(name: str) -> str:
    """`builtin_source("tiny-sd") == "builtin:tiny-sd"`."""
    return BUILTIN_PREFIX + name


def load_pipeline(
    source: str, kind: PipelineKind | str = PipelineKind.TEXT_TO_IMAGE, *, options: LoadOptions | None = None
) -> Pipeline:
    """Load one pipeline of `kind` from `source` (`builtin:tiny-sd`, `builtin:small-sd` or a diffusers folder)."""
    return pipeline_for_kind(load_base_pipeline(source, options=options), kind)


def load_base_pipeline(source: str, *, options: LoadOptions | None = None) -> StableDiffusionPipeline:
    """The text-to-image pipeline of `source`, on `options.device` in `options.dtype`; every kind derives from it."""
    options = options or LoadOptions()
    if source.startswith(BUILTIN_PREFIX):
        name = source.removeprefix(BUILTIN_PREFIX)
        if name not in BUILTIN_MODELS:
            raise ModelSourceError(f"unknown built-in model {name!r}; known: {sorted(BUILTIN_MODELS)}")
        pipeline = build_tiny_pipeline(BUILTIN_MODELS[name])
        if options.torch_dtype != torch.float32:
            pipeline = pipeline.to(dtype=options.torch_dtype)
    else:
        folder = _diffusers_folder(source)
        # local_files_only: a folder that is not a complete diffusers model fails here instead of reaching
        # for the hub. The safety checker is not run by this engine, so it is not loaded either.
        pipeline = StableDiffusionPipeline.from_pretrained(
            str(folder),
            local_files_only=True,
            dtype=options.torch_dtype,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return quiet(pipeline).to(options.device)


def pipeline_for_kind(base: StableDiffusionPipeline, kind: PipelineKind | str) -> Pipeline:
    """A pipeline of `kind` sharing `base`'s modules (no copy of any weight).

    The image-to-image pipeline gets a scheduler of its own (same config): schedulers keep per-run state,
    and a scheduler shared by two pipelines would let a run of one disturb a run of the other.
    """
    kind = PipelineKind(kind)
    if kind is PipelineKind.TEXT_TO_IMAGE:
        return base
    components = dict(base.components)
    components["scheduler"] = type(base.scheduler).from_config(base.scheduler.config)
    return quiet(StableDiffusionImg2ImgPipeline(**components, requires_safety_checker=False))


def pipeline_kind(pipeline: Pipeline) -> PipelineKind:
    if isinstance(pipeline, StableDiffusionImg2ImgPipeline):
        return PipelineKind.IMAGE_TO_IMAGE
    if isinstance(pipeline, StableDiffusionPipeline):
        return PipelineKind.TEXT_TO_IMAGE
    raise TypeError(f"not a pipeline this engine runs: {type(pipeline).__name__}")


def save_builtin_model(name: str, folder: str | Path) -> Path:
    """Write a built-in model (`tiny-sd` or `builtin:tiny-sd`, ...) as a diffusers folder `load_pipeline` reads."""
    pipeline = load_base_pipeline(builtin_source(name.removeprefix(BUILTIN_PREFIX)))
    folder = Path(folder)
    pipeline.save_pretrained(str(folder), safe_serialization=True)
    return folder


def pipeline_nbytes(pipeline: Any) -> int:
    """Bytes held by the parameters and buffers of a pipeline's torch modules, each tensor counted once."""
    return modules_nbytes(pipeline.components.values())


def modules_nbytes(components: Iterable[object]) -> int:
    seen: set[tuple[str, int]] = set()
    total = 0
    for component in components:
        if not isinstance(component, torch.nn.Module):
            continue
        for tensor in (*component.parameters(), *component.buffers()):
            key = (str(tensor.device), tensor.untyped_storage().data_ptr())
            if tensor.numel() == 0 or key in seen:
                continue
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


def _diffusers_folder(source: str) -> Path:
    folder = Path(source).expanduser()
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ModelSourceError(f"{source!r} is not a diffusers folder (no model_index.json)")
    try:
        pipeline_class = json.loads(index_file.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError) as error:
        raise ModelSourceError(f"{index_file} cannot be read: {error}") from error
    if pipeline_class not in SUPPORTED_PIPELINE_CLASSES:
        raise ModelSourceError(f"{source!r} holds a {pipeline_class}; supported: {sorted(SUPPORTED_PIPELINE_CLASSES)}")
    return folder
