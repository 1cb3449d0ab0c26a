"""Where pipelines come from: the built-in tiny models or a local diffusers folder. Never the network."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import torch
from diffusers.pipelines.ltx.pipeline_ltx import LTXPipeline
from diffusers.pipelines.ltx.pipeline_ltx_image2video import LTXImageToVideoPipeline
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.pipelines.stable_audio.pipeline_stable_audio import StableAudioPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import StableDiffusionImg2ImgPipeline

from inference.engine.kinds import BUILTIN_MODELS, KINDS_OF_FAMILY, PIPELINE_CLASS_FAMILIES, Family, PipelineKind
from inference.engine.optimize import ModuleOptimizations
from inference.engine.tiny import build_tiny_pipeline, quiet
from inference.engine.tiny_media import build_tiny_audio_pipeline, build_tiny_video_pipeline

# What the engine loads, caches and runs: every kind of a model derives from its base pipeline's modules (text to
# image, text to video, text to audio).
ImagePipeline: TypeAlias = StableDiffusionPipeline | StableDiffusionImg2ImgPipeline
VideoPipeline: TypeAlias = LTXPipeline | LTXImageToVideoPipeline
Pipeline: TypeAlias = ImagePipeline | VideoPipeline | StableAudioPipeline
BasePipeline: TypeAlias = StableDiffusionPipeline | LTXPipeline | StableAudioPipeline

BUILTIN_PREFIX = "builtin:"
SUPPORTED_PIPELINE_CLASSES = PIPELINE_CLASS_FAMILIES
_BASE_CLASSES: dict[Family, type[DiffusionPipeline]] = {
    Family.IMAGE: StableDiffusionPipeline,
    Family.VIDEO: LTXPipeline,
    Family.AUDIO: StableAudioPipeline,
}

# No module optimization: the modules as diffusers builds them.
STOCK_MODULES = ModuleOptimizations()
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
    """Load one pipeline of `kind` from `source` (`builtin:tiny-sd`, `builtin:tiny-ltx-video`, ... or a diffusers
    folder)."""
    return pipeline_for_kind(load_base_pipeline(source, options=options), kind)


def source_family(source: str) -> Family:
    """The family of the model at `source`, from its name or its folder's model_index.json (no weights read)."""
    if source.startswith(BUILTIN_PREFIX):
        return _builtin(source.removeprefix(BUILTIN_PREFIX))[0]
    return _diffusers_folder(source)[1]


def load_base_pipeline(source: str, *, options: LoadOptions | None = None) -> BasePipeline:
    """The base pipeline of `source` (text to image, video or audio), on `options.device` in `options.dtype`;
    every kind of the model derives from it."""
    options = options or LoadOptions()
    pipeline: Any
    if source.startswith(BUILTIN_PREFIX):
        family, preset = _builtin(source.removeprefix(BUILTIN_PREFIX))
        builders = {
            Family.IMAGE: build_tiny_pipeline,
            Family.VIDEO: build_tiny_video_pipeline,
            Family.AUDIO: build_tiny_audio_pipeline,
        }
        pipeline = builders[family](preset)
        if options.torch_dtype != torch.float32:
            pipeline = pipeline.to(dtype=options.torch_dtype)
    else:
        folder, family = _diffusers_folder(source)
        # local_files_only: a folder that is not a complete diffusers model fails here instead of reaching
        # for the hub. The safety checker is not run by this engine, so it is not loaded either.
        extra: dict[str, Any] = (
            {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
            if family is Family.IMAGE
            else {}
        )
        pipeline = _BASE_CLASSES[family].from_pretrained(
            str(folder), local_files_only=True, dtype=options.torch_dtype, **extra
        )
    base: BasePipeline = quiet(pipeline).to(options.device)
    return base


def pipeline_for_kind(base: BasePipeline, kind: PipelineKind | str) -> Pipeline:
    """A pipeline of `kind` sharing `base`'s modules (no copy of any weight).

    A derived pipeline (image to image, image to video) gets a scheduler of its own (same config): schedulers keep
    per-run state, and a scheduler shared by two pipelines would let a run of one disturb a run of the other.
    Raises `ModelSourceError` for a kind the model does not make (a video model asked for audio).
    """
    kind = PipelineKind(kind)
    family = base_family(base)
    if kind not in KINDS_OF_FAMILY[family]:
        raise ModelSourceError(f"a {family} model serves {', '.join(KINDS_OF_FAMILY[family])}, not {kind}")
    if kind is KINDS_OF_FAMILY[family][0]:
        return base
    components = dict(base.components)
    components["scheduler"] = type(base.scheduler).from_config(base.scheduler.config)
    if kind is PipelineKind.IMAGE_TO_VIDEO:
        return quiet(LTXImageToVideoPipeline(**components))
    return quiet(StableDiffusionImg2ImgPipeline(**components, requires_safety_checker=False))


def base_family(pipeline: Any) -> Family:
    for family, base_class in _BASE_CLASSES.items():
        if isinstance(pipeline, base_class):
            return family
    raise TypeError(f"not a pipeline this engine runs: {type(pipeline).__name__}")


def pipeline_kind(pipeline: Pipeline) -> PipelineKind:
    # Derived classes first: an image-to-video pipeline is no text-to-video one, nor image to image text to image.
    kinds: tuple[tuple[type[Any], PipelineKind], ...] = (
        (StableDiffusionImg2ImgPipeline, PipelineKind.IMAGE_TO_IMAGE),
        (StableDiffusionPipeline, PipelineKind.TEXT_TO_IMAGE),
        (LTXImageToVideoPipeline, PipelineKind.IMAGE_TO_VIDEO),
        (LTXPipeline, PipelineKind.TEXT_TO_VIDEO),
        (StableAudioPipeline, PipelineKind.TEXT_TO_AUDIO),
    )
    for pipeline_class, kind in kinds:
        if isinstance(pipeline, pipeline_class):
            return kind
    raise TypeError(f"not a pipeline this engine runs: {type(pipeline).__name__}")


def _builtin(name: str) -> tuple[Family, str]:
    if name not in BUILTIN_MODELS:
        raise ModelSourceError(f"unknown built-in model {name!r}; known: {sorted(BUILTIN_MODELS)}")
    return BUILTIN_MODELS[name]


def save_builtin_model(name: str, folder: str | Path) -> Path:
    """Write a built-in model (`tiny-sd` or `builtin:tiny-sd`, `tiny-ltx-video`, ...) as a diffusers folder
    `load_pipeline` reads."""
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


def _diffusers_folder(source: str) -> tuple[Path, Family]:
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
    return folder, SUPPORTED_PIPELINE_CLASSES[pipeline_class]
