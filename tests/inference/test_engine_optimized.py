"""The optimized engine against stock diffusers on the tiny built-in model: profiles, images, batches, cancel, metering.

Speed is the benchmark's business (`make bench-engine`); these check that every optimization keeps its promise
about the images, and that GPU time split across a batch adds up.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from inference.engine import (
    STOCK_PROFILE,
    BatchIncompatible,
    BatchMeter,
    Cancelled,
    Engine,
    GenerationRequest,
    ModuleOptimizations,
    OptimizationProfile,
    ProfileError,
    RunOptions,
    build_tiny_pipeline,
    configure_compile_cache,
    largest_remainder,
    load_pipeline,
    resolve,
    run_pipeline,
    validate_profile,
)
from inference.engine.architectures import build_architecture
from inference.engine.engine import sdxl_time_ids
from inference.engine.optimize import CudaGraphUNet, _Captured
from tests.inference.test_engine import pixels
from tests.inference.test_engine import request as base_request

LOSSLESS = replace(
    STOCK_PROFILE, inference_mode=True, fuse_qkv=True, pad_text_tokens=True, small_head_attention=True, prompt_cache=8
)


def psnr(one: Image.Image, other: Image.Image) -> float:
    mse = float(np.mean((pixels(one).astype(np.float64) - pixels(other)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def request(**overrides: object) -> GenerationRequest:
    """test_engine's request (a 64x64 image of one prompt and seed), in four steps."""
    return base_request(**{"num_inference_steps": 4, **overrides})


def engine_for(profile: OptimizationProfile) -> Engine:
    pipeline = build_tiny_pipeline("tiny")
    if profile.precision != "float32":
        pipeline = pipeline.to(dtype=getattr(torch, profile.precision))
    return Engine(pipeline, optimizations=ModuleOptimizations.of(profile))


@pytest.fixture(scope="module")
def stock() -> Callable[[GenerationRequest], list[Image.Image]]:
    """Stock diffusers' own pipeline call (no engine), one request at a time, memoized."""
    pipeline = load_pipeline("builtin:tiny-sd")
    seen: dict[str, list[Image.Image]] = {}

    def generate(one: GenerationRequest) -> list[Image.Image]:
        key = repr(one)  # text to image only: every field has a plain repr
        if key not in seen:
            seen[key] = run_pipeline(pipeline, one, inference_mode=False).images
        return seen[key]

    return generate


@pytest.fixture(scope="module")
def lossless() -> Engine:
    return engine_for(LOSSLESS)


# --- Profiles -----------------------------------------------------------------------------------------------


def test_an_empty_profile_takes_the_device_defaults() -> None:
    cpu = resolve({}, device="cpu")
    cuda = resolve({}, device="cuda")
    assert (cpu.precision, cpu.compile, cpu.cuda_graphs, cpu.feature_cache_interval) == ("float32", "off", False, 0)
    assert (cuda.precision, cuda.compile, cuda.cuda_graphs, cuda.max_batch_size) == ("float16", "regional", True, 8)
    assert (cpu.lossy, cuda.lossy) == (False, False)
    assert (cpu.fuse_qkv, cpu.inference_mode, cpu.max_batch_size) == (True, True, 4)
    # Padding text tokens is for the CPU attention kernel.
    assert (
        cpu.pad_text_tokens,
        cuda.pad_text_tokens,
        resolve({"pad_text_tokens": True}, device="cuda").pad_text_tokens,
    ) == (
        True,
        False,
        False,
    )
    # So is the small-head attention kernel.
    assert (
        cpu.small_head_attention,
        cuda.small_head_attention,
        resolve({"small_head_attention": True}, device="cuda").small_head_attention,
    ) == (True, False, False)


def test_a_profile_overrides_defaults_and_the_device_drops_what_it_cannot_do() -> None:
    profile = resolve({"precision": "auto", "cuda_graphs": True, "feature_cache_interval": 3}, device="cpu")
    assert (profile.precision, profile.cuda_graphs, profile.feature_cache_interval) == ("float32", False, 3)
    assert profile.lossy
    assert resolve({"precision": "auto"}, device="cuda:0").precision == "float16"
    assert validate_profile(None) == {}


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ({"channel_last": True}, "unknown optimization 'channel_last'"),
        ({"fuse_qkv": 1}, "fuse_qkv must be true or false"),
        ({"max_batch_size": True}, "max_batch_size must be a whole number from 1 to 64"),
        ({"max_batch_size": 0}, "max_batch_size must be a whole number"),
        ({"batch_wait_ms": 500}, "batch_wait_ms must be a whole number from 0 to 50"),
        ({"precision": "float8"}, "precision must be one of auto, float32, float16, bfloat16"),
        ({"compile": True}, "compile must be one of off, regional, full"),
        ({"feature_cache_interval": 1}, "use 0 to switch it off"),
        (["sdpa"], "must be a JSON object"),
    ],
)
def test_bad_profiles_are_refused_with_every_problem_named(raw: object, problem: str) -> None:
    with pytest.raises(ProfileError, match=problem):
        validate_profile(raw)
    with pytest.raises(ProfileError):
        resolve(raw, device="cpu")


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(ProfileError) as refused:
        validate_profile({"sdpa": "yes", "turbo": True})
    assert len(refused.value.problems) == 2


def test_compiled_code_is_kept_in_the_platform_data_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

    # Inductor writes its default into the environment the first time it looks: that one is replaced.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    assert configure_compile_cache(tmp_path / "compile-cache") == tmp_path / "compile-cache"
    assert cache_dir() == str(tmp_path / "compile-cache")
    # An operator's own choice stays.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "chosen"))
    assert configure_compile_cache(tmp_path / "compile-cache") == tmp_path / "chosen"


# --- Images -------------------------------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_image(lossless: Engine) -> None:
    first = lossless.run(request(), options=RunOptions.of(LOSSLESS)).images[0]
    second = lossless.run(request(), options=RunOptions.of(LOSSLESS)).images[0]
    assert np.array_equal(pixels(first), pixels(second))
    assert not np.array_equal(pixels(first), pixels(lossless.run(request(seeds=[8])).images[0]))


def test_the_lossless_engine_draws_stock_diffusers_image(
    lossless: Engine, stock: Callable[[GenerationRequest], list[Image.Image]]
) -> None:
    one = request(negative_prompt="blurry", guidance_scale=6.0)
    exact = replace(LOSSLESS, pad_text_tokens=False, small_head_attention=False)
    unpadded = engine_for(exact).run(one, options=RunOptions.of(exact)).images[0]
    # Float32 on a CPU: the same operations in the same order give the same bits.
    assert np.array_equal(pixels(unpadded), pixels(stock(one)[0]))
    # Padded text tokens add exact zeros to the attention's sums, and the small-head kernel adds the same products
    # in another order: rounding only.
    engine_image = lossless.run(one, options=RunOptions.of(LOSSLESS)).images[0]
    assert np.abs(pixels(engine_image) - pixels(stock(one)[0])).max() <= 1


@pytest.mark.parametrize("feature_cache_interval", [0, 2])
def test_padded_text_tokens_reach_the_unet_masked_and_move_images_by_rounding_only(
    lossless: Engine, feature_cache_interval: int
) -> None:
    seen: list[tuple[int, float | None]] = []

    def note(module: torch.nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        # The first cross-attention layer's key and value inputs, and the mask's bias on them.
        context, mask = kwargs["encoder_hidden_states"], kwargs.get("attention_mask")
        assert isinstance(context, torch.Tensor)
        seen.append((context.shape[1], None if mask is None else float(torch.as_tensor(mask)[..., 77:].max())))

    attention = next(module for name, module in lossless.base.unet.named_modules() if name.endswith("attn2"))
    hook = attention.register_forward_pre_hook(note, with_kwargs=True)
    try:
        one = request(prompts=["a padded prompt"] * 2, seeds=[5, 6])
        images = {}
        for pad in (False, True):
            options = RunOptions(pad_text_tokens=pad, feature_cache_interval=feature_cache_interval)
            images[pad] = lossless.run(one, options=options).images
    finally:
        hook.remove()
    steps = one.num_inference_steps
    assert seen == [(77, None)] * steps + [(80, -10000.0)] * steps
    for padded, plain in zip(images[True], images[False], strict=True):
        assert np.abs(pixels(padded) - pixels(plain)).max() <= 1


def test_the_prompt_cache_returns_what_encoding_again_gives(lossless: Engine) -> None:
    cached = RunOptions(prompt_cache=4)
    first = lossless.run(request(prompts=["a cached prompt"]), options=cached).images[0]
    hits = lossless.prompt_cache_hits
    again = lossless.run(request(prompts=["a cached prompt"]), options=cached).images[0]
    assert lossless.prompt_cache_hits == hits + 1
    assert np.array_equal(pixels(first), pixels(again))


def test_a_batch_gives_the_images_its_requests_give_alone(
    lossless: Engine, stock: Callable[[GenerationRequest], list[Image.Image]]
) -> None:
    requests = [
        request(prompts=["a red fox"], seeds=[11]),
        request(prompts=["a blue whale", "a blue whale"], seeds=[12, 13], guidance_scale=5.0),
        request(prompts=["a red fox"], seeds=[14], negative_prompt="fog"),
    ]
    outcomes = lossless.run_batch(requests, options=RunOptions.of(LOSSLESS))
    for one, outcome in zip(requests, outcomes, strict=True):
        assert not isinstance(outcome, Cancelled)
        alone = stock(one)
        assert len(outcome.images) == len(alone) == len(one.seeds)
        for batched, single in zip(outcome.images, alone, strict=True):
            assert np.abs(pixels(batched) - pixels(single)).max() <= 1


def test_requests_that_cannot_share_a_call_are_refused(lossless: Engine) -> None:
    with pytest.raises(BatchIncompatible):
        lossless.run_batch([request(), request(width=96)])
    with pytest.raises(BatchIncompatible):
        lossless.run_batch([request(), request(guidance_scale=1.0)])
    with pytest.raises(BatchIncompatible):
        lossless.run_batch([request(init_image=Image.new("RGB", (64, 64))), request()])


PROFILES = {
    "stock": STOCK_PROFILE,
    "lossless": LOSSLESS,
    "classic attention": replace(STOCK_PROFILE, sdpa=False),
    "channels_last": replace(LOSSLESS, channels_last=True),
    "bfloat16": replace(LOSSLESS, precision="bfloat16"),
    "feature cache": replace(LOSSLESS, feature_cache_interval=2),
}


@pytest.mark.parametrize("name", PROFILES)
def test_every_profile_draws_valid_images_of_the_requested_size(
    name: str, stock: Callable[[GenerationRequest], list[Image.Image]]
) -> None:
    profile = PROFILES[name]
    engine = engine_for(profile)
    wide = request(width=96, height=64, seeds=[3, 4], prompts=["a fox"] * 2, num_inference_steps=3)
    images = engine.run(wide, options=RunOptions.of(profile)).images
    assert [(image.size, image.mode) for image in images] == [((96, 64), "RGB")] * 2
    assert all(pixels(image).std() > 0 for image in images)
    worst = min(psnr(image, reference) for image, reference in zip(images, stock(wide), strict=True))
    if profile.lossy or profile.precision != "float32":
        assert worst >= 30
    else:
        assert all(
            np.abs(pixels(image) - pixels(reference)).max() <= 1
            for image, reference in zip(images, stock(wide), strict=True)
        )
    image_to_image = request(init_image=images[0], strength=0.5, width=96, height=64)
    assert engine.run(image_to_image, options=RunOptions.of(profile)).images[0].size == (96, 64)


def test_regional_compilation_draws_stock_image(
    stock: Callable[[GenerationRequest], list[Image.Image]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Dynamo's capture of the repeated blocks (fullgraph: no graph breaks) without Inductor's code generation,
    # which takes a minute on a small CPU; the benchmark measures the generated code's images against stock.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    profile = replace(LOSSLESS, compile="regional")
    engine = engine_for(profile)
    one = request(num_inference_steps=2)
    image = engine.run(one, options=RunOptions.of(profile)).images[0]
    assert np.abs(pixels(image) - pixels(stock(one)[0])).max() <= 1


@pytest.mark.slow  # torch.compile traces the model: the longest tests of the engine
def test_full_compilation_traces_with_weights_frozen(
    stock: Callable[[GenerationRequest], list[Image.Image]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Inductor folds weights only if its freezing switch is on when Dynamo traces; passed as a
    # torch.compile option it was silently ignored. A backend that notes the switch and runs the graph eagerly.
    # Weights are not pre-packed for oneDNN: packed ones would keep the graph out of the persistent cache.
    traced_frozen: list[bool] = []
    traced_packed: list[bool] = []

    def noting_backend(graph: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., object]:
        traced_frozen.append(bool(torch._inductor.config.freezing))
        traced_packed.append(bool(torch._inductor.config.cpp.weight_prepack))
        return graph.forward

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=noting_backend))
    profile = replace(LOSSLESS, compile="full")
    engine = engine_for(profile)
    one = request(num_inference_steps=2)
    image = engine.run(one, options=RunOptions.of(profile)).images[0]
    # The UNet and the VAE decoder each traced at least once, every time with freezing on.
    assert len(traced_frozen) >= 2
    assert all(traced_frozen)
    assert not any(traced_packed)
    assert np.abs(pixels(image) - pixels(stock(one)[0])).max() <= 1
    assert not torch._inductor.config.freezing, "the switch is on only around the engine's calls"
    assert torch._inductor.config.cpp.weight_prepack


# --- Cancel -------------------------------------------------------------------------------------------------


def test_cancel_stops_a_run_within_one_step(lossless: Engine) -> None:
    seen: list[int] = []
    with pytest.raises(Cancelled) as cancelled:
        lossless.run(
            request(num_inference_steps=6), on_step=lambda step, _: seen.append(step), should_cancel=lambda: 3 in seen
        )
    assert (cancelled.value.steps_done, cancelled.value.total_steps) == (3, 6)
    assert seen == [1, 2, 3]
    with pytest.raises(Cancelled) as before:
        lossless.run(request(), should_cancel=lambda: True)
    assert before.value.steps_done == 0


@pytest.mark.parametrize(
    ("feature_cache_interval", "scheduler", "guidance_scale"),
    [
        (0, "DDIMScheduler", 7.5),  # the leaving request's rows are dropped from the batch
        (2, "DDIMScheduler", 7.5),  # ... and from the kept deep features
        (0, "DDIMScheduler", 1.0),  # without guidance: one row per image
        (0, "PNDMScheduler", 1.0),  # a scheduler with history: the rows run on, unused
    ],
)
def test_a_request_cancelled_in_a_batch_leaves_it_at_that_step_and_the_others_finish(
    feature_cache_interval: int, scheduler: str, guidance_scale: float
) -> None:
    engine = engine_for(LOSSLESS)
    engine.base.scheduler = getattr(diffusers, scheduler).from_config(engine.base.scheduler.config)
    requests = [
        request(seeds=[seed], prompts=[prompt], guidance_scale=guidance_scale)
        for seed, prompt in ((21, "a first prompt"), (22, "a second prompt"), (23, "a first prompt"))
    ]
    seen: list[int] = []
    left: list[tuple[int, int, int, bool]] = []
    # Text tokens padded: their mask leaves the batch with the rows too.
    options = RunOptions(feature_cache_interval=feature_cache_interval, pad_text_tokens=True)
    outcomes = engine.run_batch(
        requests,
        options=options,
        on_step=lambda step, _: seen.append(step),
        should_cancel=lambda member: member == 1 and 2 in seen,
        on_cancelled=lambda member, cancelled: left.append(
            (member, cancelled.steps_done, len(seen), cancelled.rows_stay)
        ),
    )
    # Told at once, at the step it was asked to stop at, while the batch goes on to its last step; told too whether
    # its rows run on, unused (their time is then no one's work: inference.engine.batch_shares).
    assert left == [(1, 2, 2, scheduler == "PNDMScheduler")]
    assert isinstance(outcomes[1], Cancelled)
    for index in (0, 2):
        outcome = outcomes[index]
        assert not isinstance(outcome, Cancelled)
        # Every model call reported once (PNDM makes more calls than steps, and says so, as stock does).
        assert seen == list(range(1, outcome.steps + 1)) == list(range(1, outcomes[1].total_steps + 1))
        alone = engine.run(requests[index], options=options).images[0]
        assert np.abs(pixels(outcome.images[0]) - pixels(alone)).max() <= 1


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "PNDMScheduler"])
def test_a_request_that_leaves_before_the_first_step_takes_its_rows_along_where_they_can_go(scheduler: str) -> None:
    engine = engine_for(LOSSLESS)
    engine.base.scheduler = getattr(diffusers, scheduler).from_config(engine.base.scheduler.config)
    rows: list[int] = []
    real_predict = engine.predict_noise

    def predict_noise(model_input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        rows.append(int(model_input.shape[0]))
        return real_predict(model_input, *args, **kwargs)

    engine.predict_noise = predict_noise  # type: ignore[method-assign]
    left: list[bool] = []
    outcomes = engine.run_batch(
        [request(seeds=[1]), request(seeds=[2, 3], prompts=["a", "b"])],
        should_cancel=lambda member: member == 1,
        on_cancelled=lambda member, cancelled: left.append(cancelled.rows_stay),
    )
    assert isinstance(outcomes[1], Cancelled)
    assert outcomes[1].steps_done == 0
    assert not isinstance(outcomes[0], Cancelled)
    assert len(outcomes[0].images) == 1
    if scheduler == "DDIMScheduler":
        # Never a step for its two images: only the other request's image, guided (two UNet rows), is computed.
        assert (left, set(rows)) == ([False], {2})
    else:
        # A scheduler with per-row history keeps every row from the first step to the last.
        assert (left, set(rows)) == ([True], {6})


def test_a_request_leaving_a_batch_takes_its_own_guidance_and_noise_along() -> None:
    # Each request its own guidance scale (one per row), a scheduler that draws noise from the rows' generators at
    # every step, and two images for the request that stays: the rows that go on keep their own scale and generator.
    engine = engine_for(LOSSLESS)
    engine.base.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(engine.base.scheduler.config)
    requests = [
        request(seeds=[41], prompts=["a first prompt"], guidance_scale=7.5),
        request(seeds=[42, 43], prompts=["a second prompt", "a third prompt"], guidance_scale=3.0),
        request(seeds=[44], prompts=["a first prompt"], guidance_scale=5.0),
    ]
    seen: list[int] = []
    outcomes = engine.run_batch(
        requests,
        on_step=lambda step, _: seen.append(step),
        should_cancel=lambda member: member == 0 and 1 in seen,
    )
    assert isinstance(outcomes[0], Cancelled)
    for index in (1, 2):
        outcome = outcomes[index]
        assert not isinstance(outcome, Cancelled)
        alone = engine.run(requests[index]).images
        assert len(outcome.images) == len(alone)
        for image, expected in zip(outcome.images, alone, strict=True):
            assert np.abs(pixels(image) - pixels(expected)).max() <= 1


def test_requests_asked_to_stop_after_the_last_step_are_delivered(lossless: Engine) -> None:
    seen: list[int] = []
    outcomes = lossless.run_batch(
        [request(seeds=[1], num_inference_steps=3), request(seeds=[2], num_inference_steps=3)],
        on_step=lambda step, _: seen.append(step),
        should_cancel=lambda member: len(seen) == 3,
    )
    assert [len(outcome.images) for outcome in outcomes if not isinstance(outcome, Cancelled)] == [1, 1]


def test_a_batch_whose_requests_all_leave_stops() -> None:
    engine = engine_for(LOSSLESS)
    seen: list[int] = []
    outcomes = engine.run_batch(
        [request(seeds=[1]), request(seeds=[2])],
        on_step=lambda step, _: seen.append(step),
        should_cancel=lambda member: len(seen) >= member + 1,
    )
    assert [outcome.steps_done for outcome in outcomes if isinstance(outcome, Cancelled)] == [1, 2]
    assert seen == [1, 2]


# --- CUDA graphs, their capture stood in for on a CPU -------------------------------------------------------


class Replay:
    """What replaying a captured graph does to its buffers: the forward runs again on the static inputs, and its
    result overwrites the one output buffer the capture returned."""

    def __init__(
        self,
        forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        static: dict[str, torch.Tensor],
        output: torch.Tensor,
    ) -> None:
        self.forward, self.static, self.output = forward, static, output

    def replay(self) -> None:
        self.output.copy_(self.forward(self.static))


class StandInGraphUNet(CudaGraphUNet):
    """The engine's CUDA graph runner with only the capture replaced: keys, static buffers, copies and grad mode
    are the real ones."""

    def _capture(self, inputs: dict[str, torch.Tensor]) -> _Captured:
        static = {name: tensor.detach().clone() for name, tensor in inputs.items()}
        output = self._forward(static)
        return _Captured(graph=Replay(self._forward, static, output), inputs=static, output=output)


def graphed(engine: Engine) -> Engine:
    engine._graphs = StandInGraphUNet(engine.base.unet)
    return engine


def test_graph_replays_draw_what_direct_calls_draw_even_where_the_scheduler_keeps_model_outputs() -> None:
    # PNDM keeps the model outputs of earlier steps (`ets`); without guidance the UNet's output is one of them
    # as it comes: a replay's buffer, overwritten by the next replay, would change them under it.
    def pndm() -> Engine:
        engine = engine_for(LOSSLESS)
        engine.base.scheduler = diffusers.PNDMScheduler.from_config(engine.base.scheduler.config)
        return engine

    direct, replayed = pndm(), graphed(pndm())
    for guidance_scale in (1.0, 7.5):
        one = request(num_inference_steps=5, guidance_scale=guidance_scale)
        expected = pixels(direct.run(one).images[0])
        assert np.array_equal(pixels(replayed.run(one).images[0]), expected)
    # A run without inference mode (another endpoint on the same warm model) copies into the buffers that were
    # captured in inference mode.
    assert np.array_equal(pixels(replayed.run(one, options=RunOptions(inference_mode=False)).images[0]), expected)
    assert replayed._graphs is not None
    assert replayed._graphs.captured_shapes == 2  # one row, then two (guidance): each shape captured once


def test_a_request_cancelled_in_a_graphed_batch_keeps_its_rows_to_the_end() -> None:
    engine = graphed(engine_for(LOSSLESS))
    requests = [request(seeds=[31], prompts=["a first prompt"]), request(seeds=[32], prompts=["a second prompt"])]
    seen: list[int] = []
    outcomes = engine.run_batch(
        requests, on_step=lambda step, _: seen.append(step), should_cancel=lambda member: member == 0 and 1 in seen
    )
    assert isinstance(outcomes[0], Cancelled)
    assert outcomes[0].steps_done == 1
    # A captured graph has fixed shapes: the cancelled request's rows ran on, and no other shape was captured.
    assert engine._graphs is not None
    assert engine._graphs.captured_shapes == 1
    finished = outcomes[1]
    assert not isinstance(finished, Cancelled)
    alone = engine_for(LOSSLESS).run(requests[1]).images[0]
    assert np.abs(pixels(finished.images[0]) - pixels(alone)).max() <= 1


# --- GPU time of a batch -------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, ms: float) -> None:
        self.now += ms / 1000


def test_shares_follow_images_and_add_up_to_the_batch_time() -> None:
    clock = Clock()
    meter = BatchMeter([1, 2, 1], clock=clock)
    clock.advance(400.3)
    assert meter.running_ms(1) == math.ceil(400.3 / 2)
    # The first request is cancelled here: it takes a quarter of the time so far, rounded down.
    assert meter.leave([0]) == {0: 100}
    clock.advance(300)
    meter.exclusive(2)  # storing the third request's images: its time alone
    clock.advance(10.4)
    assert meter.leave([2]) == {2: math.floor(100.075 + 100 + 10.4)}
    clock.advance(5)
    final = meter.leave([1])
    assert sum(meter.allocated.values()) == meter.total_ms() == math.ceil(400.3 + 300 + 10.4 + 5)
    assert final[1] >= 200.15 + 200 + 5


def test_requests_that_finish_together_split_by_largest_remainder() -> None:
    clock = Clock()
    meter = BatchMeter([1, 1, 1], clock=clock)
    clock.advance(100)
    shares = meter.leave([0, 1, 2])
    assert shares == {0: 34, 1: 33, 2: 33}  # 100 ms: the spare millisecond goes to the first
    assert meter.total_ms() == 100


@given(
    weights=st.lists(st.integers(min_value=1, max_value=8), min_size=1, max_size=8),
    intervals=st.lists(st.floats(min_value=0, max_value=5000, allow_nan=False), min_size=1, max_size=12),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_shares_always_sum_exactly_to_the_batch_time(weights: list[int], intervals: list[float], seed: int) -> None:
    clock = Clock()
    meter = BatchMeter(weights, clock=clock)
    started = clock.now
    rng = np.random.default_rng(seed)
    for elapsed in intervals:
        clock.advance(elapsed)
        active = meter.active
        if len(active) > 1 and rng.random() < 0.4:
            meter.leave([int(rng.choice(active))])
    meter.leave(meter.active)
    shares = meter.allocated
    assert sorted(shares) == list(range(len(weights)))
    assert all(share >= 0 for share in shares.values())
    assert sum(shares.values()) == math.ceil((clock.now - started) * 1000)


@given(
    exact=st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1, max_size=10),
    total=st.integers(min_value=0, max_value=10**7),
)
def test_largest_remainder_is_exact_and_fair(exact: list[float], total: int) -> None:
    shares = largest_remainder(dict(enumerate(exact)), total)
    assert sum(shares.values()) == total
    exact_sum = sum(exact)
    for key, value in enumerate(exact):
        ideal = total * (value / exact_sum) if exact_sum else total / len(exact)
        assert abs(shares[key] - ideal) < 1 + 1e-6


# --- The GPU benchmark's models, at toy size -----------------------------------------------------------------


@pytest.mark.slow  # torch.compile traces the model: the longest tests of the engine
def test_regional_compilation_of_sd15_survives_every_batch_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    # SD 1.5 repeats its transformer block 16 times over three channel widths. Frozen, every instance was a graph
    # of its own and the ninth failed (Dynamo's recompile limit of 8 under fullgraph); unfrozen, each width still
    # takes a graph per kind of batch (one row, the first size, then any size): more than eight in all. Dynamo's
    # capture only (no Inductor), with its caches emptied: the count starts here.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    profile = replace(LOSSLESS, compile="regional")
    engine = Engine(build_architecture("sd15", scale=10), optimizations=ModuleOptimizations.of(profile))
    options = RunOptions.of(profile)
    for images, guidance_scale in ((1, 7.5), (1, 1.0), (2, 7.5), (3, 7.5)):
        shaped = request(
            num_inference_steps=1,
            guidance_scale=guidance_scale,
            prompts=["a fox"] * images,
            seeds=list(range(images)),
        )
        assert len(engine.run(shaped, options=options).images) == images


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_the_real_architectures_build_and_the_engine_draws_stock_images(name: str) -> None:
    stock_pipeline = build_architecture(name, scale=10)
    engine = Engine(build_architecture(name, scale=10), optimizations=ModuleOptimizations(fuse_qkv=True))
    assert engine.is_xl == (name == "sdxl")
    one = request(num_inference_steps=2, guidance_scale=7.5)
    reference = stock_pipeline(
        prompt=one.prompts,
        generator=[torch.Generator().manual_seed(seed) for seed in one.seeds],
        num_inference_steps=2,
        guidance_scale=7.5,
        height=64,
        width=64,
        output_type="pil",
    ).images[0]
    for options in (RunOptions(), RunOptions(pad_text_tokens=True)):
        image = engine.run(one, options=options).images[0]
        assert image.size == (64, 64)
        assert np.abs(pixels(image) - pixels(reference)).max() <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sdxl_time_ids_are_the_ones_diffusers_computes(dtype: torch.dtype) -> None:
    pipeline = build_architecture("sdxl", scale=10)
    projection_dim = pipeline.text_encoder_2.config.projection_dim
    for size in [(64, 64), (64, 96), (96, 64), (1024, 1024), (768, 1344)]:
        ours = sdxl_time_ids(pipeline.unet, size, dtype, projection_dim)
        stock = pipeline._get_add_time_ids(size, (0, 0), size, dtype=dtype, text_encoder_projection_dim=projection_dim)
        assert ours.dtype == stock.dtype == dtype
        assert torch.equal(ours, stock), size
    # A text encoder whose pooled embedding the UNet's added embedding does not take: both refuse it.
    with pytest.raises(ValueError, match="incorrect config") as stock_refusal:
        pipeline._get_add_time_ids(
            (64, 64), (0, 0), (64, 64), dtype=dtype, text_encoder_projection_dim=projection_dim + 1
        )
    with pytest.raises(ValueError, match="incorrect config") as our_refusal:
        sdxl_time_ids(pipeline.unet, (64, 64), dtype, projection_dim + 1)
    assert str(our_refusal.value) == str(stock_refusal.value)
