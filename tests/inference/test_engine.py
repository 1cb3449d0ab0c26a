"""The diffusion engine on the built-in tiny model: no database, no network, a few seconds on a CPU."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inference.engine import (
    PRESETS,
    Cancelled,
    GenerationRequest,
    LoadedPipeline,
    LoadOptions,
    ModelSourceError,
    Pipeline,
    PipelineCache,
    PipelineKind,
    build_tiny_pipeline,
    encode_image,
    load_pipeline,
    pipeline_nbytes,
    run_pipeline,
    save_builtin_model,
)

TINY = "builtin:tiny-sd"
REPOSITORY = Path(__file__).resolve().parents[2]


def weights_digest(pipeline: Pipeline) -> str:
    digest = hashlib.sha256()
    for name in ("text_encoder", "unet", "vae"):
        for key, tensor in sorted(getattr(pipeline, name).state_dict().items()):
            digest.update(f"{name}.{key}".encode())
            digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def request(**overrides: object) -> GenerationRequest:
    fields: dict[str, object] = {
        "prompts": ["a lighthouse at dusk"],
        "seeds": [7],
        "width": 64,
        "height": 64,
        "num_inference_steps": 3,
    }
    fields.update(overrides)
    return GenerationRequest(**fields)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def txt2img() -> Pipeline:
    return load_pipeline(TINY, PipelineKind.TEXT_TO_IMAGE)


@pytest.fixture(scope="module")
def img2img() -> Pipeline:
    return load_pipeline(TINY, PipelineKind.IMAGE_TO_IMAGE)


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_builtin_model("tiny-sd", tmp_path_factory.mktemp("models") / "tiny-sd")


def test_builtin_build_is_deterministic_and_leaves_callers_rng_alone(txt2img: Pipeline) -> None:
    rng_before = torch.get_rng_state()
    rebuilt = build_tiny_pipeline("tiny")
    assert torch.equal(torch.get_rng_state(), rng_before)

    assert weights_digest(rebuilt) == weights_digest(txt2img)
    first = run_pipeline(txt2img, request()).images[0]
    second = run_pipeline(rebuilt, request()).images[0]
    assert np.array_equal(pixels(first), pixels(second))


def test_the_small_preset_is_the_benchmark_size() -> None:
    small = load_pipeline("builtin:small-sd")
    assert tuple(small.unet.config.block_out_channels) == PRESETS["small"].unet_channels == (64, 128)
    assert small.unet.config.sample_size * small.vae_scale_factor == 128
    assert pipeline_nbytes(small) > pipeline_nbytes(build_tiny_pipeline("tiny"))


def test_another_process_builds_the_same_weights(txt2img: Pipeline) -> None:
    script = (
        "from inference.engine import load_pipeline\n"
        "from tests.inference.test_engine import weights_digest\n"
        "print(weights_digest(load_pipeline('builtin:tiny-sd')))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=REPOSITORY, capture_output=True, text=True, check=True, timeout=120
    )
    assert completed.stdout.strip().splitlines()[-1] == weights_digest(txt2img)


def test_different_seeds_give_different_images(txt2img: Pipeline) -> None:
    one, other = run_pipeline(txt2img, request(prompts=["a cat"] * 2, seeds=[1, 2])).images
    assert np.abs(pixels(one) - pixels(other)).mean() > 1


@pytest.mark.parametrize(("width", "height"), [(64, 64), (96, 64)])
def test_image_size_is_honoured(txt2img: Pipeline, width: int, height: int) -> None:
    result = run_pipeline(txt2img, request(width=width, height=height, num_inference_steps=2))
    assert [image.size for image in result.images] == [(width, height)]
    assert result.images[0].mode == "RGB"
    assert result.run_ms > 0


def test_progress_reports_every_step_of_n(txt2img: Pipeline) -> None:
    seen: list[tuple[int, int]] = []
    result = run_pipeline(
        txt2img, request(num_inference_steps=4), on_step=lambda step, total: seen.append((step, total))
    )
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert result.steps == 4


def test_image_to_image_runs_strength_times_steps_at_the_requested_size(txt2img: Pipeline, img2img: Pipeline) -> None:
    init_image = Image.new("RGB", (80, 48), (200, 30, 30))
    seen: list[tuple[int, int]] = []
    image_request = request(width=96, height=64, num_inference_steps=4, strength=0.5, init_image=init_image)
    result = run_pipeline(img2img, image_request, on_step=lambda step, total: seen.append((step, total)))

    assert [image.size for image in result.images] == [(96, 64)]
    assert seen == [(1, 2), (2, 2)]
    assert result.steps == image_request.total_steps == 2
    with pytest.raises(ValueError, match="image-to-image request cannot run on a text-to-image pipeline"):
        run_pipeline(txt2img, image_request)


def test_cancel_stops_at_the_step_it_was_asked() -> None:
    pipeline = load_pipeline(TINY)
    seen: list[int] = []

    with pytest.raises(Cancelled) as cancelled:
        run_pipeline(
            pipeline,
            request(num_inference_steps=4),
            on_step=lambda step, total: seen.append(step),
            should_cancel=lambda: len(seen) >= 2,
        )

    assert cancelled.value.steps_done == 2
    assert cancelled.value.total_steps == 4
    assert seen == [1, 2]
    # The pipeline is not left broken: the next request runs in full.
    assert len(run_pipeline(pipeline, request(num_inference_steps=2)).images) == 1


def test_a_stop_asked_after_the_last_step_is_not_heard_the_images_are_delivered(
    txt2img: Pipeline, img2img: Pipeline
) -> None:
    # Past the last step the work is done (and paid for): it is decoded, whatever a cancel or a credit check says.
    seen: list[int] = []
    result = run_pipeline(
        txt2img,
        request(num_inference_steps=3),
        on_step=lambda step, total: seen.append(step),
        should_cancel=lambda: len(seen) == 3,
    )
    assert len(result.images) == 1
    assert seen == [1, 2, 3]
    image_request = request(num_inference_steps=4, strength=0.5, init_image=Image.new("RGB", (64, 64)))
    steps: list[int] = []
    result = run_pipeline(
        img2img, image_request, on_step=lambda step, total: steps.append(step), should_cancel=lambda: steps == [1, 2]
    )
    assert len(result.images) == 1
    assert steps == [1, 2]


def test_cancel_before_the_first_step(txt2img: Pipeline) -> None:
    with pytest.raises(Cancelled) as cancelled:
        run_pipeline(txt2img, request(), should_cancel=lambda: True)
    assert cancelled.value.steps_done == 0


def test_a_batch_gives_the_images_each_seed_gives_alone(txt2img: Pipeline) -> None:
    prompts, seeds = ["a red fox", "a blue whale"], [11, 12]
    batch = run_pipeline(txt2img, request(prompts=prompts, seeds=seeds)).images
    singles = [
        run_pipeline(txt2img, request(prompts=[prompt], seeds=[seed])).images[0]
        for prompt, seed in zip(prompts, seeds, strict=True)
    ]
    for batched, single in zip(batch, singles, strict=True):
        assert np.abs(pixels(batched) - pixels(single)).max() <= 2


def test_a_model_saved_to_disk_loads_back_and_draws_the_same_image(txt2img: Pipeline, saved_tiny: Path) -> None:
    assert (saved_tiny / "model_index.json").is_file()
    loaded = load_pipeline(str(saved_tiny), PipelineKind.TEXT_TO_IMAGE)

    assert weights_digest(loaded) == weights_digest(txt2img)
    from_disk = run_pipeline(loaded, request()).images[0]
    builtin = run_pipeline(txt2img, request()).images[0]
    assert np.array_equal(pixels(from_disk), pixels(builtin))

    loaded_img2img = load_pipeline(str(saved_tiny), PipelineKind.IMAGE_TO_IMAGE)
    image_request = request(init_image=builtin, strength=0.75, num_inference_steps=4)
    assert run_pipeline(loaded_img2img, image_request).images[0].size == (64, 64)


def test_sources_that_name_no_model_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="unknown built-in"):
        load_pipeline("builtin:huge-sd")
    with pytest.raises(ModelSourceError, match="not a diffusers folder"):
        load_pipeline(str(tmp_path))
    (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    with pytest.raises(ModelSourceError, match="FluxPipeline"):
        load_pipeline(str(tmp_path))


def test_requests_are_checked() -> None:
    with pytest.raises(ValueError, match="one seed per image"):
        request(prompts=["a", "b"], seeds=[1])
    with pytest.raises(ValueError, match="multiple of 8"):
        request(width=100)
    with pytest.raises(ValueError, match="at least one step"):
        request(init_image=Image.new("RGB", (64, 64)), num_inference_steps=2, strength=0.2)


def test_cache_hit_returns_the_same_pipeline_without_load_time() -> None:
    cache = PipelineCache(budget_bytes=1 << 30)
    cold = cache.get(TINY, PipelineKind.TEXT_TO_IMAGE)
    warm = cache.get(TINY, PipelineKind.TEXT_TO_IMAGE)

    assert not cold.cache_hit
    assert cold.load_ms > 0
    assert warm.cache_hit
    assert warm.load_ms == 0
    assert warm.pipeline is cold.pipeline
    assert cache.used_bytes == cold.nbytes == pipeline_nbytes(cold.pipeline) > 0


def test_image_to_image_shares_the_text_to_image_weights() -> None:
    cache = PipelineCache(budget_bytes=1 << 30)
    text = cache.get(TINY, PipelineKind.TEXT_TO_IMAGE)
    image = cache.get(TINY, PipelineKind.IMAGE_TO_IMAGE)

    assert image.pipeline is not text.pipeline
    assert image.pipeline.unet is text.pipeline.unet
    unet_weight = next(text.pipeline.unet.parameters())
    assert next(image.pipeline.unet.parameters()).data_ptr() == unet_weight.data_ptr()
    assert cache.used_bytes == text.nbytes
    assert cache.cached_models() == [(TINY, LoadOptions())]
    assert cache.get(TINY, PipelineKind.IMAGE_TO_IMAGE).pipeline is image.pipeline


def test_threads_asking_for_a_cold_model_share_one_load() -> None:
    cache = PipelineCache(budget_bytes=1 << 30)
    start = threading.Barrier(4)
    loaded: list[LoadedPipeline] = []

    def ask() -> None:
        start.wait()
        loaded.append(cache.get(TINY))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len({id(result.pipeline) for result in loaded}) == 1
    assert sorted(result.cache_hit for result in loaded) == [False, True, True, True]


def test_cache_evicts_least_recently_used_past_its_budget(saved_tiny: Path, tmp_path: Path) -> None:
    other_copy = str(shutil.copytree(saved_tiny, tmp_path / "tiny-copy"))
    model_bytes = pipeline_nbytes(load_pipeline(str(saved_tiny)))
    cache = PipelineCache(budget_bytes=2 * model_bytes + model_bytes // 2)

    cache.get(TINY)
    cache.get(str(saved_tiny))
    cache.get(TINY, PipelineKind.IMAGE_TO_IMAGE)  # uses the built-in again: the folder is now least recent
    assert cache.get(other_copy).cache_hit is False

    assert [source for source, _ in cache.cached_models()] == [TINY, other_copy]
    assert cache.used_bytes == 2 * model_bytes
    assert cache.get(str(saved_tiny)).cache_hit is False  # was evicted, so loads again


def test_cache_keeps_the_model_just_loaded_even_over_budget() -> None:
    cache = PipelineCache(budget_bytes=1)
    cache.get(TINY)
    assert [source for source, _ in cache.cached_models()] == [TINY]
    assert cache.used_bytes > cache.budget_bytes
    cache.get(TINY, options=LoadOptions(dtype="bfloat16"))
    assert cache.cached_models() == [(TINY, LoadOptions(dtype="bfloat16"))]


@pytest.mark.parametrize(
    ("output_format", "content_type", "pillow_format"),
    [
        ("png", "image/png", "PNG"),
        ("jpeg", "image/jpeg", "JPEG"),
        ("jpg", "image/jpeg", "JPEG"),
        ("webp", "image/webp", "WEBP"),
    ],
)
def test_encoded_images_decode_back(output_format: str, content_type: str, pillow_format: str) -> None:
    gradient = np.linspace(0, 255, 96 * 64 * 3).reshape(64, 96, 3).astype(np.uint8)
    image = Image.fromarray(gradient, "RGB")

    encoded = encode_image(image, output_format)

    assert (encoded.content_type, encoded.width, encoded.height) == (content_type, 96, 64)
    decoded = Image.open(io.BytesIO(encoded.data))
    assert (decoded.format, decoded.size) == (pillow_format, (96, 64))
    difference = np.abs(pixels(decoded.convert("RGB")) - pixels(image))
    assert difference.max() == 0 if output_format == "png" else difference.mean() < 8


def test_unknown_output_format_is_refused() -> None:
    with pytest.raises(ValueError, match="output_format"):
        encode_image(Image.new("RGB", (8, 8)), "gif")
