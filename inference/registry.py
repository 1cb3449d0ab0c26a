"""The model registry beyond the built-ins: diffusers folders dropped under MODELS_DIR are served.

Each folder holding a ``model_index.json`` becomes ``local/<folder>`` (text to image) and
``local/<folder>/image-to-image``; a folder that disappears turns its endpoints off.
"""

from __future__ import annotations

import logging
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils.text import slugify

from inference.models import Endpoint, PipelineKind

logger = logging.getLogger(__name__)

LOCAL_OWNER = "local"


@transaction.atomic
def sync_local_models(models_dir: Path | None = None) -> dict[str, int]:
    root = Path(models_dir or settings.MODELS_DIR)
    found: set[str] = set()
    created = 0
    if root.is_dir():
        for folder in sorted(path for path in root.iterdir() if (path / "model_index.json").is_file()):
            name = slugify(folder.name)[:64]
            if not name or name in found:
                logger.warning("skipping model folder %s: its name does not make a unique endpoint", folder)
                continue
            found.add(name)
            for path, kind in (("", PipelineKind.TEXT_TO_IMAGE), ("image-to-image", PipelineKind.IMAGE_TO_IMAGE)):
                _, was_created = Endpoint.objects.update_or_create(
                    owner=LOCAL_OWNER,
                    name=name,
                    path=path,
                    defaults={"weights": str(folder.resolve()), "kind": kind, "is_active": True},
                    create_defaults={
                        "weights": str(folder.resolve()),
                        "kind": kind,
                        "is_active": True,
                        "title": folder.name,
                        "gpu_class": settings.LOCAL_MODELS_GPU_CLASS,
                    },
                )
                created += was_created
    retired = Endpoint.objects.filter(owner=LOCAL_OWNER, is_active=True).exclude(name__in=found).update(is_active=False)
    return {"models": len(found), "created": created, "retired": retired}
