"""The model registry beyond the built-ins: diffusers folders dropped under MODELS_DIR are served.

Each folder holding a ``model_index.json`` that names a pipeline the engine runs becomes endpoints of every kind its
family serves: an image model ``local/<folder>`` (text to image) and ``local/<folder>/image-to-image``, a video model
(LTX-Video) ``local/<folder>`` (text to video) and ``local/<folder>/image-to-video``, an audio model (Stable Audio
Open) ``local/<folder>`` (text to audio). A folder that disappears turns its endpoints off.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils.text import slugify

from inference.engine.kinds import KINDS_OF_FAMILY, PIPELINE_CLASS_FAMILIES, SUB_PATHS, Family
from inference.models import Endpoint

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
            family = folder_family(folder)
            if family is None:
                logger.warning("skipping model folder %s: it holds no pipeline the engine runs", folder)
                continue
            if not name or name in found:
                logger.warning("skipping model folder %s: its name does not make a unique endpoint", folder)
                continue
            found.add(name)
            # A folder that now holds another family: its endpoints of kinds the new model does not make go off.
            Endpoint.objects.filter(owner=LOCAL_OWNER, name=name).exclude(kind__in=KINDS_OF_FAMILY[family]).update(
                is_active=False
            )
            for kind in KINDS_OF_FAMILY[family]:
                _, was_created = Endpoint.objects.update_or_create(
                    owner=LOCAL_OWNER,
                    name=name,
                    path=SUB_PATHS[kind],
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


def folder_family(folder: Path) -> Family | None:
    """The family of the model in a diffusers folder, from the pipeline class its model_index.json names."""
    try:
        pipeline_class = json.loads((folder / "model_index.json").read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return PIPELINE_CLASS_FAMILIES.get(pipeline_class) if isinstance(pipeline_class, str) else None
