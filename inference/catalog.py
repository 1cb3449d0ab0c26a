"""The built-in endpoints: a tiny Stable Diffusion, text-to-image and its image-to-image sub-path.

Real diffusers classes with random weights built from config (nothing is downloaded): the outputs
are noise, but every line of the real pipeline runs. Created by migration 0002; tests that empty
the database put them back with ``ensure_builtin_endpoints``.
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

BUILTIN_ENDPOINTS: list[dict[str, Any]] = [
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


def ensure_builtin_endpoints(endpoint_model: Any) -> None:
    """Creates the built-ins if missing; an operator's later edits to them are kept."""
    for spec in BUILTIN_ENDPOINTS:
        identity = {key: spec[key] for key in ("owner", "name", "path")}
        defaults = {key: value for key, value in spec.items() if key not in identity}
        endpoint_model.objects.get_or_create(**identity, defaults=defaults)
