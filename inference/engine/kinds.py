"""What models make and which pipelines make it: plain Python, so the web process reads it without torch.

A model belongs to a family (image, video, audio) by its base pipeline; each family serves a few kinds (its base
kind first). A diffusers folder's ``model_index.json`` names its pipeline class, which gives its family.
"""

from __future__ import annotations

from enum import StrEnum


class Family(StrEnum):
    """What a model makes; each family has its base pipeline class and the kinds it serves."""

    IMAGE = "image"
    VIDEO = "video"
    AUDIO = "audio"


class PipelineKind(StrEnum):
    TEXT_TO_IMAGE = "text-to-image"
    IMAGE_TO_IMAGE = "image-to-image"
    TEXT_TO_VIDEO = "text-to-video"
    IMAGE_TO_VIDEO = "image-to-video"
    TEXT_TO_AUDIO = "text-to-audio"

    @property
    def family(self) -> Family:
        return next(family for family, kinds in KINDS_OF_FAMILY.items() if self in kinds)


# The kinds each family serves, its base kind (the one its base pipeline runs) first, with the sub-path each is
# served under beside the model's own id (`local/<folder>/image-to-video`).
KINDS_OF_FAMILY: dict[Family, tuple[PipelineKind, ...]] = {
    Family.IMAGE: (PipelineKind.TEXT_TO_IMAGE, PipelineKind.IMAGE_TO_IMAGE),
    Family.VIDEO: (PipelineKind.TEXT_TO_VIDEO, PipelineKind.IMAGE_TO_VIDEO),
    Family.AUDIO: (PipelineKind.TEXT_TO_AUDIO,),
}
SUB_PATHS: dict[PipelineKind, str] = {
    PipelineKind.TEXT_TO_IMAGE: "",
    PipelineKind.IMAGE_TO_IMAGE: "image-to-image",
    PipelineKind.TEXT_TO_VIDEO: "",
    PipelineKind.IMAGE_TO_VIDEO: "image-to-video",
    PipelineKind.TEXT_TO_AUDIO: "",
}

# A diffusers folder's model_index.json names its pipeline class: these are the ones the engine runs, and the
# family each belongs to (SD 1.x/2.x-style image models, LTX-Video, Stable Audio Open).
PIPELINE_CLASS_FAMILIES: dict[str, Family] = {
    "StableDiffusionPipeline": Family.IMAGE,
    "StableDiffusionImg2ImgPipeline": Family.IMAGE,
    "LTXPipeline": Family.VIDEO,
    "LTXImageToVideoPipeline": Family.VIDEO,
    "StableAudioPipeline": Family.AUDIO,
}

# Built-in source names (`builtin:<name>`) -> (family, preset of that family's tiny models).
BUILTIN_MODELS: dict[str, tuple[Family, str]] = {
    "tiny-sd": (Family.IMAGE, "tiny"),
    "small-sd": (Family.IMAGE, "small"),
    "tiny-ltx-video": (Family.VIDEO, "tiny"),
    "tiny-stable-audio": (Family.AUDIO, "tiny"),
}
