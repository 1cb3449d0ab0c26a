"""The engine on the built-in tiny video and audio models, and their encoding: no database, no network, seconds."""

from __future__ import annotations

import io
import json
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from inference.engine import (
    Cancelled,
    EncodedVideo,
    GenerationRequest,
    MediaEngine,
    ModelSourceError,
    PipelineCache,
    PipelineKind,
    RunOptions,
    batch_key,
    encode_audio,
    encode_video,
    frames_to_generate,
    load_pipeline,
    save_builtin_model,
    video_poster,
)
from inference.engine.media import fit_start_image, to_uint8_frames

VIDEO = "builtin:tiny-ltx-video"
AUDIO = "builtin:tiny-stable-audio"


def video_request(**overrides: object) -> GenerationRequest:
    fields: dict[str, object] = {
        "prompts": ["a lighthouse at dusk"],
        "seeds": [7],
        "width": 64,
        "height": 96,
        "num_inference_steps": 3,
        "guidance_scale": 3.0,
        "num_frames": 10,
        "frame_rate": 8,
    }
    fields.update(overrides)
    return GenerationRequest(**fields)  # type: ignore[arg-type]


def audio_request(**overrides: object) -> GenerationRequest:
    fields: dict[str, object] = {
        "prompts": ["rain on a tin roof"],
        "seeds": [5],
        "num_inference_steps": 4,
        "guidance_scale": 7.0,
        "audio_seconds": 1.5,
    }
    fields.update(overrides)
    return GenerationRequest(**fields)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def cache() -> PipelineCache:
    return PipelineCache(budget_bytes=1 << 30)


@pytest.fixture(scope="module")
def video(cache: PipelineCache) -> MediaEngine:
    engine = cache.get(VIDEO, PipelineKind.TEXT_TO_VIDEO).engine
    assert isinstance(engine, MediaEngine)
    return engine


@pytest.fixture(scope="module")
def audio(cache: PipelineCache) -> MediaEngine:
    engine = cache.get(AUDIO, PipelineKind.TEXT_TO_AUDIO).engine
    assert isinstance(engine, MediaEngine)
    return engine


def stock_video(engine: MediaEngine, request: GenerationRequest, **extra: object) -> np.ndarray:
    """What stock diffusers makes for the request: the pipeline called as its documentation calls it."""
    pipeline = engine.pipeline(request.kind)
    frames = pipeline(
        prompt=request.prompts[0],
        width=request.width,
        height=request.height,
        num_frames=frames_to_generate(request.num_frames, engine.temporal_compression),
        frame_rate=request.frame_rate,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale,
        generator=torch.Generator().manual_seed(request.seeds[0]),
        output_type="np",
        **extra,
    ).frames[0]
    return to_uint8_frames(frames[: request.num_frames])


def largest_difference(one: np.ndarray, other: np.ndarray) -> int:
    return int(np.abs(one.astype(np.int16) - other.astype(np.int16)).max())


def test_a_video_has_the_frames_size_and_rate_asked_and_is_stocks(video: MediaEngine) -> None:
    request = video_request()  # 10 frames: LTX makes 4k + 1 of them, the engine delivers 10
    steps: list[tuple[int, int]] = []
    result = video.run(request, on_step=lambda step, total: steps.append((step, total)))
    [frames] = result.videos
    assert frames.shape == (10, 96, 64, 3)
    assert frames.dtype == np.uint8
    assert result.frame_rate == 8
    assert result.images == []
    assert result.run_ms > 0
    assert steps == [(1, 3), (2, 3), (3, 3)]
    # Lossless: stock diffusers' frames for the same seed, up to float rounding.
    assert largest_difference(frames, stock_video(video, request)) <= 1
    assert frames_to_generate(10, video.temporal_compression) == 13


def test_prompt_cache_and_batches_change_no_frame(video: MediaEngine) -> None:
    alone = video.run(video_request()).videos[0]
    hits = video.prompt_cache_hits
    cached = [video.run(video_request(), options=RunOptions(prompt_cache=8)).videos[0] for _ in range(2)]
    assert video.prompt_cache_hits == hits + 1
    other = video_request(prompts=["rain over a harbour"], seeds=[8], negative_prompt="blurry")
    assert batch_key(video_request()) == batch_key(other)
    together = video.run_batch([video_request(), other], options=RunOptions(prompt_cache=8))
    assert all(not isinstance(outcome, Cancelled) for outcome in together)
    first, second = (outcome.videos[0] for outcome in together if not isinstance(outcome, Cancelled))
    for frames in (*cached, first):
        assert largest_difference(frames, alone) <= 1
    assert largest_difference(second, video.run(other).videos[0]) <= 1
    assert largest_difference(first, second) > 10


def test_a_request_that_stops_leaves_its_batch_and_the_others_go_on(video: MediaEngine) -> None:
    left: list[tuple[int, int, bool]] = []
    steps: list[int] = []
    outcomes = video.run_batch(
        [video_request(), video_request(seeds=[9])],
        on_step=lambda step, total: steps.append(step),
        should_cancel=lambda member: member == 1 and len(steps) >= 1,
        on_cancelled=lambda member, cancelled: left.append((member, cancelled.steps_done, cancelled.rows_stay)),
    )
    # Its row runs on in diffusers' call, unused: its time is no one's work (inference.engine.batch_shares).
    assert left == [(1, 1, True)]
    assert isinstance(outcomes[1], Cancelled)
    assert not isinstance(outcomes[0], Cancelled)
    assert outcomes[0].videos[0].shape[0] == 10
    # When no request is left the call stops there: no further step runs.
    steps.clear()
    with pytest.raises(Cancelled) as stopped:
        video.run(video_request(num_inference_steps=5), on_step=lambda step, total: steps.append(step),
                  should_cancel=lambda: len(steps) >= 2)  # fmt: skip
    assert stopped.value.steps_done == 2
    assert not stopped.value.rows_stay  # nothing goes on without it
    assert steps == [1, 2]


def test_the_last_step_is_always_delivered(video: MediaEngine) -> None:
    """Asked before each further step only: a stop that comes after the last step changes nothing."""
    steps: list[int] = []
    result = video.run(video_request(), on_step=lambda step, total: steps.append(step),
                       should_cancel=lambda: len(steps) >= 3)  # fmt: skip
    assert steps == [1, 2, 3]
    assert result.videos[0].shape[0] == 10


def start_image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (80, 120, 3), dtype=np.uint8))


def test_image_to_video_starts_from_the_image(cache: PipelineCache) -> None:
    engine = cache.get(VIDEO, PipelineKind.IMAGE_TO_VIDEO).engine
    image = start_image(1)
    one = engine.run(video_request(init_image=image, width=64, height=64)).videos[0]
    # Another prompt or seed, same image: the first frame is the model's rendering of the image alone.
    other_prompt = engine.run(video_request(init_image=image, width=64, height=64, prompts=["a dog"])).videos[0]
    other_seed = engine.run(video_request(init_image=image, width=64, height=64, seeds=[99])).videos[0]
    other_image = engine.run(video_request(init_image=start_image(2), width=64, height=64)).videos[0]
    assert np.array_equal(one[0], other_prompt[0])
    assert np.array_equal(one[0], other_seed[0])
    assert largest_difference(one[1:], other_seed[1:]) > 10
    assert largest_difference(one[1:], other_prompt[1:]) > 0
    assert largest_difference(one[0], other_image[0]) > 20
    request = video_request(init_image=image, width=64, height=64)
    stock = stock_video(engine, request, image=fit_start_image(image, 64, 64))  # type: ignore[arg-type]
    assert largest_difference(one, stock) <= 1
    assert batch_key(request) is None  # each runs alone


def test_the_start_image_is_cropped_to_the_video_never_stretched() -> None:
    wide = Image.new("RGB", (200, 100), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 50, 100))  # a blue band at the left edge, outside a centred square
    fitted = fit_start_image(wide, 64, 64)
    assert fitted.size == (64, 64)
    assert np.asarray(fitted)[:, :, 2].max() < 40  # the band was cropped away


def test_an_audio_clip_is_as_long_as_asked_and_is_stocks(audio: MediaEngine) -> None:
    request = audio_request()
    result = audio.run(request)
    [clip] = result.audios
    assert result.sample_rate == 16_000
    assert clip.shape == (2, 24_000)
    assert clip.dtype == np.float32
    stock = audio.pipeline(PipelineKind.TEXT_TO_AUDIO)(
        prompt=request.prompts[0],
        audio_end_in_s=request.audio_seconds,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale,
        generator=torch.Generator().manual_seed(request.seeds[0]),
        output_type="np",
    ).audios[0]
    assert float(np.abs(stock - clip).max()) < 1e-5
    assert audio.max_audio_seconds == 8.0


def test_audio_batches_and_negative_prompts(audio: MediaEngine) -> None:
    plain = audio_request()
    negative = audio_request(negative_prompt="static")
    assert batch_key(plain) != batch_key(negative)  # zeros or an encoding: not one call
    with pytest.raises(ValueError, match="cannot share"):
        audio.run_batch([plain, negative])
    alone = [audio.run(request, options=RunOptions(prompt_cache=4)).audios[0] for request in (plain, negative)]
    pair = audio.run_batch([negative, audio_request(negative_prompt="hiss", seeds=[6])], options=RunOptions())
    assert not isinstance(pair[0], Cancelled)
    assert float(np.abs(pair[0].audios[0] - alone[1]).max()) < 1e-4
    assert float(np.abs(alone[0] - alone[1]).max()) > 1e-3


def test_a_model_serves_its_own_kinds_only(cache: PipelineCache) -> None:
    with pytest.raises(ModelSourceError, match="video model serves"):
        cache.get(VIDEO, PipelineKind.TEXT_TO_AUDIO)
    with pytest.raises(ModelSourceError, match="audio model serves"):
        load_pipeline(AUDIO, PipelineKind.IMAGE_TO_VIDEO)


@pytest.mark.parametrize("name", ["tiny-ltx-video", "tiny-stable-audio"])
def test_a_saved_model_loads_from_its_folder_with_the_same_outputs(tmp_path: Path, name: str) -> None:
    folder = save_builtin_model(name, tmp_path / name)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] in {
        "LTXPipeline",
        "StableAudioPipeline",
    }
    fresh = PipelineCache(budget_bytes=1 << 30)
    kind = PipelineKind.TEXT_TO_VIDEO if "video" in name else PipelineKind.TEXT_TO_AUDIO
    request = video_request() if "video" in name else audio_request()
    from_folder = fresh.get(str(folder), kind).engine.run(request)
    built_in = fresh.get(f"builtin:{name}", kind).engine.run(request)
    if request.num_frames:
        assert largest_difference(from_folder.videos[0], built_in.videos[0]) <= 1
    else:
        assert float(np.abs(from_folder.audios[0] - built_in.audios[0]).max()) < 1e-5


def decode_video(data: bytes) -> tuple[list[np.ndarray], av.VideoStream, float]:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        duration = float(container.duration or 0) / av.time_base
        return frames, stream, duration


def test_videos_are_h264_mp4s_a_browser_plays() -> None:
    rng = np.random.default_rng(3)
    # Smooth frames (a moving gradient), as a real video's are: the codec keeps them close.
    ramp = np.linspace(0, 200, 64, dtype=np.float32)
    frames = np.stack([np.stack([np.add.outer(ramp, ramp + 4 * t) / 2] * 3, axis=-1) for t in range(12)])
    frames = np.clip(frames + rng.normal(0, 1, frames.shape), 0, 255).astype(np.uint8)
    encoded = encode_video(frames, 8)
    assert isinstance(encoded, EncodedVideo)
    assert (encoded.content_type, encoded.width, encoded.height, encoded.fps, encoded.num_frames) == (
        "video/mp4", 64, 64, 8, 12
    )  # fmt: skip
    # The moov atom comes before the media data: playback starts before the last byte arrives.
    assert encoded.data[4:8] == b"ftyp"
    assert encoded.data.index(b"moov") < encoded.data.index(b"mdat")
    decoded, stream, duration = decode_video(encoded.data)
    assert len(decoded) == 12
    assert decoded[0].shape == (64, 64, 3)
    assert stream.codec_context.name == "h264"
    assert stream.codec_context.pix_fmt == "yuv420p"
    assert duration == pytest.approx(1.5)
    assert np.abs(np.stack(decoded).astype(np.int16) - frames).mean() < 3
    poster = video_poster(frames)
    assert poster.content_type == "image/jpeg"
    assert Image.open(io.BytesIO(poster.data)).size == (64, 64)
    with pytest.raises(ValueError, match="even"):
        encode_video(frames[:, :63], 8)


@pytest.mark.parametrize(("output_format", "content_type"), [("wav", "audio/wav"), ("mp3", "audio/mpeg")])
def test_audio_is_wav_or_mp3(output_format: str, content_type: str) -> None:
    seconds = np.arange(16_000 * 2) / 16_000
    clip = np.stack([np.sin(2 * np.pi * 440 * seconds), 1.5 * np.sin(2 * np.pi * 220 * seconds)]).astype(np.float32)
    encoded = encode_audio(clip, 16_000, output_format)
    assert (encoded.content_type, encoded.sample_rate, encoded.channels, encoded.num_samples) == (
        content_type, 16_000, 2, 32_000
    )  # fmt: skip
    data, rate = soundfile.read(io.BytesIO(encoded.data), dtype="float32")
    assert rate == 16_000
    assert data.shape[1] == 2
    if output_format == "wav":
        assert data.shape[0] == 32_000
        assert np.abs(data[:, 0] - clip[0]).max() < 1e-3
        assert np.abs(data[:, 1]).max() <= 1.0  # clipped, never wrapped around
        assert np.abs(data[:, 1] - np.clip(clip[1], -1, 1)).max() < 1e-3
    else:
        assert abs(data.shape[0] - 32_000) < 16_000 * 0.2  # MP3's frames round the length up a little


def test_the_small_head_attention_kernel_runs_ltx_attention_losslessly(video: MediaEngine) -> None:
    from inference.engine import LoadOptions, ModuleOptimizations
    from inference.engine.attention import LTXSmallHeadAttnProcessor, kernel_available

    if not kernel_available():
        pytest.skip("no C compiler here: the engine keeps SDPA (and says so in its log)")
    options = LoadOptions(optimizations=ModuleOptimizations(small_head_attention=True))
    engine = PipelineCache(budget_bytes=1 << 30).get(VIDEO, PipelineKind.TEXT_TO_VIDEO, options=options).engine
    processors = [module.processor for module in engine.base.transformer.modules() if hasattr(module, "processor")]
    assert processors
    assert all(isinstance(processor, LTXSmallHeadAttnProcessor) for processor in processors)
    request = video_request(negative_prompt="blurry")  # cross-attention with a padding mask, self-attention with rope
    assert largest_difference(engine.run(request).videos[0], video.run(request).videos[0]) <= 1
