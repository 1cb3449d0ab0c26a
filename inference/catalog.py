"""The built-in endpoints: a tiny Stable Diffusion (text to image, and its image-to-image sub-path), a tiny LTX-Video
(text to video, and its image-to-video sub-path) and a tiny Stable Audio Open (text to audio).

Real diffusers classes with random weights built from config (nothing is downloaded): the outputs
are noise, but every line of the real pipeline runs. Migrations 0002 (images) and 0009 (video and audio) created
them from copies of these specs of their own, so a change here reaches an existing database only through a migration
of its own; tests that empty the database put them back with ``ensure_builtin_endpoints``.
"""

from __future__ import annotations

from typing import Any

COMMON: dict[str, Any] = {
    "weights": "builtin:tiny-sd",
    "gpu_class": "cpu",
    "max_width": 256,
    "max_height": 256,
    "max_steps": 50,
    "max_images": 4,
    "default_width": 64,
    "default_height": 64,
    "default_guidance_scale": 7.5,
}

IMAGE_ENDPOINTS: list[dict[str, Any]] = [
    {
        **COMMON,
        "owner": "platform",
        "name": "tiny-sd",
        "path": "",
        "kind": "text-to-image",
        "title": "Tiny Stable Diffusion",
        "description": "A Stable Diffusion pipeline at toy size with random weights: fast, real, noise.",
        "default_steps": 4,
    },
    {
        **COMMON,
        "owner": "platform",
        "name": "tiny-sd",
        "path": "image-to-image",
        "kind": "image-to-image",
        "title": "Tiny Stable Diffusion, image to image",
        "description": "The same tiny pipeline, starting from an input image.",
        "default_steps": 8,
    },
]


# Sizes and lengths stay small: LTX attends over every latent pixel of every latent frame at once (a 128x128 clip of
# 33 frames is 9,216 tokens), which a CPU worker must still finish in seconds.
VIDEO: dict[str, Any] = {
    "weights": "builtin:tiny-ltx-video",
    "gpu_class": "cpu",
    "max_width": 128,
    "max_height": 128,
    "max_steps": 50,
    "max_images": 1,
    "max_frames": 33,
    "max_fps": 24,
    "default_width": 64,
    "default_height": 64,
    "default_steps": 4,
    "default_guidance_scale": 3.0,
    "default_num_frames": 16,
    "default_fps": 8,
}

MEDIA_ENDPOINTS: list[dict[str, Any]] = [
    {
        **VIDEO,
        "owner": "platform",
        "name": "tiny-ltx-video",
        "path": "",
        "kind": "text-to-video",
        "title": "Tiny LTX-Video",
        "description": "An LTX-Video pipeline at toy size with random weights: H.264 noise, billed per second.",
    },
    {
        **VIDEO,
        "owner": "platform",
        "name": "tiny-ltx-video",
        "path": "image-to-video",
        "kind": "image-to-video",
        "title": "Tiny LTX-Video, image to video",
        "description": "The same tiny pipeline, starting from an input image as its first frame.",
    },
    {
        "owner": "platform",
        "name": "tiny-stable-audio",
        "path": "",
        "kind": "text-to-audio",
        "title": "Tiny Stable Audio Open",
        "description": "Stable Audio Open at toy size with random weights: 16 kHz stereo noise, billed per second.",
        "weights": "builtin:tiny-stable-audio",
        "gpu_class": "cpu",
        "max_steps": 100,
        "max_images": 1,
        "max_audio_seconds": 8,
        "default_steps": 8,
        "default_guidance_scale": 7.0,
        "default_audio_seconds": 2,
    },
]

BUILTIN_ENDPOINTS = IMAGE_ENDPOINTS + MEDIA_ENDPOINTS


def ensure_builtin_endpoints(endpoint_model: Any) -> None:
    """Creates the built-ins if missing; an operator's later edits to them are kept."""
    for spec in BUILTIN_ENDPOINTS:
        identity = {key: spec[key] for key in ("owner", "name", "path")}
        defaults = {key: value for key, value in spec.items() if key not in identity}
        endpoint_model.objects.get_or_create(**identity, defaults=defaults)
