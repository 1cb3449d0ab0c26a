"""The input contract of the video and audio endpoints, in the shape of fal's equivalents, checked against each
endpoint's limits (``inputs.validate_input`` dispatches here by the endpoint's kind).

Video (fal's LTX-Video and Wan): ``prompt``, ``negative_prompt``, ``num_frames`` or ``duration`` (seconds, at
``fps``), ``fps``, ``resolution`` (``"480p"``: the shorter side in pixels) and ``aspect_ratio``, ``seed``,
``num_inference_steps``, ``guidance_scale``; image to video adds ``image_url`` (http(s), a data URI, an upload, an
earlier output), its first frame. Audio (fal's Stable Audio): ``prompt``, ``negative_prompt``, ``seconds_total``,
``steps`` (or ``num_inference_steps``), ``guidance_scale``, ``seed``, ``output_format`` (``wav`` or ``mp3``).

As for images, every problem is collected and answered at once, each at its own ``loc``. What is stored is
``as_json()``: the size in pixels, the frame count and rate (or the clip's seconds), one seed, so the worker, the
estimates and admission's hold all read the same numbers.
"""

from __future__ import annotations

import math
import re
import secrets
from dataclasses import asdict, dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from inference.inputs import (
    MAX_GUIDANCE_SCALE,
    MAX_SEED,
    InlineImage,
    InputError,
    _Collector,
    _float,
    _image_url,
    _int,
    _str,
)
from inference.models import Endpoint, PipelineKind

# LTX's pipeline takes frame sizes in multiples of 32.
VIDEO_SIZE_MULTIPLE = 32
ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "16:9": (16, 9),
    "9:16": (9, 16),
    "4:3": (4, 3),
    "3:4": (3, 4),
    "1:1": (1, 1),
}
AUTO = "auto"  # image to video: the start image's aspect ratio
# The shorter side and "p": the schema's pattern, which JSON Schema and browsers read as ECMAScript, and ours.
_SHORT_SIDE = r"[1-9][0-9]{1,4}"
RESOLUTION_PATTERN = rf"^{_SHORT_SIDE}p$"
# Ours matched whole (fullmatch), not by the schema's anchors: Python's $ also matches before a trailing newline, and
# "64p\n" passed, to fail in int() later. The group is the number.
RESOLUTION = re.compile(rf"({_SHORT_SIDE})p")
AUDIO_FORMATS = ("wav", "mp3")


def _round_to_multiple(value: float) -> int:
    return max(VIDEO_SIZE_MULTIPLE, round(value / VIDEO_SIZE_MULTIPLE) * VIDEO_SIZE_MULTIPLE)


def video_size(short_side: int, ratio: tuple[int, int]) -> tuple[int, int]:
    """Width and height of a video whose shorter side is ``short_side`` at ``ratio`` (width:height), the longer side
    rounded to the nearest multiple of 32: ``video_size(64, (16, 9)) == (128, 64)``."""
    across, down = ratio
    if across >= down:
        return _round_to_multiple(short_side * across / down), short_side
    return short_side, _round_to_multiple(short_side * down / across)


def video_size_for_image(short_side: int, width: int, height: int) -> tuple[int, int]:
    """Image to video with ``aspect_ratio: auto``: the start image's aspect ratio at the asked resolution."""
    return video_size(short_side, (max(width, 1), max(height, 1)))


@dataclass(frozen=True)
class VideoInput:
    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_frames: int
    fps: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    image_url: str | None = None
    # The same shape as an image request's, so code that counts outputs (batches, estimates) reads one field.
    num_images: int = 1
    seeds: list[int] = field(default_factory=list)
    # Image to video with ``aspect_ratio: auto`` and an image only the worker will see: its size is set then, from
    # ``short_side``; until then width and height are the endpoint's largest, what admission holds credit for.
    size_from_image: bool = False
    short_side: int | None = None

    def as_json(self) -> dict[str, Any]:
        fields = asdict(self)
        if not self.size_from_image:
            del fields["size_from_image"], fields["short_side"]
        if self.image_url is None:
            del fields["image_url"]
        return fields


@dataclass(frozen=True)
class AudioInput:
    prompt: str
    negative_prompt: str
    seconds_total: float
    num_inference_steps: int
    guidance_scale: float
    seed: int
    output_format: str
    num_images: int = 1
    seeds: list[int] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _prompts(c: _Collector, payload: dict[str, Any], endpoint: Endpoint) -> tuple[str, str]:
    prompt = _str(c, payload, "prompt", "", endpoint.max_prompt_chars)
    if "prompt" not in payload:
        c.add("prompt", "Field required.", "missing")
    elif payload["prompt"] is None:
        c.add("prompt", "Input should be a valid string.", "string_type")
    elif isinstance(payload["prompt"], str) and not prompt.strip():
        c.add("prompt", "String should not be empty.", "string_too_short")
    return prompt, _str(c, payload, "negative_prompt", "", endpoint.max_prompt_chars)


def _seed(c: _Collector, payload: dict[str, Any]) -> int:
    if payload.get("seed") is None:
        return secrets.randbelow(MAX_SEED)
    return _int(c, payload, "seed", 0, 0, MAX_SEED)


def _choice(c: _Collector, payload: dict[str, Any], name: str, choices: tuple[str, ...], default: str) -> str:
    value = payload.get(name)
    if value is None:
        return default
    if not isinstance(value, str) or value not in choices:
        c.add(name, f"Input should be one of {', '.join(choices)}.", "enum")
        return default
    return value


def _frames(c: _Collector, payload: dict[str, Any], endpoint: Endpoint, fps: int) -> int:
    """``num_frames``, or ``duration`` seconds at ``fps`` (rounded to whole frames); not both."""
    if payload.get("duration") is None:
        return _int(c, payload, "num_frames", endpoint.default_num_frames, 1, endpoint.max_frames)
    if payload.get("num_frames") is not None:
        c.add("duration", "Give num_frames or duration, not both.", "value_error")
        return endpoint.default_num_frames
    longest = endpoint.max_frames / fps
    refused = len(c.errors)
    duration = _float(c, payload, "duration", 0.0, 0.0, longest)
    if len(c.errors) > refused:
        return endpoint.default_num_frames  # told once, as out of range or not a number
    frames = round(duration * fps)
    if 0 < duration <= longest and frames < 1:
        c.add("duration", f"At {fps} fps that is less than one frame.", "out_of_range")
    elif duration == 0:
        c.add(
            "duration", f"Input should be between 0 (exclusive) and {longest:g} seconds at {fps} fps.", "out_of_range"
        )
    return max(1, min(frames, endpoint.max_frames))


def _video_size(
    c: _Collector, payload: dict[str, Any], endpoint: Endpoint, *, may_be_auto: bool
) -> tuple[int, int, int, str]:
    """(width, height, short side, aspect ratio asked) from ``resolution`` and ``aspect_ratio``.

    Left out, they are the endpoint's default size (image to video: the start image's aspect ratio).
    """
    default_short = min(endpoint.default_width, endpoint.default_height)
    short_side = default_short
    resolution = payload.get("resolution")
    if resolution is not None:
        match = RESOLUTION.fullmatch(resolution) if isinstance(resolution, str) else None
        if match is None:
            c.add("resolution", "Input should be the shorter side in pixels followed by p, like 480p.", "pattern")
        else:
            short_side = int(match.group(1))
            largest = min(endpoint.max_width, endpoint.max_height)
            if short_side % VIDEO_SIZE_MULTIPLE or not VIDEO_SIZE_MULTIPLE <= short_side <= largest:
                c.add(
                    "resolution",
                    f"The shorter side should be a multiple of {VIDEO_SIZE_MULTIPLE} from {VIDEO_SIZE_MULTIPLE} to "
                    f"{largest} on this endpoint.",
                    "out_of_range",
                )
                short_side = default_short
    ratios = (*ASPECT_RATIOS, AUTO) if may_be_auto else tuple(ASPECT_RATIOS)
    asked_ratio = _choice(c, payload, "aspect_ratio", ratios, AUTO if may_be_auto else "")
    if asked_ratio in ASPECT_RATIOS:
        width, height = video_size(short_side, ASPECT_RATIOS[asked_ratio])
    elif resolution is None and not may_be_auto:
        width, height = endpoint.default_width, endpoint.default_height
    else:
        width, height = video_size(short_side, (endpoint.default_width, endpoint.default_height))
    if width > endpoint.max_width or height > endpoint.max_height:
        where = "aspect_ratio" if payload.get("aspect_ratio") is not None else "resolution"
        c.add(
            where,
            f"That makes {width}x{height}, beyond this endpoint's largest ({endpoint.max_width}x"
            f"{endpoint.max_height}).",
            "out_of_range",
        )
    return width, height, short_side, asked_ratio


def validate_video(
    endpoint: Endpoint, payload: dict[str, Any], *, organization_id: Any
) -> tuple[VideoInput, InlineImage | None]:
    c = _Collector()
    prompt, negative_prompt = _prompts(c, payload, endpoint)
    image_to_video = endpoint.kind == PipelineKind.IMAGE_TO_VIDEO
    width, height, short_side, ratio = _video_size(c, payload, endpoint, may_be_auto=image_to_video)
    fps = _int(c, payload, "fps", endpoint.default_fps, 1, endpoint.max_fps)
    frames = _frames(c, payload, endpoint, fps)
    steps = _int(c, payload, "num_inference_steps", endpoint.default_steps, 1, endpoint.max_steps)
    guidance = _float(c, payload, "guidance_scale", endpoint.default_guidance_scale, 0.0, MAX_GUIDANCE_SCALE)
    seed = _seed(c, payload)
    image_url: str | None = None
    inline: InlineImage | None = None
    size_from_image = False
    if image_to_video:
        image_url, inline = _image_url(c, payload, endpoint, organization_id)
        if ratio == AUTO:
            if inline is not None:
                width, height = video_size_for_image(short_side, inline.width, inline.height)
            elif image_url is not None:
                width, height, size_from_image = endpoint.max_width, endpoint.max_height, True
            if width > endpoint.max_width or height > endpoint.max_height:
                c.add(
                    "aspect_ratio",
                    f"The image's aspect ratio makes {width}x{height} at this resolution, beyond this endpoint's "
                    f"largest ({endpoint.max_width}x{endpoint.max_height}): give an aspect_ratio.",
                    "out_of_range",
                )
    if c.errors:
        raise InputError(c.errors, status_code=413 if c.too_large else 422)
    video = VideoInput(
        prompt=prompt,
        negative_prompt=negative_prompt,
        width=width,
        height=height,
        num_frames=frames,
        fps=fps,
        num_inference_steps=steps,
        guidance_scale=guidance,
        seed=seed,
        image_url=image_url,
        seeds=[seed],
        size_from_image=size_from_image,
        short_side=short_side if size_from_image else None,
    )
    return video, inline


def validate_audio(endpoint: Endpoint, payload: dict[str, Any]) -> AudioInput:
    c = _Collector()
    prompt, negative_prompt = _prompts(c, payload, endpoint)
    seconds = _seconds_total(c, payload, endpoint)
    # fal's Stable Audio calls them `steps`; every other endpoint here `num_inference_steps`. Either, not both.
    steps_name = "steps" if payload.get("steps") is not None else "num_inference_steps"
    if steps_name == "steps" and payload.get("num_inference_steps") is not None:
        c.add("steps", "Give steps or num_inference_steps, not both.", "value_error")
    steps = _int(c, payload, steps_name, endpoint.default_steps, 1, endpoint.max_steps)
    guidance = _float(c, payload, "guidance_scale", endpoint.default_guidance_scale, 0.0, MAX_GUIDANCE_SCALE)
    seed = _seed(c, payload)
    output_format = _choice(c, payload, "output_format", AUDIO_FORMATS, AUDIO_FORMATS[0])
    if c.errors:
        raise InputError(c.errors)
    return AudioInput(
        prompt=prompt,
        negative_prompt=negative_prompt,
        seconds_total=seconds,
        num_inference_steps=steps,
        guidance_scale=guidance,
        seed=seed,
        output_format=output_format,
        seeds=[seed],
    )


def _seconds_total(c: _Collector, payload: dict[str, Any], endpoint: Endpoint) -> float:
    """Seconds of audio, more than 0 and at most the endpoint's longest, to the millisecond."""
    default = float(endpoint.default_audio_seconds)
    value = payload.get("seconds_total")
    if value is None:
        return default
    # Only a float can be inf or nan; math.isfinite of an int beyond a float's range raises OverflowError, and the
    # range check below refuses such an int as it is.
    not_finite = isinstance(value, float) and not math.isfinite(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not_finite:
        c.add("seconds_total", "Input should be a valid number.", "float_type")
        return default
    longest = endpoint.max_audio_seconds
    if not 0 < value <= longest:
        c.add("seconds_total", f"Input should be more than 0 and at most {longest} seconds.", "out_of_range")
        return default
    try:
        exact = Decimal(str(value))
    except InvalidOperation:  # pragma: no cover - a finite float always has a decimal form
        exact = Decimal(0)
    if exact != exact.quantize(Decimal("0.001")):
        c.add("seconds_total", "Give seconds to the millisecond at most (3 decimals).", "decimal_places")
        return default
    return float(value)


def video_schema(endpoint: Endpoint) -> dict[str, Any]:
    """JSON Schema of a video endpoint's input, with its own limits and defaults (for /v1/models)."""
    image_to_video = endpoint.kind == PipelineKind.IMAGE_TO_VIDEO
    ratios = [*ASPECT_RATIOS, *([AUTO] if image_to_video else [])]
    default_short = min(endpoint.default_width, endpoint.default_height)
    properties: dict[str, Any] = {
        **_prompt_schema(endpoint),
        "resolution": {
            "type": "string",
            "pattern": RESOLUTION_PATTERN,
            "default": f"{default_short}p",
            "description": f"The shorter side in pixels, a multiple of {VIDEO_SIZE_MULTIPLE} up to "
            f"{min(endpoint.max_width, endpoint.max_height)} (like 480p).",
        },
        "aspect_ratio": {
            "type": "string",
            "enum": ratios,
            "description": "Width to height; the longer side is rounded to a multiple of 32. Left out: "
            + ("the start image's." if image_to_video else f"{endpoint.default_width}x{endpoint.default_height}."),
        },
        "num_frames": {
            "type": "integer",
            "minimum": 1,
            "maximum": endpoint.max_frames,
            "default": endpoint.default_num_frames,
        },
        "duration": {
            "type": "number",
            "exclusiveMinimum": 0,
            "description": "Seconds of video, instead of num_frames: rounded to whole frames at fps, at most "
            f"{endpoint.max_frames} frames.",
        },
        "fps": {"type": "integer", "minimum": 1, "maximum": endpoint.max_fps, "default": endpoint.default_fps},
        **_steps_schema(endpoint, "num_inference_steps"),
    }
    required = ["prompt"]
    if image_to_video:
        properties["image_url"] = {
            "type": "string",
            "description": "The first frame: an http(s) URL (an uploaded file's or an earlier output's included) or "
            f"a base64 data URI, at most {endpoint.max_input_image_bytes} bytes. Cropped to the video's aspect ratio "
            "around its centre.",
        }
        required.append("image_url")
    return {"type": "object", "properties": properties, "required": required}


def audio_schema(endpoint: Endpoint) -> dict[str, Any]:
    """JSON Schema of an audio endpoint's input, with its own limits and defaults (for /v1/models)."""
    properties: dict[str, Any] = {
        **_prompt_schema(endpoint),
        "seconds_total": {
            "type": "number",
            "exclusiveMinimum": 0,
            "maximum": endpoint.max_audio_seconds,
            "default": endpoint.default_audio_seconds,
            "description": "Seconds of audio, to the millisecond.",
        },
        **_steps_schema(endpoint, "steps"),
        "output_format": {"type": "string", "enum": list(AUDIO_FORMATS), "default": AUDIO_FORMATS[0]},
    }
    properties["steps"]["description"] = "Denoising steps (also accepted as num_inference_steps)."
    return {"type": "object", "properties": properties, "required": ["prompt"]}


def _prompt_schema(endpoint: Endpoint) -> dict[str, Any]:
    return {
        "prompt": {"type": "string", "minLength": 1, "maxLength": endpoint.max_prompt_chars},
        "negative_prompt": {"type": "string", "maxLength": endpoint.max_prompt_chars, "default": ""},
    }


def _steps_schema(endpoint: Endpoint, steps_name: str) -> dict[str, Any]:
    return {
        steps_name: {"type": "integer", "minimum": 1, "maximum": endpoint.max_steps, "default": endpoint.default_steps},
        "guidance_scale": {
            "type": "number",
            "minimum": 0,
            "maximum": MAX_GUIDANCE_SCALE,
            "default": endpoint.default_guidance_scale,
        },
        "seed": {"type": "integer", "minimum": 0, "maximum": MAX_SEED, "description": "Random when left out."},
    }
