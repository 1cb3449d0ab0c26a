"""The engine the workers run: a warm pipeline with its optimizations applied, running batches of requests.

Text to image runs through the engine's own denoising loop, which mirrors stock diffusers' `__call__` operation for
operation (so with the lossless settings an image equals stock's up to float rounding, and in float32 on a CPU it is
usually bit-identical), and adds what the stock loop cannot do: several requests in one call with their own seeds,
prompts and guidance, prompt embeddings kept across requests, cancellation of one request in a batch (its rows leave
the batch at the next step), feature caching and CUDA graphs. Image to image runs through diffusers' own denoising loop
on the same optimized modules, one request at a time. Both decode their latents in the engine's own code
(`inference.engine.decoding`), so that a decode cut short by a time limit can start over.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from inference.engine.decoding import DecodeAgain, decode_images, decoded_once_more
from inference.engine.feature_cache import FeatureCache, cached_unet_forward, check_supported
from inference.engine.kinds import PipelineKind
from inference.engine.loading import Pipeline, pipeline_for_kind
from inference.engine.media import media_batch_key
from inference.engine.optimize import (
    CudaGraphUNet,
    ModuleOptimizations,
    apply_module_optimizations,
    compiling,
    pad_text_tokens,
)
from inference.engine.previews import LatentProjection, PreviewOptions, make_preview
from inference.engine.profile import OptimizationProfile
from inference.engine.runtime import (
    BatchIncompatible,
    BatchRun,
    Cancelled,
    GenerationRequest,
    GenerationResult,
    MemberCancelled,
    MemberCheck,
    OnStep,
    run_pipeline,
)

# Schedulers whose step treats every batch row on its own and keeps no per-row state between steps: rows of a
# request that leaves the batch can be dropped from them. With others, the rows run on to the end, unused.
ROW_INDEPENDENT_SCHEDULERS = frozenset(
    {"DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"}
)


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """The part of a profile that applies per run (the rest is applied to the modules once, at load)."""

    inference_mode: bool = True
    prompt_cache: int = 0
    feature_cache_interval: int = 0
    # Applied on a CPU only (see `optimize.pad_text_tokens`).
    pad_text_tokens: bool = False

    @classmethod
    def of(cls, profile: OptimizationProfile) -> RunOptions:
        return cls(
            inference_mode=profile.inference_mode,
            pad_text_tokens=profile.pad_text_tokens,
            prompt_cache=profile.prompt_cache,
            feature_cache_interval=profile.feature_cache_interval,
        )


__all__ = ["BatchIncompatible", "Engine", "RunOptions", "batch_key"]


def batch_key(request: GenerationRequest) -> tuple[Any, ...] | None:
    """Requests with equal keys can run as one call; None: this request runs alone (image to image or video)."""
    if request.kind not in (PipelineKind.TEXT_TO_IMAGE, PipelineKind.IMAGE_TO_IMAGE):
        return media_batch_key(request)
    if request.init_image is not None:
        return None
    # Guidance on or off changes the batch's layout (two UNet rows per image, or one); its scale may differ.
    return (request.width, request.height, request.num_inference_steps, request.guidance_scale > 1)


@dataclass(frozen=True)
class _PromptEmbeddings:
    positive: torch.Tensor
    negative: torch.Tensor | None
    pooled: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None


class Engine:
    """One loaded model with its optimizations applied. One run at a time (diffusers keeps state on modules)."""

    def __init__(
        self, pipeline: StableDiffusionPipeline | StableDiffusionXLPipeline, *, optimizations: ModuleOptimizations
    ) -> None:
        if not isinstance(pipeline, StableDiffusionPipeline | StableDiffusionXLPipeline):
            raise TypeError(f"the engine runs Stable Diffusion and SDXL pipelines, not {type(pipeline).__name__}")
        self.base = pipeline
        self.optimizations = optimizations
        self.is_xl = isinstance(pipeline, StableDiffusionXLPipeline)
        self.device = pipeline.unet.device
        apply_module_optimizations(pipeline, optimizations)
        if self.is_xl and pipeline.vae.dtype == torch.float16 and pipeline.vae.config.force_upcast:
            # Stock SDXL moves its VAE to float32 for every decode and back after; keep it there instead.
            pipeline.vae.to(dtype=torch.float32)
        self._graphs = (
            CudaGraphUNet(pipeline.unet) if optimizations.cuda_graphs and self.device.type == "cuda" else None
        )
        # Feature caching calls the UNet's blocks itself, around a fully compiled UNet: compile that path too
        # (two graphs: the refreshing step and the shallow one).
        self._cached_forward: Callable[..., Any] = (
            torch.compile(cached_unet_forward, fullgraph=True)
            if optimizations.compile == "full"
            else cached_unet_forward
        )
        self._pipelines: dict[PipelineKind, Pipeline] = {}
        self._prompts: OrderedDict[tuple[str, str, bool], _PromptEmbeddings] = OrderedDict()
        self._lock = threading.Lock()
        self.prompt_cache_hits = 0
        self.preview_projection = LatentProjection.for_pipeline(pipeline)

    @property
    def replays_graphs(self) -> bool:
        """The UNet runs as captured CUDA graphs (fixed shapes)."""
        return self._graphs is not None

    def pipeline(self, kind: PipelineKind | str) -> Pipeline:
        kind = PipelineKind(kind)
        if kind is PipelineKind.TEXT_TO_IMAGE:
            return self.base  # type: ignore[return-value]  # an SDXL base runs text to image only
        if self.is_xl:
            raise ValueError("image to image is not served for SDXL models")
        if kind not in self._pipelines:
            self._pipelines[kind] = pipeline_for_kind(self.base, kind)  # type: ignore[arg-type]
        return self._pipelines[kind]

    def run(
        self,
        request: GenerationRequest,
        *,
        options: RunOptions | None = None,
        on_step: OnStep | None = None,
        should_cancel: Callable[[], bool] | None = None,
        previews: PreviewOptions | None = None,
    ) -> GenerationResult:
        """One request; raises `Cancelled` when `should_cancel()` answers True before or after a step."""
        outcome = self.run_batch(
            [request],
            options=options,
            on_step=on_step,
            should_cancel=None if should_cancel is None else (lambda member: should_cancel()),
            previews=previews,
        )[0]
        if isinstance(outcome, Cancelled):
            raise outcome
        return outcome

    def run_batch(
        self,
        requests: Sequence[GenerationRequest],
        *,
        options: RunOptions | None = None,
        on_step: OnStep | None = None,
        should_cancel: MemberCheck | None = None,
        on_cancelled: MemberCancelled | None = None,
        previews: PreviewOptions | None = None,
        decode_again: DecodeAgain | None = None,
    ) -> list[GenerationResult | Cancelled]:
        """Each request's result, or the `Cancelled` that ended it, in order.

        `on_step(step, total)` follows the batch's steps. `should_cancel(member)` is asked for every request still in
        the batch before each step (the first, and after each one but the last: a request past its last step is
        decoded and delivered whatever comes); a request it answers True for leaves the batch there:
        `on_cancelled(member, cancelled)` is called at once, so its caller can close it while the others go on.
        `previews` (`inference.engine.previews`): the requests that want a picture of their latents every few steps.
        `decode_again(exc)`: asked when an exception cuts short the decoding of a batch past its last step (a time
        limit); answered True, the decoding starts over, once.
        """
        if not requests:
            raise ValueError("an empty batch")
        options = options or RunOptions()
        if requests[0].init_image is not None:
            if len(requests) > 1:
                raise BatchIncompatible("image-to-image requests run one at a time")
            image_to_image = self._image_to_image(
                requests[0], options, on_step, should_cancel, on_cancelled, previews, decode_again
            )
            return [image_to_image]
        keys = {batch_key(request) for request in requests}
        if len(keys) != 1:
            raise BatchIncompatible("a batch needs one size, one number of steps and guidance on or off for all")
        grad_mode: AbstractContextManager[Any] = torch.inference_mode() if options.inference_mode else torch.no_grad()
        with self._lock, grad_mode, compiling(self.optimizations):
            return _TextToImageRun(
                self, list(requests), options, on_step, should_cancel, on_cancelled, previews, decode_again
            ).run()

    def _image_to_image(
        self,
        request: GenerationRequest,
        options: RunOptions,
        on_step: OnStep | None,
        should_cancel: MemberCheck | None,
        on_cancelled: MemberCancelled | None,
        previews: PreviewOptions | None,
        decode_again: DecodeAgain | None,
    ) -> GenerationResult | Cancelled:
        pipeline = self.pipeline(PipelineKind.IMAGE_TO_IMAGE)
        try:
            with self._lock, compiling(self.optimizations):
                return run_pipeline(
                    pipeline,
                    request,
                    on_step=on_step,
                    should_cancel=None if should_cancel is None else (lambda: should_cancel(0)),
                    inference_mode=options.inference_mode,
                    previews=previews,
                    decode_again=decode_again,
                )
        except Cancelled as cancelled:
            if on_cancelled is not None:
                on_cancelled(0, cancelled)
            return cancelled

    def prompt_embeddings(self, prompt: str, negative_prompt: str, *, guidance: bool, keep: int) -> _PromptEmbeddings:
        """The text encoder's output for one prompt, from the cache when `keep` > 0 and it has it.

        Encoded through the pipeline's own `encode_prompt`, one prompt at a time: a cached entry is the very tensor
        a new encoding would give. An empty negative prompt is no negative prompt (SDXL then uses zeros, as stock).
        """
        key = (prompt, negative_prompt, guidance)
        cached = self._prompts.get(key) if keep else None
        if cached is not None:
            self._prompts.move_to_end(key)
            self.prompt_cache_hits += 1
            return cached
        negative = negative_prompt or None
        if isinstance(self.base, StableDiffusionXLPipeline):
            positive, negative_embeds, pooled, negative_pooled = self.base.encode_prompt(
                prompt=prompt,
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=guidance,
                negative_prompt=negative,
            )
            embeddings = _PromptEmbeddings(positive, negative_embeds, pooled, negative_pooled)
        else:
            positive, negative_embeds = self.base.encode_prompt(
                prompt, self.device, 1, guidance, negative_prompt=negative
            )
            embeddings = _PromptEmbeddings(positive, negative_embeds)
        if keep:
            self._prompts[key] = embeddings
            while len(self._prompts) > keep:
                self._prompts.popitem(last=False)
        return embeddings

    def predict_noise(
        self,
        model_input: torch.Tensor,
        timestep: torch.Tensor,
        embeddings: torch.Tensor,
        added: dict[str, torch.Tensor] | None,
        *,
        text_mask: torch.Tensor | None = None,
        feature_cache: FeatureCache | None,
        step_index: int,
    ) -> torch.Tensor:
        """`text_mask`: which text tokens are real where `embeddings` were padded (`optimize.pad_text_tokens`)."""
        if feature_cache is not None:
            return feature_cache.predict(
                self._cached_forward,
                self.base.unet,
                model_input,
                timestep,
                embeddings,
                step_index=step_index,
                added_cond_kwargs=added,
                encoder_attention_mask=text_mask,
            )
        if self._graphs is not None:
            # CUDA only, where text tokens are never padded (`_TextToImageRun.run`): no mask to capture.
            return self._graphs(model_input, timestep, embeddings, added)
        prediction: torch.Tensor = self.base.unet(
            model_input,
            timestep,
            encoder_hidden_states=embeddings,
            timestep_cond=None,
            cross_attention_kwargs=None,
            added_cond_kwargs=added,
            encoder_attention_mask=text_mask,
            return_dict=False,
        )[0]
        return prediction


@dataclass(kw_only=True, eq=False)
class _Rows:
    """Everything a batch holds per image row, so that rows leave together (`keep`) when their request leaves.

    The UNet sees each row twice when guided (the unconditional rows first, then the conditional ones, as stock
    concatenates them): the text inputs and the feature cache are laid out that way; the rest has one entry per row.
    """

    guided: bool
    members: list[int]  # row -> the request it belongs to
    generators: list[torch.Generator]
    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    text_mask: torch.Tensor | None  # which text tokens are real where the embeddings were padded
    added: dict[str, torch.Tensor] | None  # SDXL's extra UNet inputs
    guidance: float | torch.Tensor  # one scale for every row, or one per row
    step_kwargs: dict[str, Any]  # the scheduler's extra arguments: the rows' generators, where it takes them
    feature_cache: FeatureCache | None

    def of(self, members: Sequence[int]) -> list[int]:
        """The rows of these requests, in order."""
        return [row for row, member in enumerate(self.members) if member in members]

    def keep(self, rows: Sequence[int]) -> None:
        """Only these rows go on: everything per row is cut to them at once."""
        single = torch.tensor(list(rows), device=self.latents.device)
        both = torch.cat([single, single + len(self.members)]) if self.guided else single
        self.latents = self.latents.index_select(0, single)
        self.prompt_embeds = self.prompt_embeds.index_select(0, both)
        if self.text_mask is not None:
            self.text_mask = self.text_mask.index_select(0, both)
        if self.added is not None:
            self.added = {name: value.index_select(0, both) for name, value in self.added.items()}
        if isinstance(self.guidance, torch.Tensor):
            self.guidance = self.guidance.index_select(0, single)
        if self.feature_cache is not None:
            self.feature_cache.keep_rows(both)
        self.generators = [self.generators[row] for row in rows]
        if "generator" in self.step_kwargs:
            self.step_kwargs["generator"] = self.generators
        self.members = [self.members[row] for row in rows]


class _TextToImageRun(BatchRun):
    """One batch through the denoising loop; which requests are still in it, and their rows (`_Rows`)."""

    def __init__(
        self,
        engine: Engine,
        requests: list[GenerationRequest],
        options: RunOptions,
        on_step: OnStep | None,
        should_cancel: MemberCheck | None,
        on_cancelled: MemberCancelled | None,
        previews: PreviewOptions | None = None,
        decode_again: DecodeAgain | None = None,
    ) -> None:
        super().__init__(requests, on_step, should_cancel, on_cancelled)
        self.engine = engine
        self.pipe = engine.base
        self.options = options
        self.previews = previews
        self.decode_again = decode_again
        # A captured graph has fixed shapes (feature caching runs without graphs): its rows stay to the end.
        replays_graphs = engine.replays_graphs and options.feature_cache_interval < 2
        self.drop_rows = type(self.pipe.scheduler).__name__ in ROW_INDEPENDENT_SCHEDULERS and not replays_graphs
        self.rows_stay = not self.drop_rows

    def run(self) -> list[GenerationResult | Cancelled]:
        if self._leave_if_cancelled(steps_done=0) and not self.active:
            return self._outcomes()
        rows, timesteps = self._start()
        if self.drop_rows and len(self.active) < len(self.requests):
            rows.keep(rows.of(self.active))  # requests that left before the first step: no step for their rows
        for step_index, timestep in enumerate(timesteps):
            denoised = self._step(rows, step_index, timestep)
            if self.on_step is not None:
                self.on_step(step_index + 1, self.total_steps)
            if self.previews is not None and self.previews.due(step_index + 1, self.total_steps):
                self._preview(self.previews, rows, rows.latents if denoised is None else denoised, step_index + 1)
            # After the last step the work is done: it is decoded and delivered whatever stop comes now.
            if step_index + 1 == self.total_steps or not self._leave_if_cancelled(steps_done=step_index + 1):
                continue
            if not self.active:
                return self._outcomes()
            if self.drop_rows:
                rows.keep(rows.of(self.active))
        return self._delivered(rows)

    def _delivered(self, rows: _Rows) -> list[GenerationResult | Cancelled]:
        """Past the last step the work is done: decoded and handed out. An exception that cuts it short is put to
        `decode_again`; answered True (a soft time limit, with time left before the hard one), it starts over once."""
        return decoded_once_more(lambda: self._decoded(rows), self.decode_again)

    def _decoded(self, rows: _Rows) -> list[GenerationResult | Cancelled]:
        images = self._decode(rows.latents, rows.generators)
        run_ms = self.elapsed_ms()
        for member in self.active:
            member_images = [image for image, owner in zip(images, rows.members, strict=True) if owner == member]
            self.outcomes[member] = GenerationResult(images=member_images, steps=self.total_steps, run_ms=run_ms)
        return self._outcomes()

    def _start(self) -> tuple[_Rows, torch.Tensor]:
        """Every request's rows at their first step (its seeds' noise, its prompts), and the scheduler's timesteps."""
        pipe, first = self.pipe, self.requests[0]
        device = self.engine.device
        # Each request has one row per image.
        members = [member for member, request in enumerate(self.requests) for _ in request.seeds]
        generators = [torch.Generator(device="cpu").manual_seed(seed) for r in self.requests for seed in r.seeds]
        prompt_embeds, added = self._conditioning(first)
        text_mask: torch.Tensor | None = None
        if self.options.pad_text_tokens and device.type == "cpu":
            prompt_embeds, text_mask = pad_text_tokens(prompt_embeds)
        guidance: float | torch.Tensor = float(first.guidance_scale)
        if self.guided:
            scales = {request.guidance_scale for request in self.requests}
            if len(scales) > 1:
                per_row = [self.requests[member].guidance_scale for member in members]
                guidance = torch.tensor(per_row, dtype=prompt_embeds.dtype, device=device).view(-1, 1, 1, 1)

        scheduler = pipe.scheduler
        scheduler.set_timesteps(self.total_steps, device=device)
        if self.engine.is_xl and hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        timesteps: torch.Tensor = scheduler.timesteps
        # Some schedulers take more model calls than steps (PNDM's warm-up): progress counts calls, as stock does.
        self.total_steps = len(timesteps)
        shape = (
            len(members),
            pipe.unet.config.in_channels,
            first.height // pipe.vae_scale_factor,
            first.width // pipe.vae_scale_factor,
        )
        latents = randn_tensor(shape, generator=generators, device=device, dtype=prompt_embeds.dtype)
        latents = latents * scheduler.init_noise_sigma
        step_kwargs = pipe.prepare_extra_step_kwargs(generators, 0.0)  # type: ignore[no-untyped-call]
        feature_cache = (
            FeatureCache(self.options.feature_cache_interval) if self.options.feature_cache_interval > 1 else None
        )
        if feature_cache is not None:
            check_supported(pipe.unet)
        rows = _Rows(
            members=members,
            generators=generators,
            latents=latents,
            prompt_embeds=prompt_embeds,
            text_mask=text_mask,
            added=added,
            guidance=guidance,
            step_kwargs=step_kwargs,
            feature_cache=feature_cache,
            guided=self.guided,
        )
        return rows, timesteps

    def _step(self, rows: _Rows, step_index: int, timestep: torch.Tensor) -> torch.Tensor | None:
        """One denoising step of every row (as stock's loop makes it); the scheduler's estimate of the denoised
        latents, where it gives one (DDIM, Euler and DDPM do; PNDM and DPM-Solver do not)."""
        scheduler = self.pipe.scheduler
        model_input = torch.cat([rows.latents] * 2) if self.guided else rows.latents
        model_input = scheduler.scale_model_input(model_input, timestep)
        noise_pred = self.engine.predict_noise(
            model_input,
            timestep,
            rows.prompt_embeds,
            rows.added,
            text_mask=rows.text_mask,
            feature_cache=rows.feature_cache,
            step_index=step_index,
        )
        if self.guided:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + rows.guidance * (noise_pred_text - noise_pred_uncond)
        stepped = scheduler.step(noise_pred, timestep, rows.latents, **rows.step_kwargs, return_dict=False)
        rows.latents = stepped[0]
        return stepped[1] if len(stepped) > 1 and isinstance(stepped[1], torch.Tensor) else None

    def _preview(self, previews: PreviewOptions, rows: _Rows, latents: torch.Tensor, step: int) -> None:
        """The requests that want one get the picture of their rows of `latents` (one projection for all of them)."""
        wanted = [member for member in self.active if member in previews.members]
        if not wanted:
            return
        selected = rows.of(wanted)
        picked = latents.index_select(0, torch.tensor(selected, device=latents.device))
        preview = make_preview(
            picked,
            self.engine.preview_projection,
            step=step,
            total=self.total_steps,
            scale=self.pipe.vae_scale_factor,
        )
        owners = [rows.members[row] for row in selected]
        for member in wanted:
            mine = [pixels for pixels, owner in zip(preview.pixels, owners, strict=True) if owner == member]
            previews.on_preview(member, replace(preview, pixels=mine))

    def _conditioning(self, first: GenerationRequest) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """Text embeddings for every row (negatives first, as stock concatenates them), and SDXL's extra inputs.

        Each distinct prompt is encoded once and its embedding repeated for its images, as stock repeats it.
        """
        seen: dict[tuple[str, str], _PromptEmbeddings] = {}
        rows: list[_PromptEmbeddings] = []
        for request in self.requests:
            for prompt in request.prompts:
                key = (prompt, request.negative_prompt)
                if key not in seen:
                    seen[key] = self.engine.prompt_embeddings(
                        prompt, request.negative_prompt, guidance=self.guided, keep=self.options.prompt_cache
                    )
                rows.append(seen[key])
        prompt_embeds = torch.cat([row.positive for row in rows])
        if self.guided:
            prompt_embeds = torch.cat([torch.cat([_present(row.negative) for row in rows]), prompt_embeds])
        if not self.engine.is_xl:
            return prompt_embeds, None
        text_embeds = torch.cat([_present(row.pooled) for row in rows])
        if self.guided:
            text_embeds = torch.cat([torch.cat([_present(row.negative_pooled) for row in rows]), text_embeds])
        return prompt_embeds, self._xl_added(first, prompt_embeds, text_embeds)

    def _xl_added(
        self, first: GenerationRequest, prompt_embeds: torch.Tensor, text_embeds: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        pipe = self.pipe
        projection_dim = (
            int(text_embeds.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
        )
        size = (first.height, first.width)
        time_ids = sdxl_time_ids(pipe.unet, size, prompt_embeds.dtype, projection_dim)
        # Stock repeats [negative ids, ids] per image; SDXL's negative ids equal its ids, so every row is the same.
        time_ids = time_ids.to(self.engine.device).repeat(prompt_embeds.shape[0], 1)
        return {"text_embeds": text_embeds.to(self.engine.device), "time_ids": time_ids}

    def _decode(self, latents: torch.Tensor, generators: list[torch.Generator]) -> list[Image.Image]:
        pipe = self.pipe
        vae = pipe.vae
        if self.engine.is_xl:
            latents = latents.to(vae.dtype)
            config = vae.config
            if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
                mean = torch.tensor(config.latents_mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
                std = torch.tensor(config.latents_std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
                latents = latents * std / config.scaling_factor + mean
            else:
                latents = latents / config.scaling_factor
            image = vae.decode(latents, return_dict=False)[0]
            images: list[Image.Image] = pipe.image_processor.postprocess(image, output_type="pil")
            return images
        return decode_images(pipe, latents, generators)


def sdxl_time_ids(
    unet: UNet2DConditionModel, size: tuple[int, int], dtype: torch.dtype, projection_dim: int
) -> torch.Tensor:
    """SDXL's size conditioning for an uncropped image of ``size`` (height, width): one row of the original size, the
    crop's top-left corner (0, 0) and the target size, the ids diffusers' SDXL pipeline gives its UNet.

    The UNet embeds each id in ``addition_time_embed_dim`` values and appends the pooled text embedding
    (``projection_dim`` values); its added embedding takes exactly that many, or the model's parts do not fit
    together: refused as diffusers refuses it.
    """
    time_ids = [*size, 0, 0, *size]
    passed_dim = unet.config["addition_time_embed_dim"] * len(time_ids) + projection_dim
    expected_dim = cast(torch.nn.Linear, unet.add_embedding.linear_1).in_features
    if passed_dim != expected_dim:
        raise ValueError(
            f"Model expects an added time embedding vector of length {expected_dim}, but a vector of {passed_dim} "
            "was created. The model has an incorrect config. Please check `unet.config.time_embedding_type` and "
            "`text_encoder_2.config.projection_dim`."
        )
    return torch.tensor([time_ids], dtype=dtype)


def _present(tensor: torch.Tensor | None) -> torch.Tensor:
    if tensor is None:
        raise ValueError("the pipeline gave no embedding where guidance needs one")
    return tensor
