from typing import Any

from django.db import migrations

# The built-in image endpoints as inference.catalog had them when this migration was written, copied: a migration
# keeps the rows it wrote, whatever that module becomes.
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
IDENTITY = ("owner", "name", "path")


def create(apps: Any, schema_editor: Any) -> None:
    """The endpoints, if missing: an operator's edits to one are kept."""
    Endpoint = apps.get_model("inference", "Endpoint")
    for spec in IMAGE_ENDPOINTS:
        defaults = {key: value for key, value in spec.items() if key not in IDENTITY}
        Endpoint.objects.get_or_create(**{key: spec[key] for key in IDENTITY}, defaults=defaults)


def remove(apps: Any, schema_editor: Any) -> None:
    Endpoint = apps.get_model("inference", "Endpoint")
    for spec in IMAGE_ENDPOINTS:
        Endpoint.objects.filter(**{key: spec[key] for key in IDENTITY}).delete()


class Migration(migrations.Migration):
    dependencies = [("inference", "0001_initial")]
    operations = [migrations.RunPython(create, remove)]
