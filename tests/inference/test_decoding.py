"""The engine decodes the latents diffusers' pipelines stop at (inference/engine/decoding.py), so that a decode cut
short by a time limit can start over: every output is bit for bit what the pipeline's own decode gives for the same
call.

The built-in tiny models on the CPU, the same seeds and modules for both: no database, seconds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl_ltx import AutoencoderKLLTXVideo
from diffusers.pipelines.ltx.pipeline_ltx import LTXPipeline
from diffusers.pipelines.ltx.pipeline_ltx_image2video import LTXImageToVideoPipeline
from PIL import Image

from inference.engine import (
    Cancelled,
    GenerationRequest,
    GenerationResult,
    PipelineCache,
    PipelineKind,
    build_tiny_video_pipeline,
    frames_to_generate,
    run_pipeline,
)
from inference.engine.decoding import decode_video
from inference.engine.media import fit_start_image, to_uint8_frames
from tests.inference.test_engine_media import AUDIO, VIDEO, audio_request, start_image, video_request

# torchsde's warnings on Stable Audio's stock call (the engine keeps them out of its log: inference.engine.media).
pytestmark = pytest.mark.filterwarnings("ignore:Should have")


@pytest.fixture(scope="module")
def cache() -> PipelineCache:
    return PipelineCache(budget_bytes=1 << 30)


def generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def results(outcomes: list[GenerationResult | Cancelled]) -> list[GenerationResult]:
    assert all(isinstance(outcome, GenerationResult) for outcome in outcomes)
    return [outcome for outcome in outcomes if isinstance(outcome, GenerationResult)]


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def test_a_text_to_video_batch_is_the_pipelines_own_decode(cache: PipelineCache) -> None:
    engine = cache.get(VIDEO, PipelineKind.TEXT_TO_VIDEO).engine
    requests = [video_request(), video_request(prompts=["rain over a harbour"], seeds=[8])]
    videos = [result.videos[0] for result in results(engine.run_batch(requests))]
    first = requests[0]
    with torch.inference_mode():
        stock = engine.pipeline(first.kind)(
            prompt=[request.prompts[0] for request in requests],
            negative_prompt=None,
            width=first.width,
            height=first.height,
            num_frames=frames_to_generate(first.num_frames, engine.temporal_compression),
            frame_rate=first.frame_rate,
            num_inference_steps=first.num_inference_steps,
            guidance_scale=first.guidance_scale,
            generator=generators(7, 8),
            output_type="np",
        ).frames
    for frames, stock_frames in zip(videos, stock, strict=True):
        assert np.array_equal(frames, to_uint8_frames(stock_frames[: first.num_frames]))


def test_an_image_to_video_clip_is_the_pipelines_own_decode(cache: PipelineCache) -> None:
    engine = cache.get(VIDEO, PipelineKind.IMAGE_TO_VIDEO).engine
    request = video_request(init_image=start_image(1), width=64, height=64)
    [result] = results(engine.run_batch([request]))
    with torch.inference_mode():
        stock = engine.pipeline(request.kind)(
            image=[fit_start_image(start_image(1), 64, 64)],
            prompt=request.prompts,
            negative_prompt=None,
            width=64,
            height=64,
            num_frames=frames_to_generate(request.num_frames, engine.temporal_compression),
            frame_rate=request.frame_rate,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            generator=generators(*request.seeds),
            output_type="np",
        ).frames[0]
    assert np.array_equal(result.videos[0], to_uint8_frames(stock[: request.num_frames]))


@pytest.fixture(scope="module")
def timestep_conditioned() -> dict[str, Any]:
    """The tiny video model's parts with a VAE conditioned on the timestep, as LTX-Video's from 0.9.1 on: its decode
    takes a timestep and noise from the call's generators."""
    components = dict(build_tiny_video_pipeline().components)
    # Its own arguments, not `from_config`: that takes the arguments the tiny VAE left at their defaults as defaults.
    arguments = {name: value for name, value in components["vae"].config.items() if not name.startswith("_")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKLLTXVideo(**{**arguments, "timestep_conditioning": True})
    assert vae.decoder.time_embedder is not None
    vae.use_framewise_decoding = False
    components["vae"] = vae.train(False)
    return components


@pytest.mark.parametrize("kind", [PipelineKind.TEXT_TO_VIDEO, PipelineKind.IMAGE_TO_VIDEO])
def test_a_vae_conditioned_on_the_timestep_decodes_as_its_pipeline_and_again_the_same(
    timestep_conditioned: dict[str, Any], kind: PipelineKind
) -> None:
    call: dict[str, Any] = {
        "width": 64,
        "height": 64,
        "num_frames": 9,
        "num_inference_steps": 2,
        "guidance_scale": 3.0,
    }
    if kind is PipelineKind.TEXT_TO_VIDEO:
        pipeline: Any = LTXPipeline(**timestep_conditioned)
        call["prompt"], seeds = ["a lighthouse", "a harbour"], (1, 2)
    else:
        # Image to video draws the decode's noise with torch.randn, which takes one generator, not a list of them.
        pipeline = LTXImageToVideoPipeline(**timestep_conditioned)
        call.update(prompt=["a lighthouse"], image=[fit_start_image(start_image(1), 64, 64)])
        seeds = (1,)
    pipeline.set_progress_bar_config(disable=True)
    stock_generators = generators(*seeds)
    with torch.inference_mode():
        stock = pipeline(
            **call,
            generator=stock_generators if len(seeds) > 1 else stock_generators[0],
            output_type="np",
        ).frames
        own_generators = generators(*seeds)
        latents = pipeline(**call, generator=own_generators, output_type="latent").frames
        left_at = [generator.get_state().tolist() for generator in own_generators]
        decode = {"num_frames": 9, "height": 64, "width": 64, "generators": own_generators}
        decoded = decode_video(pipeline, latents, **decode)
        # The noise comes from copies of the generators: a decode started over draws the same.
        assert [generator.get_state().tolist() for generator in own_generators] == left_at
        again = decode_video(pipeline, latents, **decode)
    assert np.array_equal(decoded, stock)
    assert np.array_equal(again, stock)


def test_an_audio_batch_is_the_pipelines_own_decode(cache: PipelineCache) -> None:
    engine = cache.get(AUDIO, PipelineKind.TEXT_TO_AUDIO).engine
    requests = [audio_request(), audio_request(prompts=["wind in pines"], seeds=[6])]
    clips = [result.audios[0] for result in results(engine.run_batch(requests))]
    first = requests[0]
    with torch.inference_mode():
        stock = engine.pipeline(first.kind)(
            prompt=[request.prompts[0] for request in requests],
            negative_prompt=None,
            audio_end_in_s=first.audio_seconds,
            num_inference_steps=first.num_inference_steps,
            guidance_scale=first.guidance_scale,
            generator=generators(5, 6),
            output_type="np",
        ).audios
    assert [clip.shape for clip in clips] == [(2, 24_000)] * 2
    for clip, stock_clip in zip(clips, stock, strict=True):
        assert np.array_equal(clip, stock_clip)


def test_image_to_image_and_the_stock_text_to_image_call_are_the_pipelines_own_decode(cache: PipelineCache) -> None:
    engine = cache.get("builtin:tiny-sd", PipelineKind.IMAGE_TO_IMAGE).engine
    init_image = start_image(3).resize((64, 64))
    request = GenerationRequest(
        prompts=["a red fox"], seeds=[4], width=64, height=64, num_inference_steps=4, strength=0.5,
        init_image=init_image,
    )  # fmt: skip
    [result] = results(engine.run_batch([request]))
    text_request = GenerationRequest(prompts=["a red fox", "a blue whale"], seeds=[4, 5], width=64, height=64,
                                     num_inference_steps=3)  # fmt: skip
    text_images = run_pipeline(engine.pipeline(PipelineKind.TEXT_TO_IMAGE), text_request).images
    common = {"negative_prompt": None, "guidance_scale": 7.5, "output_type": "pil"}
    with torch.inference_mode():
        stock = engine.pipeline(PipelineKind.IMAGE_TO_IMAGE)(
            prompt=request.prompts,
            image=init_image,
            strength=0.5,
            num_inference_steps=4,
            generator=generators(4),
            **{**common, "negative_prompt": [""]},
        ).images
        text_stock = engine.pipeline(PipelineKind.TEXT_TO_IMAGE)(
            prompt=text_request.prompts,
            width=64,
            height=64,
            num_inference_steps=3,
            generator=generators(4, 5),
            **{**common, "negative_prompt": ["", ""]},
        ).images
    assert np.array_equal(pixels(result.images[0]), pixels(stock[0]))
    for image, stock_image in zip(text_images, text_stock, strict=True):
        assert np.array_equal(pixels(image), pixels(stock_image))
