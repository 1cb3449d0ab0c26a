"""Previews drawn from the latents while a run goes on (`inference.engine.previews`), on the tiny built-in model."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from inference.engine import (
    STOCK_PROFILE,
    Cancelled,
    Engine,
    GenerationRequest,
    LatentProjection,
    ModuleOptimizations,
    Preview,
    PreviewOptions,
    build_tiny_pipeline,
    latents_to_rgb,
)
from inference.engine.previews import PREVIEW_MAX_SIDE, SD_FACTORS, SDXL_BIAS, SDXL_FACTORS, preview_size
from tests.inference.test_engine import pixels
from tests.inference.test_engine import request as base_request


def request(**overrides: object) -> GenerationRequest:
    return base_request(**{"num_inference_steps": 6, **overrides})


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(build_tiny_pipeline("tiny"), optimizations=ModuleOptimizations.of(STOCK_PROFILE))


def collecting(every: int, members: set[int]) -> tuple[PreviewOptions, list[tuple[int, Preview]]]:
    seen: list[tuple[int, Preview]] = []
    options = PreviewOptions(
        every=every, members=frozenset(members), on_preview=lambda member, preview: seen.append((member, preview))
    )
    return options, seen


def as_byte(value: float) -> int:
    """ComfyUI's mapping of one projected value: [-1, 1] to [0, 255]."""
    return round(min(1.0, max(0.0, (value + 1) / 2)) * 255)


def test_stable_diffusion_latents_take_the_published_factors() -> None:
    projection = LatentProjection.for_latents(4)
    assert projection.factors == SD_FACTORS
    latents = torch.zeros(1, 4, 2, 3)
    latents[0, 0, 0, 0] = 1.0  # one pixel lit in channel 0 alone: its colour is that channel's row
    latents[0, 3, 1, 2] = -1.0  # another in channel 3, negated
    rgb = latents_to_rgb(latents, projection)
    assert rgb.shape == (1, 2, 3, 3)
    assert rgb.dtype == np.uint8
    assert tuple(rgb[0, 0, 0]) == tuple(as_byte(value) for value in SD_FACTORS[0])
    assert tuple(rgb[0, 1, 2]) == tuple(as_byte(-value) for value in SD_FACTORS[3])
    assert tuple(rgb[0, 0, 1]) == (as_byte(0.0),) * 3  # zero latents are mid grey


def test_sdxl_latents_take_its_factors_and_bias() -> None:
    projection = LatentProjection.for_latents(4, xl=True)
    assert (projection.factors, projection.bias) == (SDXL_FACTORS, SDXL_BIAS)
    rgb = latents_to_rgb(torch.zeros(1, 4, 1, 1), projection)
    assert tuple(rgb[0, 0, 0]) == tuple(as_byte(value) for value in SDXL_BIAS)


@pytest.mark.parametrize("channels", [1, 3, 16])
def test_other_latents_get_a_fixed_projection_that_still_draws_an_image(channels: int) -> None:
    projection = LatentProjection.for_latents(channels)
    weights = np.array(projection.factors)
    assert weights.shape == (channels, 3)
    # Every colour gets the same total weight: constant latents are grey.
    assert np.allclose(weights.sum(axis=0), 0.5)
    rgb = latents_to_rgb(torch.ones(2, channels, 5, 7), projection)
    assert rgb.shape == (2, 5, 7, 3)
    assert np.all(rgb == as_byte(0.5))


def test_latents_that_do_not_fit_the_projection_are_refused() -> None:
    with pytest.raises(ValueError, match="channels"):
        latents_to_rgb(torch.zeros(1, 16, 2, 2), LatentProjection.for_latents(4))


@pytest.mark.parametrize(
    ("latent_size", "expected"),
    [
        ((8, 8), (64, 64)),  # the tiny model's 64x64 output: shown at the output's size
        ((64, 64), (PREVIEW_MAX_SIDE, PREVIEW_MAX_SIDE)),  # 512x512: shrunk to fit
        ((64, 96), (170, PREVIEW_MAX_SIDE)),  # the aspect is kept
        ((400, 300), (400, 300)),  # never smaller than the latents themselves
    ],
)
def test_a_preview_is_the_output_shape_fitted_to_the_preview_size(
    latent_size: tuple[int, int], expected: tuple[int, int]
) -> None:
    assert preview_size(*latent_size, scale=8) == expected


def test_previews_come_every_n_steps_but_the_last_as_small_jpegs_of_the_output_size(engine: Engine) -> None:
    options, seen = collecting(every=2, members={0})
    result = engine.run(request(seeds=[7, 8], prompts=["a lighthouse"] * 2), previews=options)
    assert [(member, preview.step, preview.total) for member, preview in seen] == [(0, 2, 6), (0, 4, 6)]
    for _, preview in seen:
        shown = preview.as_json()
        assert (shown["step"], shown["total"]) == (preview.step, preview.total)
        assert len(shown["images"]) == 2  # one per image of the request
        for image in shown["images"]:
            header, data = image["url"].split(",", 1)
            assert header == "data:image/jpeg;base64"
            decoded = Image.open(io.BytesIO(base64.b64decode(data)))
            assert decoded.format == "JPEG"
            assert decoded.size == (image["width"], image["height"]) == result.images[0].size
            assert image["content_type"] == "image/jpeg"
    # Each preview shows its own step: the pictures move as the latents do.
    assert not np.array_equal(seen[0][1].pixels[0], seen[1][1].pixels[0])


def test_previews_leave_the_images_as_they_were(engine: Engine) -> None:
    options, seen = collecting(every=1, members={0})
    with_previews = engine.run(request(), previews=options)
    without = engine.run(request())
    assert len(seen) == 5
    assert np.array_equal(pixels(with_previews.images[0]), pixels(without.images[0]))


def test_only_the_requests_that_ask_get_previews_each_of_its_own_images(engine: Engine) -> None:
    options, seen = collecting(every=3, members={1})
    engine.run_batch([request(seeds=[1]), request(seeds=[2, 3], prompts=["b", "b"])], previews=options)
    assert [(member, preview.step, len(preview.pixels)) for member, preview in seen] == [(1, 3, 2)]
    alone, seen_alone = collecting(every=3, members={0})
    engine.run(request(seeds=[2, 3], prompts=["b", "b"]), previews=alone)
    # The same picture as that request alone draws: its own rows, not its neighbour's.
    for batched, single in zip(seen[0][1].pixels, seen_alone[0][1].pixels, strict=True):
        assert np.abs(batched.astype(int) - single.astype(int)).max() <= 1


def test_a_request_that_left_the_batch_gets_no_more_previews(engine: Engine) -> None:
    options, seen = collecting(every=1, members={0, 1})
    steps_done = {"count": 0}

    def on_step(step: int, total: int) -> None:
        steps_done["count"] = step

    outcomes = engine.run_batch(
        [request(seeds=[1]), request(seeds=[2])],
        on_step=on_step,
        should_cancel=lambda member: member == 1 and steps_done["count"] >= 2,
        previews=options,
    )
    assert isinstance(outcomes[1], Cancelled)
    assert [preview.step for member, preview in seen if member == 1] == [1, 2]
    assert [preview.step for member, preview in seen if member == 0] == [1, 2, 3, 4, 5]


def test_image_to_image_gets_previews_of_its_own_steps(engine: Engine) -> None:
    options, seen = collecting(every=2, members={0})
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    engine.run(request(num_inference_steps=8, init_image=init, strength=0.75), previews=options)
    # strength 0.75 of 8 steps: 6 steps run.
    assert [(preview.step, preview.total, preview.size) for _, preview in seen] == [(2, 6, (64, 64)), (4, 6, (64, 64))]


def test_no_previews_without_the_option_or_with_every_zero(engine: Engine) -> None:
    options, seen = collecting(every=0, members={0})
    engine.run(request(), previews=options)
    assert seen == []
