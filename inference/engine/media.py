"""The engine for video and audio models: a warm LTX-Video or Stable Audio pipeline running batches of requests.

Each batch is one call of diffusers' own pipeline (text to video, image to video, text to audio) on the warm modules,
so an output equals stock diffusers' for the same seed up to float rounding. Around that call the engine adds what
the image engine adds around its loop, as far as these pipelines allow:

- several requests in one call, each with its own prompt, negative prompt and seed (one CPU generator per request:
  its starting noise, and Stable Audio's SDE noise, depend on its own seed only, never on its company);
- text-encoder outputs of recent prompts kept (``prompt_cache``), handed to the pipeline as embeddings: the same
  tensors its own encoding gives;
- progress after every denoising step, and before each further step the question whether each request goes on
  (``should_cancel``: a cancel, or a step its hold does not cover). A request that stops leaves at once
  (``on_cancelled``) and its rows run on unused to the end of the call; when none is left the call stops there.
  Frame-level stops do not exist: every frame of a clip is denoised together at every step;
- video frames delivered exactly as asked: LTX makes ``k * r + 1`` frames (``r`` its VAE's temporal compression),
  so the engine asks for the smallest such count that covers the request and drops the extra frames at the end;
- the decode started over once when Celery's soft time limit cuts it short (``decode_again``), so that finished work
  is delivered, not thrown away: the call stops at its latents and the engine decodes them itself, as the pipeline
  would (`inference.engine.decoding`);
- the optimization profile's keys that apply to these models: ``inference_mode``, ``precision``, ``compile``
  (the transformer: its repeated blocks, or whole), ``prompt_cache``, ``max_batch_size``, ``batch_wait_ms``, and
  ``small_head_attention`` (LTX-Video's attention heads of 8 or 16 channels in the engine's CPU kernel, the tiny
  model's among them). The UNet-specific keys (fused projections, padded text tokens, channels-last, CUDA graphs,
  feature caching) do not apply and are left alone.
"""

from __future__ import annotations

import logging
import math
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers.pipelines.ltx.pipeline_ltx import LTXPipeline
from diffusers.pipelines.stable_audio.pipeline_stable_audio import StableAudioPipeline
from PIL import Image, ImageOps

from inference.engine.decoding import DecodeAgain, decode_audio, decode_video, decoded_once_more
from inference.engine.kinds import Family, PipelineKind
from inference.engine.loading import Pipeline, base_family, pipeline_for_kind
from inference.engine.optimize import ModuleOptimizations, compiling
from inference.engine.previews import PreviewOptions
from inference.engine.runtime import (
    BatchIncompatible,
    BatchRun,
    Cancelled,
    GenerationRequest,
    GenerationResult,
    MemberCancelled,
    MemberCheck,
    OnStep,
)

logger = logging.getLogger(__name__)


# LTX's pipeline takes frame sizes in multiples of 32 (its transformer's patches over the VAE's 32x compression).
VIDEO_SIZE_MULTIPLE = 32
# torchsde warns on every step that Stable Audio's Brownian tree is queried at its own end points (a rounding of
# the scheduler's sigmas, harmless): diffusers/issues/8739. Kept out of the worker's log.
_TORCHSDE_WARNINGS = r"Should have (ta|tb|tb_name|ta_name|\{tb_name\})"


def media_batch_key(request: GenerationRequest) -> tuple[Any, ...] | None:
    """Video and audio requests with equal keys run as one pipeline call; None: alone (image to video).

    Everything the pipelines take as one value for the whole call is in the key: the shape of the output, the steps
    and the guidance scale, and for audio whether a negative prompt is given (without one Stable Audio's unguided
    rows are zeros, with one they are its encoding: the two cannot share a call).
    """
    kind = request.kind
    if kind is PipelineKind.TEXT_TO_VIDEO:
        return (
            kind,
            request.width,
            request.height,
            request.num_frames,
            request.frame_rate,
            request.num_inference_steps,
            request.guidance_scale,
        )
    if kind is PipelineKind.TEXT_TO_AUDIO:
        return (
            kind,
            request.audio_seconds,
            request.num_inference_steps,
            request.guidance_scale,
            bool(request.negative_prompt),
        )
    return None


def frames_to_generate(num_frames: int, temporal_compression: int) -> int:
    """The fewest frames of the form ``k * r + 1`` (what LTX's VAE decodes) that cover ``num_frames``."""
    return max(0, math.ceil((num_frames - 1) / temporal_compression)) * temporal_compression + 1


def fit_start_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """The start image cropped to the video's aspect ratio around its centre and scaled to its size: the frame is
    the image's, never stretched."""
    image = image.convert("RGB")
    if image.size == (width, height):
        return image
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS)


def to_uint8_frames(frames: np.ndarray) -> np.ndarray:
    """Frames of floats in [0, 1] as bytes, rounded as diffusers rounds its PIL images."""
    return np.asarray(np.clip((frames * 255).round(), 0, 255), dtype=np.uint8)


@dataclass(frozen=True)
class _Encoded:
    """One prompt's text-encoder outputs, as the pipeline's own encoding gives them for a batch of one."""

    positive: torch.Tensor
    positive_mask: torch.Tensor
    negative: torch.Tensor | None
    negative_mask: torch.Tensor | None


class _AllLeft(Exception):
    """Raised from the pipeline's step callback when no request of the batch goes on: the call stops there."""


class MediaEngine:
    """One loaded video or audio model with its optimizations applied. One run at a time (pipelines keep state)."""

    def __init__(self, pipeline: LTXPipeline | StableAudioPipeline, *, optimizations: ModuleOptimizations) -> None:
        self.family = base_family(pipeline)
        if self.family is Family.IMAGE:
            raise TypeError("image models run in inference.engine.Engine")
        self.base = pipeline
        self.optimizations = optimizations
        self.device = pipeline.transformer.device
        transformer = pipeline.transformer
        if optimizations.small_head_attention and self.device.type == "cpu" and self.family is Family.VIDEO:
            # Imported here: the kernel's module reads the compile cache's folder setting.
            from inference.engine.attention import use_small_head_attention_ltx

            logger.info(
                "small-head attention kernel on %d attention modules", use_small_head_attention_ltx(transformer)
            )
        if optimizations.compile == "regional" and getattr(transformer, "_repeated_blocks", None):
            transformer.compile_repeated_blocks(fullgraph=True)
        elif optimizations.compile != "off":
            # Stable Audio's transformer names no repeated blocks: compiled whole either way.
            transformer.compile(fullgraph=True)
        self._pipelines: dict[PipelineKind, Pipeline] = {}
        self._prompts: OrderedDict[tuple[str, str, bool], _Encoded] = OrderedDict()
        self._lock = threading.Lock()
        self.prompt_cache_hits = 0

    @property
    def replays_graphs(self) -> bool:
        return False

    @property
    def sample_rate(self) -> int:
        """Audio models: samples per second of what they make."""
        return int(self.base.vae.config.sampling_rate) if self.family is Family.AUDIO else 0

    @property
    def max_audio_seconds(self) -> float:
        """Audio models: the longest clip one call makes (its transformer's length times the VAE's hop)."""
        if self.family is not Family.AUDIO:
            return 0.0
        pipe: Any = self.base
        return float(pipe.transformer.config.sample_size * pipe.vae.hop_length / pipe.vae.config.sampling_rate)

    @property
    def temporal_compression(self) -> int:
        """Video models: how many frames one latent frame stands for."""
        return int(self.base.vae.temporal_compression_ratio) if self.family is Family.VIDEO else 1

    def pipeline(self, kind: PipelineKind | str) -> Pipeline:
        kind = PipelineKind(kind)
        if kind not in self._pipelines:
            self._pipelines[kind] = pipeline_for_kind(self.base, kind)
        return self._pipelines[kind]

    def run(
        self,
        request: GenerationRequest,
        *,
        options: Any = None,
        on_step: OnStep | None = None,
        should_cancel: Callable[[], bool] | None = None,
        previews: PreviewOptions | None = None,
    ) -> GenerationResult:
        """One request; raises `Cancelled` when `should_cancel()` answers True before a step."""
        outcome = self.run_batch(
            [request],
            options=options,
            on_step=on_step,
            should_cancel=None if should_cancel is None else (lambda member: should_cancel()),
        )[0]
        if isinstance(outcome, Cancelled):
            raise outcome
        return outcome

    def run_batch(
        self,
        requests: Sequence[GenerationRequest],
        *,
        options: Any = None,
        on_step: OnStep | None = None,
        should_cancel: MemberCheck | None = None,
        on_cancelled: MemberCancelled | None = None,
        previews: PreviewOptions | None = None,
        decode_again: DecodeAgain | None = None,
    ) -> list[GenerationResult | Cancelled]:
        """Each request's result, or the `Cancelled` that ended it, in order (`Engine.run_batch`'s contract).

        `options` is the image engine's `RunOptions` (its `inference_mode` and `prompt_cache` apply here). Video and
        audio have no previews: `previews` is accepted and ignored. `decode_again(exc)` is asked when an exception cuts
        short the decoding of the batch past its last step; answered True, the decoding starts over, once.
        """
        if not requests:
            raise ValueError("an empty batch")
        kinds = {request.kind for request in requests}
        if kinds - {PipelineKind.TEXT_TO_VIDEO, PipelineKind.IMAGE_TO_VIDEO, PipelineKind.TEXT_TO_AUDIO}:
            raise BatchIncompatible(f"a {self.family} model makes no {', '.join(sorted(kinds))}")
        if len(requests) > 1:
            keys = {media_batch_key(request) for request in requests}
            if None in keys or len(keys) != 1:
                raise BatchIncompatible("these requests cannot share one pipeline call")
        inference_mode = getattr(options, "inference_mode", True)
        keep = int(getattr(options, "prompt_cache", 0))
        with self._lock, compiling(self.optimizations), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_TORCHSDE_WARNINGS)
            run = _MediaRun(self, list(requests), keep, on_step, should_cancel, on_cancelled, decode_again)
            return run.run(inference_mode)

    def encoded(self, prompt: str, negative_prompt: str, *, guided: bool, keep: int) -> _Encoded:
        """The text encoder's outputs for one prompt (and its negative, when guided), from the cache when `keep` > 0.

        Encoded one prompt at a time, as each pipeline encodes it: padded to its fixed length, so a row does not
        depend on the others of a batch.
        """
        key = (prompt, negative_prompt, guided)
        cached = self._prompts.get(key) if keep else None
        if cached is not None:
            self._prompts.move_to_end(key)
            self.prompt_cache_hits += 1
            return cached
        encoded = self._encode_video(prompt, negative_prompt, guided) if self.family is Family.VIDEO else None
        if encoded is None:
            encoded = self._encode_audio(prompt, negative_prompt, guided)
        if keep:
            self._prompts[key] = encoded
            while len(self._prompts) > keep:
                self._prompts.popitem(last=False)
        return encoded

    def _encode_video(self, prompt: str, negative_prompt: str, guided: bool) -> _Encoded:
        pipe: Any = self.base
        positive, positive_mask, negative, negative_mask = pipe.encode_prompt(
            prompt=prompt,
            negative_prompt=negative_prompt,
            do_classifier_free_guidance=guided,
            num_videos_per_prompt=1,
            device=self.device,
        )
        return _Encoded(positive, positive_mask, negative if guided else None, negative_mask if guided else None)

    def _encode_audio(self, prompt: str, negative_prompt: str, guided: bool) -> _Encoded:
        """What `StableAudioPipeline.encode_prompt` computes before its projection, which the call then applies."""
        pipe: Any = self.base

        def t5(text: str) -> tuple[torch.Tensor, torch.Tensor]:
            tokens = pipe.tokenizer(
                [text], padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                return_tensors="pt",
            )  # fmt: skip
            mask = tokens.attention_mask.to(self.device)
            hidden: torch.Tensor = pipe.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]
            return hidden, mask

        positive, positive_mask = t5(prompt)
        if not (guided and negative_prompt):
            return _Encoded(positive, positive_mask, None, None)
        negative, negative_mask = t5(negative_prompt)
        negative = torch.where(negative_mask.to(torch.bool).unsqueeze(2), negative, 0.0)
        return _Encoded(positive, positive_mask, negative, negative_mask)


class _MediaRun(BatchRun):
    """One batch through one pipeline call: which requests are still in it, and the callback between steps."""

    def __init__(
        self,
        engine: MediaEngine,
        requests: list[GenerationRequest],
        keep: int,
        on_step: OnStep | None,
        should_cancel: MemberCheck | None,
        on_cancelled: MemberCancelled | None,
        decode_again: DecodeAgain | None = None,
    ) -> None:
        super().__init__(requests, on_step, should_cancel, on_cancelled)
        self.engine = engine
        self.keep = keep
        self.decode_again = decode_again
        self.first = requests[0]
        self.rows_stay = True  # one call of diffusers' pipeline: its batch keeps every row to the end

    def run(self, inference_mode: bool) -> list[GenerationResult | Cancelled]:
        if self._leave_if_cancelled(steps_done=0) and not self.active:
            return self._outcomes()
        pipeline = self.engine.pipeline(self.first.kind)
        arguments = self._arguments()
        # Without inference mode this is the stock call: diffusers' pipelines (and the decode) run under no_grad.
        with torch.inference_mode(inference_mode):
            try:
                output = pipeline(**arguments)
            except _AllLeft:
                return self._outcomes()
            latents = output.audios if self.first.kind is PipelineKind.TEXT_TO_AUDIO else output.frames
            # Past the last step the work is done: decoded and delivered, started over once if a time limit cuts it.
            decoded = decoded_once_more(
                lambda: self._decode(pipeline, latents, arguments["generator"]), self.decode_again
            )
        run_ms = self.elapsed_ms()
        for member in self.active:
            if self.first.kind is PipelineKind.TEXT_TO_AUDIO:
                clip = np.asarray(decoded[member], dtype=np.float32)
                result = GenerationResult(
                    images=[], steps=self.total_steps, run_ms=run_ms, audios=[clip], sample_rate=self.engine.sample_rate
                )
            else:
                frames = to_uint8_frames(np.asarray(decoded[member])[: self.requests[member].num_frames])
                result = GenerationResult(
                    images=[], steps=self.total_steps, run_ms=run_ms, videos=[frames], frame_rate=self.first.frame_rate
                )
            self.outcomes[member] = result
        return self._outcomes()

    def _decode(self, pipeline: Pipeline, latents: torch.Tensor, generators: list[torch.Generator]) -> np.ndarray:
        """The batch's outputs from its final latents, one per row: a clip's frames (floats in [0, 1]), or its audio
        samples cut to the length asked."""
        first = self.first
        if first.kind is PipelineKind.TEXT_TO_AUDIO:
            return decode_audio(pipeline, latents, seconds=first.audio_seconds)
        return decode_video(
            pipeline,
            latents,
            num_frames=frames_to_generate(first.num_frames, self.engine.temporal_compression),
            height=first.height,
            width=first.width,
            generators=generators,
        )

    def _arguments(self) -> dict[str, Any]:
        """The pipeline call for the whole batch: one row per request, each with its own generator."""
        first = self.first
        generators = [torch.Generator(device="cpu").manual_seed(request.seeds[0]) for request in self.requests]
        for request in self.requests:
            if len(request.seeds) != 1:
                raise BatchIncompatible("a video or audio request makes one output")
        arguments: dict[str, Any] = {
            "num_inference_steps": first.num_inference_steps,
            "guidance_scale": first.guidance_scale,
            "generator": generators,
            # Decoded by the engine (`_decode`), where a decode cut short can start over.
            "output_type": "latent",
        }
        if self.keep:
            arguments.update(self._embeddings())
        else:
            arguments["prompt"] = [request.prompts[0] for request in self.requests]
            negatives = [request.negative_prompt for request in self.requests]
            # Stable Audio: no negative prompt (its unguided rows zeros) unless one is given; LTX treats None as "".
            arguments["negative_prompt"] = negatives if any(negatives) else None
        if first.kind is PipelineKind.TEXT_TO_AUDIO:
            arguments.update(audio_end_in_s=first.audio_seconds, callback=self._audio_step, callback_steps=1)
            return arguments
        arguments.update(
            width=first.width,
            height=first.height,
            num_frames=frames_to_generate(first.num_frames, self.engine.temporal_compression),
            frame_rate=first.frame_rate,
            callback_on_step_end=self._video_step,
        )
        if first.kind is PipelineKind.IMAGE_TO_VIDEO:
            images = [request.init_image for request in self.requests]
            arguments["image"] = [fit_start_image(image, first.width, first.height) for image in images if image]
        return arguments

    def _embeddings(self) -> dict[str, Any]:
        """Prompt embeddings from the engine's cache, laid out as each pipeline's own encoding lays out a batch."""
        rows = [
            self.engine.encoded(request.prompts[0], request.negative_prompt, guided=self.guided, keep=self.keep)
            for request in self.requests
        ]
        embeddings: dict[str, Any] = {}
        positive = torch.cat([row.positive for row in rows])
        positive_mask = torch.cat([row.positive_mask for row in rows])
        negatives = [row.negative for row in rows]
        negative_masks = [row.negative_mask for row in rows]
        has_negative = all(tensor is not None for tensor in negatives)
        if self.engine.family is Family.AUDIO:
            embeddings.update(prompt_embeds=positive, attention_mask=positive_mask)
            if has_negative:
                embeddings.update(
                    negative_prompt_embeds=torch.cat([t for t in negatives if t is not None]),
                    negative_attention_mask=torch.cat([t for t in negative_masks if t is not None]),
                )
            return embeddings
        embeddings.update(prompt_embeds=positive, prompt_attention_mask=positive_mask)
        if has_negative:
            embeddings.update(
                negative_prompt_embeds=torch.cat([t for t in negatives if t is not None]),
                negative_prompt_attention_mask=torch.cat([t for t in negative_masks if t is not None]),
            )
        return embeddings

    def _video_step(self, pipe: Any, step_index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        self._after_step(step_index + 1)
        return tensors

    def _audio_step(self, step_index: int, timestep: Any, latents: Any) -> None:
        self._after_step(step_index + 1)

    def _after_step(self, steps_done: int) -> None:
        if self.on_step is not None:
            self.on_step(steps_done, self.total_steps)
        # Asked before each further step only: past the last one the work is done, and is decoded and delivered.
        if steps_done < self.total_steps and self._leave_if_cancelled(steps_done=steps_done) and not self.active:
            raise _AllLeft
