"""Encoding generated images for storage and for the API's responses."""

from __future__ import annotations

import io
from typing import NamedTuple

from PIL import Image

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_ALIASES = {"jpg": "jpeg"}


class EncodedImage(NamedTuple):
    data: bytes
    content_type: str
    width: int
    height: int


def encode_image(image: Image.Image, output_format: str = "png", *, quality: int = 90) -> EncodedImage:
    """Encode to png, jpeg (alias jpg) or webp. `quality` applies to jpeg and webp."""
    fmt = output_format.lower()
    fmt = _ALIASES.get(fmt, fmt)
    if fmt not in CONTENT_TYPES:
        raise ValueError(f"output_format must be one of {sorted(CONTENT_TYPES)}, not {output_format!r}")
    # jpeg has no alpha; generated images are RGB anyway, this keeps uploads of RGBA inputs working.
    if fmt == "jpeg" and image.mode != "RGB":
        image = image.convert("RGB")
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format=fmt.upper(), quality=quality)
    return EncodedImage(buffer.getvalue(), CONTENT_TYPES[fmt], image.width, image.height)
