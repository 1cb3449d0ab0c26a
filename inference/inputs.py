"""The input contract of the image endpoints, in fal's shape, checked against each endpoint's limits.

Errors are collected, not raised one at a time, so a client learns about every bad field at once:
``[{loc: ["body", field], msg, type}]`` as fal (FastAPI) answers them.

``image_url`` may be a data URI, one of our own file URLs (an upload, an output's signed URL, the bucket's URL of a
stored file: read from storage now, for the organization that owns it only), or any other http(s) URL (the worker
downloads it). Image to image with no ``image_size`` keeps the input image's size, as fal does.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import secrets
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from django.conf import settings

from accounts.errors import InvalidInput
from inference import files, netguard
from inference.models import VIDEO_KINDS, Endpoint, PipelineKind

IMAGE_SIZE_PRESETS: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
OUTPUT_FORMATS = ("png", "jpeg", "webp")
MAX_GUIDANCE_SCALE = 20.0
MAX_SEED = 2**32 - 1
DATA_URI = re.compile(r"^data:(?P<mime>image/[a-z0-9.+-]+)?(?P<b64>;base64)?,(?P<data>.*)$", re.DOTALL | re.IGNORECASE)


def is_storable_text(value: str) -> bool:
    """PostgreSQL's text and jsonb refuse NUL characters and unpaired surrogates: refuse them first."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class InputError(InvalidInput):
    """The request's input is invalid: 422 (413 for an oversized image) with every problem listed."""


# fal's object lifecycle headers hold one small object, {"expiration_duration_seconds": N}: a few dozen characters.
MAX_LIFECYCLE_HEADER_CHARS = 512


def lifecycle_header_object(value: str) -> dict[str, Any]:
    """The JSON object of an ``X-Fal-Object-Lifecycle`` (or ``-Preference``) header, for submissions and uploads
    alike; raises ``ValueError`` with the message a client is shown.

    Bounded before it is parsed: json.loads raises RecursionError, not ValueError, on "[" nested a thousand deep,
    and a header is the caller's to make as deep as the server lets it.
    """
    if len(value) > MAX_LIFECYCLE_HEADER_CHARS:
        raise ValueError(f"Should be a JSON object of at most {MAX_LIFECYCLE_HEADER_CHARS} characters.")
    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError):
        raise ValueError("Invalid JSON.") from None
    if not isinstance(parsed, dict):
        raise ValueError("Invalid JSON.")
    return parsed


class ValidatedInput(Protocol):
    """A request's input checked against its endpoint, defaults applied (images, video or audio)."""

    def as_json(self) -> dict[str, Any]:
        """What the job stores as its ``input``."""
        ...


@dataclass(frozen=True)
class GenerationInput:
    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    num_images: int
    output_format: str
    sync_mode: bool
    image_url: str | None = None  # as given; None for a data URI (the job keeps the image as its ``image_path``)
    strength: float | None = None
    seeds: list[int] = field(default_factory=list)
    # The output takes the size of an image only the worker will see (a URL it downloads): width and height are the
    # endpoint's largest until then, what admission holds credit for.
    size_from_image: bool = False

    def as_json(self) -> dict[str, Any]:
        fields = asdict(self)
        if not self.size_from_image:
            del fields["size_from_image"]
        return fields


@dataclass(frozen=True)
class InlineImage:
    """An input image read at submission (a data URI, or a file of ours), decoded and checked: the job keeps a copy."""

    data: bytes
    content_type: str
    width: int = 0
    height: int = 0


def output_size_for_image(endpoint: Endpoint, width: int, height: int) -> tuple[int, int]:
    """The output size for an input image of this size: the same, scaled down to fit the endpoint's largest if it is
    larger (aspect ratio kept), each side rounded down to a multiple of 8 (what the VAE takes), at least 8."""
    scale = min(1.0, endpoint.max_width / max(width, 1), endpoint.max_height / max(height, 1))
    return max(8, int(width * scale) // 8 * 8), max(8, int(height * scale) // 8 * 8)


class _Collector:
    def __init__(self) -> None:
        self.errors: list[dict[str, Any]] = []
        self.too_large = False

    def add(self, name: str | list[str | int], msg: str, kind: str) -> None:
        loc = ["body", *([name] if isinstance(name, str) else name)]
        self.errors.append({"loc": loc, "msg": msg, "type": kind})


def _int(c: _Collector, payload: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = payload.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            c.add(name, "Input should be a valid integer.", "int_type")
            return default
    if not low <= value <= high:
        c.add(name, f"Input should be between {low} and {high}.", "out_of_range")
        return default  # refused: no caller computes with it on the way to the 422
    return int(value)


def _float(c: _Collector, payload: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = payload.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        c.add(name, "Input should be a valid number.", "float_type")
        return default
    # A JSON integer has no bound: float() of 1 followed by 400 zeros raises OverflowError, so the range is checked
    # on the number as given (Python compares an int with a float exactly); inf and nan never pass it.
    if not low <= value <= high:
        c.add(name, f"Input should be between {low} and {high}.", "out_of_range")
        return default  # refused: no caller computes with it (round(inf) raises) on the way to the 422
    return float(value)


def _str(c: _Collector, payload: dict[str, Any], name: str, default: str, max_chars: int) -> str:
    value = payload.get(name, default)
    if value is None:
        return default
    if not isinstance(value, str):
        c.add(name, "Input should be a valid string.", "string_type")
        return default
    if not is_storable_text(value):
        c.add(name, "Input should not contain NUL characters or unpaired surrogates.", "string_unicode")
        return default
    if len(value) > max_chars:
        c.add(name, f"String should have at most {max_chars} characters.", "string_too_long")
    return value


def _image_size(c: _Collector, payload: dict[str, Any], endpoint: Endpoint) -> tuple[int, int]:
    value = payload.get("image_size")
    default = (endpoint.default_width, endpoint.default_height)
    if value is None:
        return default
    if isinstance(value, str):
        if value not in IMAGE_SIZE_PRESETS:
            c.add("image_size", f"Unknown preset; use one of {', '.join(IMAGE_SIZE_PRESETS)}.", "enum")
            return default
        width, height = IMAGE_SIZE_PRESETS[value]
        loc: list[str | int] = ["image_size"]
    elif isinstance(value, dict):
        given = {axis: value.get(axis) for axis in ("width", "height")}
        bad = [axis for axis, number in given.items() if isinstance(number, bool) or not isinstance(number, int)]
        for axis in bad:
            c.add(["image_size", axis], "Input should be a valid integer.", "int_type")
        if bad:
            return default
        width, height = int(given["width"]), int(given["height"])  # type: ignore[arg-type]
        loc = ["image_size"]
    else:
        c.add("image_size", "Input should be a preset name or {width, height}.", "model_type")
        return default
    for axis, number, limit in (("width", width, endpoint.max_width), ("height", height, endpoint.max_height)):
        if not 8 <= number <= limit:
            c.add([*loc, axis], f"{axis} should be between 8 and {limit} on this endpoint.", "out_of_range")
        elif number % 8:
            c.add([*loc, axis], f"{axis} should be a multiple of 8.", "multiple_of")
    return width, height


def _image_url(
    c: _Collector, payload: dict[str, Any], endpoint: Endpoint, organization_id: Any
) -> tuple[str | None, InlineImage | None]:
    value = payload.get("image_url")
    if value is None:
        c.add("image_url", "Field required.", "missing")
        return None, None
    if not isinstance(value, str) or not value or not is_storable_text(value):
        c.add("image_url", "Input should be an http(s) URL or a data URI.", "url_type")
        return None, None
    match = DATA_URI.match(value)
    if match:
        if not match.group("b64"):
            c.add("image_url", "A data URI must be base64-encoded.", "url_type")
            return None, None
        try:
            data = base64.b64decode(match.group("data"), validate=True)
        except (binascii.Error, ValueError):
            c.add("image_url", "The data URI is not valid base64.", "url_type")
            return None, None
        if len(data) > endpoint.max_input_image_bytes:
            c.too_large = True
            c.add("image_url", f"The image is larger than {endpoint.max_input_image_bytes} bytes.", "too_large")
            return None, None
        return None, _check_image(c, data, "The data URI does not hold a readable image.")
    try:
        parts = urlsplit(value)
        hostname = parts.hostname  # parsed lazily: an unclosed or bad [IPv6] literal raises here, not above
    except ValueError:
        c.add("image_url", "Input should be an http(s) URL or a data URI.", "url_parsing")
        return None, None
    if parts.scheme not in ("http", "https") or not hostname:
        c.add("image_url", "Input should be an http(s) URL or a data URI.", "url_scheme")
        return None, None
    try:
        name = files.stored_name_of_url(value, organization_id=organization_id)
    except files.UnusableFile as refusal:
        c.add("image_url", str(refusal), refusal.kind)
        return None, None
    if name is None:
        # Someone else's URL: the worker downloads it, connecting only to the public addresses its name resolves to
        # (``netguard.open_client``). What can be told without the network is refused here, before anything is held.
        try:
            netguard.check_url_offline(value)
        except netguard.UnsafeUrl as exc:
            c.add("image_url", f"image_url is not allowed: {exc}", "url_not_allowed")
            return None, None
        return value, None
    if files.stored_size(name) > endpoint.max_input_image_bytes:
        c.too_large = True
        c.add("image_url", f"The image is larger than {endpoint.max_input_image_bytes} bytes.", "too_large")
        return None, None
    return value, _check_image(c, files.read_input(name), "The file at image_url is not a readable image.")


def image_pixels_problem(data: bytes) -> str | None:
    """Why the image in ``data`` must not be decoded (over ``MAX_INPUT_IMAGE_PIXELS`` pixels), or ``None``.

    Reads the header only: Pillow opens lazily and knows the size before it decodes a pixel, and a 17 KB PNG can
    declare 12000x12000 pixels (430 MB decoded). A header Pillow cannot read is left to the decoder to refuse.
    """
    from PIL import Image

    limit = settings.MAX_INPUT_IMAGE_PIXELS
    # Pillow's own guard as well, for every later decode in this process: it refuses outright past twice this.
    Image.MAX_IMAGE_PIXELS = limit
    too_large = f"The image has more than {limit} pixels, the most an input image may have."
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return too_large
    except Exception:  # not an image Pillow reads: not this check's to say
        return None
    return too_large if width * height > limit else None


def _check_image(c: _Collector, data: bytes, unreadable: str) -> InlineImage | None:
    from PIL import Image

    problem = image_pixels_problem(data)
    if problem is not None:
        c.too_large = True
        c.add("image_url", problem, "too_large")
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            image.verify()
            content_type = Image.MIME.get(image.format or "", "application/octet-stream")
    except Exception:  # Pillow raises many kinds (SyntaxError on a bad PNG checksum among them)
        c.add("image_url", unreadable, "image_invalid")
        return None
    return InlineImage(data=data, content_type=content_type, width=width, height=height)


def validate_input(
    endpoint: Endpoint, payload: Any, *, organization_id: Any
) -> tuple[ValidatedInput, InlineImage | None]:
    """The request's input with defaults applied, or ``InputError`` listing every problem.

    ``organization_id`` is the organization asking: our own file URLs in it are usable by their owner only.
    """
    if not isinstance(payload, dict):
        raise InputError([{"loc": ["body"], "msg": "Input should be a JSON object.", "type": "model_type"}])
    # Imported here: the media contract builds on this module's fields.
    from inference import media_inputs

    if endpoint.kind in VIDEO_KINDS:
        return media_inputs.validate_video(endpoint, payload, organization_id=organization_id)
    if endpoint.kind == PipelineKind.TEXT_TO_AUDIO:
        return media_inputs.validate_audio(endpoint, payload), None
    return validate_image_input(endpoint, payload, organization_id=organization_id)


def validate_image_input(
    endpoint: Endpoint, payload: dict[str, Any], *, organization_id: Any
) -> tuple[GenerationInput, InlineImage | None]:
    """An image endpoint's input (text to image, image to image)."""
    c = _Collector()
    prompt = _str(c, payload, "prompt", "", endpoint.max_prompt_chars)
    if "prompt" not in payload:
        c.add("prompt", "Field required.", "missing")
    elif payload["prompt"] is None:
        c.add("prompt", "Input should be a valid string.", "string_type")
    elif isinstance(payload["prompt"], str) and not prompt.strip():
        c.add("prompt", "String should not be empty.", "string_too_short")
    negative_prompt = _str(c, payload, "negative_prompt", "", endpoint.max_prompt_chars)
    width, height = _image_size(c, payload, endpoint)
    steps = _int(c, payload, "num_inference_steps", endpoint.default_steps, 1, endpoint.max_steps)
    guidance = _float(c, payload, "guidance_scale", endpoint.default_guidance_scale, 0.0, MAX_GUIDANCE_SCALE)
    num_images = _int(c, payload, "num_images", 1, 1, endpoint.max_images)
    seed = _int(c, payload, "seed", -1, 0, MAX_SEED) if payload.get("seed") is not None else secrets.randbelow(MAX_SEED)
    output_format = payload.get("output_format", "png")
    if output_format not in OUTPUT_FORMATS:
        c.add("output_format", f"Input should be one of {', '.join(OUTPUT_FORMATS)}.", "enum")
    sync_mode = payload.get("sync_mode", False)
    if not isinstance(sync_mode, bool):
        c.add("sync_mode", "Input should be a valid boolean.", "bool_type")
    image_url: str | None = None
    inline: InlineImage | None = None
    strength: float | None = None
    size_from_image = False
    if endpoint.kind == PipelineKind.IMAGE_TO_IMAGE:
        image_url, inline = _image_url(c, payload, endpoint, organization_id)
        strength = _float(c, payload, "strength", endpoint.default_strength, 0.01, 1.0)
        if payload.get("image_size") is None:
            if inline is not None:
                width, height = output_size_for_image(endpoint, inline.width, inline.height)
            elif image_url is not None:
                width, height, size_from_image = endpoint.max_width, endpoint.max_height, True
        if not c.errors and strength is not None and int(steps * strength) < 1:
            c.add("strength", "strength * num_inference_steps must be at least 1.", "out_of_range")
    if c.errors:
        raise InputError(c.errors, status_code=413 if c.too_large else 422)
    seeds = [(seed + index) % (MAX_SEED + 1) for index in range(num_images)]
    generation = GenerationInput(
        prompt=prompt,
        negative_prompt=negative_prompt,
        width=width,
        height=height,
        num_inference_steps=steps,
        guidance_scale=guidance,
        seed=seed,
        num_images=num_images,
        output_format=str(output_format),
        sync_mode=bool(sync_mode),
        image_url=image_url,
        strength=strength,
        seeds=seeds,
        size_from_image=size_from_image,
    )
    return generation, inline


def input_schema(endpoint: Endpoint) -> dict[str, Any]:
    """JSON Schema of the endpoint's input, with its own limits and defaults (for /v1/models)."""
    from inference import media_inputs

    if endpoint.kind in VIDEO_KINDS:
        return media_inputs.video_schema(endpoint)
    if endpoint.kind == PipelineKind.TEXT_TO_AUDIO:
        return media_inputs.audio_schema(endpoint)
    properties: dict[str, Any] = {
        "prompt": {"type": "string", "minLength": 1, "maxLength": endpoint.max_prompt_chars},
        "negative_prompt": {"type": "string", "maxLength": endpoint.max_prompt_chars, "default": ""},
        "image_size": {
            "oneOf": [
                {"type": "string", "enum": list(IMAGE_SIZE_PRESETS)},
                {
                    "type": "object",
                    "properties": {
                        "width": {"type": "integer", "minimum": 8, "maximum": endpoint.max_width, "multipleOf": 8},
                        "height": {"type": "integer", "minimum": 8, "maximum": endpoint.max_height, "multipleOf": 8},
                    },
                    "required": ["width", "height"],
                },
            ],
            "default": {"width": endpoint.default_width, "height": endpoint.default_height},
        },
        "num_inference_steps": {
            "type": "integer",
            "minimum": 1,
            "maximum": endpoint.max_steps,
            "default": endpoint.default_steps,
        },
        "guidance_scale": {
            "type": "number",
            "minimum": 0,
            "maximum": MAX_GUIDANCE_SCALE,
            "default": endpoint.default_guidance_scale,
        },
        "seed": {"type": "integer", "minimum": 0, "maximum": MAX_SEED, "description": "Random when left out."},
        "num_images": {"type": "integer", "minimum": 1, "maximum": endpoint.max_images, "default": 1},
        "output_format": {"type": "string", "enum": list(OUTPUT_FORMATS), "default": "png"},
        "sync_mode": {
            "type": "boolean",
            "default": False,
            "description": "Return images inline as data URIs instead of stored, signed URLs.",
        },
    }
    required = ["prompt"]
    if endpoint.kind == PipelineKind.IMAGE_TO_IMAGE:
        properties["image_url"] = {
            "type": "string",
            "description": (
                "http(s) URL (an uploaded file's URL or an earlier output's included) or base64 data URI, at most"
                f" {endpoint.max_input_image_bytes} bytes and {settings.MAX_INPUT_IMAGE_PIXELS} pixels"
                " (width x height)."
            ),
        }
        properties["strength"] = {
            "type": "number",
            "exclusiveMinimum": 0,
            "maximum": 1,
            "default": endpoint.default_strength,
        }
        required.append("image_url")
        image_size = properties["image_size"]
        del image_size["default"]
        image_size["description"] = (
            "Left out: the input image's size, scaled down to fit this endpoint's largest, each side a multiple of 8."
        )
    return {"type": "object", "properties": properties, "required": required}
