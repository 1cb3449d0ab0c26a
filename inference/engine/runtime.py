"""Running one request on a loaded pipeline: per-image seeds, progress, cancellation at step boundaries."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from inference.engine.decoding import DecodeAgain, decode_images, decoded_once_more
from inference.engine.kinds import PipelineKind
from inference.engine.loading import Pipeline, pipeline_kind
from inference.engine.previews import LatentProjection, PreviewOptions, make_preview

# Stable Diffusion's VAE works in blocks of 8 pixels.
SIZE_MULTIPLE = 8
MAX_SEED = 2**64 - 1

OnStep = Callable[[int, int], None]
ShouldCancel = Callable[[], bool]


class BatchIncompatible(ValueError):
    """Requests that cannot share one pipeline call were given as a batch."""


class Cancelled(Exception):
    """The run stopped because `should_cancel()` answered True; `steps_done` denoising steps had run.

    `rows_stay`: the request left a batch that goes on, and its rows run on in it, unused, to the end of the call
    (the engine could not drop them): the time they take is no one's work (`inference.engine.batch_shares`).
    """

    def __init__(self, *, steps_done: int, total_steps: int, elapsed_ms: int, rows_stay: bool = False) -> None:
        super().__init__(f"cancelled after {steps_done} of {total_steps} steps")
        self.steps_done = steps_done
        self.total_steps = total_steps
        self.elapsed_ms = elapsed_ms
        self.rows_stay = rows_stay


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    """What to generate: one output per (prompt, seed) pair.

    Images by default; an `init_image` makes it image to image. `num_frames` makes each output a video of that many
    frames at `frame_rate` (an `init_image` is then its start frame), `audio_seconds` an audio clip that long.
    """

    prompts: list[str]
    seeds: list[int]
    width: int = 512
    height: int = 512
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    negative_prompt: str = ""
    init_image: Image.Image | None = None
    # Image-to-image only: how much of the schedule runs on top of the init image (1.0: all of it).
    strength: float = 0.8
    # Video: frames delivered and their rate (0: not a video).
    num_frames: int = 0
    frame_rate: int = 0
    # Audio: the clip's length in seconds (0: not audio).
    audio_seconds: float = 0.0

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("at least one prompt is needed")
        if len(self.seeds) != len(self.prompts):
            raise ValueError(f"one seed per image: {len(self.prompts)} prompts but {len(self.seeds)} seeds")
        if any(not 0 <= seed <= MAX_SEED for seed in self.seeds):
            raise ValueError(f"seeds must be between 0 and {MAX_SEED}")
        for name, size in (("width", self.width), ("height", self.height)):
            if size <= 0 or size % SIZE_MULTIPLE:
                raise ValueError(f"{name} must be a positive multiple of {SIZE_MULTIPLE}, not {size}")
        if self.num_inference_steps < 1:
            raise ValueError("num_inference_steps must be at least 1")
        if self.guidance_scale < 0:
            raise ValueError("guidance_scale must not be negative")
        if self.num_frames < 0 or (self.num_frames and self.frame_rate < 1):
            raise ValueError("a video needs a positive number of frames and a frame rate of at least 1")
        if self.audio_seconds < 0 or (self.audio_seconds and self.num_frames):
            raise ValueError("audio_seconds must be positive, and a request is a video or audio, not both")
        if self.audio_seconds and self.init_image is not None:
            raise ValueError("audio is generated from text only")
        if self.init_image is not None and not self.num_frames:
            if not 0 < self.strength <= 1:
                raise ValueError("strength must be in (0, 1]")
            if int(self.num_inference_steps * self.strength) < 1:
                raise ValueError("num_inference_steps * strength must allow at least one step")

    @property
    def kind(self) -> PipelineKind:
        if self.audio_seconds:
            return PipelineKind.TEXT_TO_AUDIO
        if self.num_frames:
            return PipelineKind.TEXT_TO_VIDEO if self.init_image is None else PipelineKind.IMAGE_TO_VIDEO
        return PipelineKind.TEXT_TO_IMAGE if self.init_image is None else PipelineKind.IMAGE_TO_IMAGE

    @property
    def total_steps(self) -> int:
        """Denoising steps the run will take (image-to-image skips the first `1 - strength` of the schedule)."""
        if self.kind is not PipelineKind.IMAGE_TO_IMAGE:
            return self.num_inference_steps
        return min(int(self.num_inference_steps * self.strength), self.num_inference_steps)


@dataclass(frozen=True)
class GenerationResult:
    images: list[Image.Image]
    steps: int
    # Wall-clock time of the run (monotonic), from the call into the pipeline to decoded outputs.
    run_ms: int
    # Videos: one uint8 array of (frames, height, width, 3) each, at `frame_rate` frames per second.
    videos: list[np.ndarray] = field(default_factory=list)
    frame_rate: int = 0
    # Audio clips: one float32 array of (channels, samples) in [-1, 1] each, at `sample_rate` samples per second.
    audios: list[np.ndarray] = field(default_factory=list)
    sample_rate: int = 0


def run_pipeline(
    pipeline: Pipeline,
    request: GenerationRequest,
    *,
    on_step: OnStep | None = None,
    should_cancel: ShouldCancel | None = None,
    inference_mode: bool = True,
    previews: PreviewOptions | None = None,
    decode_again: DecodeAgain | None = None,
) -> GenerationResult:
    """Generate `request`'s images with diffusers' own denoising loop (the engine's loop is `Engine.run_batch`).

    `on_step(step, total)` is called after each denoising step (1..total). `should_cancel()` is asked before
    each step (before the first, and after each one but the last); when it answers True the run stops there and
    `Cancelled` is raised. `previews` asks for a picture of the current latents every few steps (the request is
    member 0 of `previews.members`). The pipeline stops at its latents and they are decoded here, as the pipeline
    decodes them (`inference.engine.decoding`): `decode_again(exc)` is asked when an exception cuts the decode short;
    answered True, the decode starts over, once.
    One run at a time per pipeline object: diffusers keeps per-call state on the pipeline.
    """
    if pipeline_kind(pipeline) is not request.kind:
        raise ValueError(f"a {request.kind} request cannot run on a {pipeline_kind(pipeline)} pipeline")
    started = time.perf_counter()

    def elapsed_ms() -> int:
        return math.ceil((time.perf_counter() - started) * 1000)

    if should_cancel is not None and should_cancel():
        raise Cancelled(steps_done=0, total_steps=request.total_steps, elapsed_ms=elapsed_ms())

    def step_ended(pipe: Any, step_index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        steps_done = step_index + 1
        total = pipe.num_timesteps
        if on_step is not None:
            on_step(steps_done, total)
        if previews is not None and 0 in previews.members and previews.due(steps_done, total):
            preview = make_preview(
                tensors["latents"],
                LatentProjection.for_pipeline(pipe),
                step=steps_done,
                total=total,
                scale=pipe.vae_scale_factor,
            )
            previews.on_preview(0, preview)
        # Asked before each further step only: past the last one the work is done, and is decoded and delivered.
        if should_cancel is not None and steps_done < total and should_cancel():
            # Raised through diffusers' loop: nothing after this step runs, not even the VAE decode.
            raise Cancelled(steps_done=steps_done, total_steps=total, elapsed_ms=elapsed_ms())
        return tensors

    # CPU generators: the same seed gives the same starting noise on every device. One per image, so an
    # image depends only on its own seed, never on what else is in the batch.
    generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in request.seeds]
    arguments: dict[str, Any] = {
        "prompt": list(request.prompts),
        "negative_prompt": [request.negative_prompt] * len(request.prompts),
        "num_inference_steps": request.num_inference_steps,
        "guidance_scale": request.guidance_scale,
        "generator": generators,
        "output_type": "latent",
        "callback_on_step_end": step_ended,
    }
    if request.init_image is None:
        arguments.update(width=request.width, height=request.height)
    else:
        # The img2img pipeline takes its size from the image.
        arguments.update(image=_fit(request.init_image, request.width, request.height), strength=request.strength)

    # Without inference mode this is the stock call: diffusers' pipelines (and the decode) run under no_grad.
    with torch.inference_mode(inference_mode):
        latents = pipeline(**arguments).images
        images = decoded_once_more(lambda: decode_images(pipeline, latents, generators), decode_again)
    return GenerationResult(images=images, steps=request.total_steps, run_ms=elapsed_ms())


def _fit(image: Image.Image, width: int, height: int) -> Image.Image:
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return image


MemberCheck = Callable[[int], bool]
MemberCancelled = Callable[[int, Cancelled], None]


class BatchRun:
    """What every engine's run of one batch keeps about its requests: which are still in it, each one's outcome, and
    the requests that leave it when their job is cancelled between steps (``should_cancel`` asks per request)."""

    def __init__(
        self,
        requests: list[GenerationRequest],
        on_step: OnStep | None,
        should_cancel: MemberCheck | None,
        on_cancelled: MemberCancelled | None,
    ) -> None:
        self.requests = requests
        self.on_step = on_step
        self.should_cancel = should_cancel
        self.on_cancelled = on_cancelled
        self.total_steps = requests[0].num_inference_steps
        self.guided = requests[0].guidance_scale > 1
        self.outcomes: list[GenerationResult | Cancelled | None] = [None] * len(requests)
        self.active = list(range(len(requests)))
        self.started = time.perf_counter()
        # Whether the rows of a request that leaves run on to the end of the call, unused (`Cancelled.rows_stay`).
        self.rows_stay = False

    def elapsed_ms(self) -> int:
        return math.ceil((time.perf_counter() - self.started) * 1000)

    def _leave_if_cancelled(self, *, steps_done: int) -> bool:
        if self.should_cancel is None:
            return False
        leaving = [member for member in self.active if self.should_cancel(member)]
        for member in leaving:
            self.active.remove(member)
            cancelled = Cancelled(
                steps_done=steps_done,
                total_steps=self.total_steps,
                elapsed_ms=self.elapsed_ms(),
                rows_stay=self.rows_stay and bool(self.active),
            )
            self.outcomes[member] = cancelled
            if self.on_cancelled is not None:
                self.on_cancelled(member, cancelled)
        return bool(leaving)

    def _outcomes(self) -> list[GenerationResult | Cancelled]:
        outcomes = [outcome for outcome in self.outcomes if outcome is not None]
        if len(outcomes) != len(self.outcomes):
            raise RuntimeError("a request of the batch got no outcome")
        return outcomes
