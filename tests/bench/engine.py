"""Stock diffusers against the engine, on the same weights, parameters and seeds, in one process.

    python -m tests.bench.engine [--rounds 3] [--quick] [--only NAME ...]      # CPU: the small built-in model, then
                                                                              # the tiny video and audio models
    python -m tests.bench.engine --sections video audio [--threads 1]         # some of the CPU sections
    python -m tests.bench.engine --gpu [--rounds 3]                           # CUDA: SD 1.5 and SDXL architectures
    python -m tests.bench.engine --gpu --architectures sd15 --batches 1 --only regional   # one part (a GPU lease's
                                                                              # commands are limited to 10 minutes)
    python -m tests.bench.engine --gpu-dry-run                                # the GPU path at toy size, on a CPU

Every configuration gets its own copy of the model (built from the same seed: the same weights), is warmed up
(compiled, graphs captured) before timing, and then the configurations take turns call by call, round after round,
each generating the same requests (one image each, its own seed and prompt): stock diffusers as one pipeline call
per request (on the GPU, one call per batch: stock batches too), the engine one call per request or one call per
batch of requests. Reported for each configuration: images/s (batch size over the median call's time), the p50
latency of a request (for a batch: of the call that carried it), the speedup in images/s over stock, and how far
its images moved from stock's with the same seed (the largest absolute pixel difference in 0..255, and the PSNR
over all images; "inf" when identical).

Every row is compared with its like: a row that runs requests one at a time with stock's one call per request, a
batched row with stock's own batched call of as many requests (stock diffusers batches too: a list of prompts, a
generator per output), so the speedup is what the engine adds, not what batching alone gives.

On a CPU the image model is the `small` built-in (UNet channels 64/128, 128x128, 20 steps, guidance 7.5, DDIM); the
video model the tiny LTX-Video (64x64, 16 frames at 8 fps, guidance 3) and the audio model the tiny Stable Audio
Open (2 s at 16 kHz, guidance 7): diffusers' own pipelines, so their rows measure what the engine adds around them
(inference mode, the prompt cache, batching with one generator per request, compilation) and the thread policy
(`--threads`). A video's difference is over every frame (0..255), an audio clip's in 16-bit steps. On CUDA
it is the real SD 1.5 and SDXL architectures with random weights (`inference.engine.architectures`), float16, at
512x512 and 1024x1024, 30 steps with guidance, batches of 1 and 8; the UNet's it/s (denoising steps per second) is
shown beside the best published figures on an H100 (stable-fast).
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from PIL import Image

from inference.engine import (
    STOCK_PROFILE,
    Engine,
    GenerationRequest,
    MediaEngine,
    ModuleOptimizations,
    OptimizationProfile,
    RunOptions,
    build_tiny_audio_pipeline,
    build_tiny_pipeline,
    build_tiny_video_pipeline,
    configure_compile_cache,
    frames_to_generate,
)
from inference.engine.architectures import NATIVE_SIZE, build_architecture
from inference.engine.media import to_uint8_frames

REPO = Path(__file__).resolve().parents[2]
# Best published UNet iterations per second on an H100 (stable-fast's README), for the GPU table. Its figures are
# denoising steps per second of one image (batch 1) at 30 steps with guidance (each step one UNet call on the two
# rows), timed with CUDA events from the first step's end to the last's (its
# examples/optimize_stable_diffusion_pipeline.py): what the "UNet it/s" column measures. At batch 8 a step carries
# eight images, so those rows are not comparable.
PUBLISHED_H100_ITS = {"sd15": ("stable-fast, SD 1.5 512x512", 104.6), "sdxl": ("stable-fast, SDXL 1024x1024", 21.6)}
# The engine's targets on an H100, seconds per image at batch 1 (30 steps with guidance, VAE decode included).
TARGET_S_PER_IMAGE = {"sd15": 0.25, "sdxl": 1.3}
LOSSLESS: dict[str, Any] = {
    "inference_mode": True,
    "fuse_qkv": True,
    "pad_text_tokens": True,
    "small_head_attention": True,
    "prompt_cache": 64,
}


@dataclass(frozen=True)
class Config:
    name: str
    profile: OptimizationProfile
    batch: int = 1
    # Stock diffusers' own pipeline call, not the engine.
    stock: bool = False
    # The stock row its speed is compared with: the first row (stock, one request a call), or stock's own batched
    # call of as many requests for a batched row.
    baseline: str = ""


STOCK_BATCH_OF_4 = "stock diffusers, batch of 4"


def cpu_configs() -> list[Config]:
    base = replace(STOCK_PROFILE, **LOSSLESS)
    compiled_batch = replace(base, compile="full", max_batch_size=4)
    return [
        Config("stock diffusers", STOCK_PROFILE, stock=True),
        Config("engine loop, no optimization", STOCK_PROFILE),
        Config("inference_mode", replace(STOCK_PROFILE, inference_mode=True)),
        Config("fused QKV", replace(STOCK_PROFILE, fuse_qkv=True)),
        Config("text tokens padded 77 -> 80", replace(STOCK_PROFILE, pad_text_tokens=True)),
        Config("small-head attention kernel", replace(STOCK_PROFILE, small_head_attention=True)),
        Config("channels_last", replace(STOCK_PROFILE, channels_last=True)),
        Config("compile regional", replace(STOCK_PROFILE, compile="regional")),
        Config("compile full (frozen)", replace(STOCK_PROFILE, compile="full")),
        Config("lossless set", base),
        Config("lossless set + compile full", replace(base, compile="full")),
        Config(STOCK_BATCH_OF_4, STOCK_PROFILE, batch=4, stock=True),
        Config("lossless set, batch of 4", replace(base, max_batch_size=4), batch=4, baseline=STOCK_BATCH_OF_4),
        Config("lossless + compile, batch of 4", compiled_batch, batch=4, baseline=STOCK_BATCH_OF_4),
        Config("bfloat16 (CPU: rounds)", replace(base, precision="bfloat16")),
        Config("DeepCache k=3 (lossy)", replace(base, feature_cache_interval=3)),
        Config("DeepCache k=3, compiled, batch of 4 (lossy)", replace(compiled_batch, feature_cache_interval=3), 4,
               baseline=STOCK_BATCH_OF_4),
        Config("DeepCache k=5, compiled, batch of 4 (lossy)", replace(compiled_batch, feature_cache_interval=5), 4,
               baseline=STOCK_BATCH_OF_4),
        Config(
            "DeepCache k=3 + bfloat16, compiled, batch of 4",
            replace(compiled_batch, feature_cache_interval=3, precision="bfloat16"),
            4,
            baseline=STOCK_BATCH_OF_4,
        ),
    ]  # fmt: skip


# What the engine applies to a video or audio model (`inference.engine.media`): the rest of a profile is the UNet's.
MEDIA_LOSSLESS: dict[str, Any] = {"inference_mode": True, "prompt_cache": 64, "small_head_attention": True}


def media_configs() -> list[Config]:
    """The same rows for the video and the audio model; batched rows against stock's own call of four requests.
    (The small-head attention kernel applies to the video model only: the audio model's rows run without it.)"""
    base = replace(STOCK_PROFILE, **MEDIA_LOSSLESS)
    return [
        Config("stock diffusers", STOCK_PROFILE, stock=True),
        Config("engine, no optimization", STOCK_PROFILE),
        Config("engine: inference_mode, prompt cache", replace(base, small_head_attention=False)),
        Config("engine: small-head attention kernel", replace(STOCK_PROFILE, small_head_attention=True)),
        Config("engine: lossless set", base),
        Config("engine + compile regional", replace(base, compile="regional")),
        Config("engine + compile full", replace(base, compile="full")),
        Config(STOCK_BATCH_OF_4, STOCK_PROFILE, batch=4, stock=True),
        Config("engine, batch of 4", replace(base, max_batch_size=4), batch=4, baseline=STOCK_BATCH_OF_4),
        Config("engine + compile full, batch of 4", replace(base, compile="full", max_batch_size=4), batch=4,
               baseline=STOCK_BATCH_OF_4),
    ]  # fmt: skip


def gpu_configs(batch: int) -> list[Config]:
    """Stock batches as the engine does (one call of `batch` images): the same work, a fair comparison."""
    stock = replace(STOCK_PROFILE, precision="float16")
    lossless = replace(stock, **LOSSLESS, channels_last=True, compile="regional", cuda_graphs=True)
    return [
        Config("stock diffusers", stock, batch=batch, stock=True),
        Config("engine: fused QKV, inference_mode", replace(stock, **LOSSLESS), batch=batch),
        Config("+ channels_last, regional compile, CUDA graphs", lossless, batch=batch),
        Config("+ full compile instead (no graphs)", replace(lossless, compile="full", cuda_graphs=False), batch=batch),
        Config("+ DeepCache k=3 (lossy)", replace(lossless, feature_cache_interval=3), batch=batch),
    ]


@dataclass
class Measured:
    config: Config
    warmup_s: float = 0.0
    images: int = 0
    # Seconds of each timed call (a call carries `config.batch` requests of one image).
    calls_s: list[float] = field(default_factory=list)
    step_rates: list[float] = field(default_factory=list)
    outputs: dict[int, np.ndarray] = field(default_factory=dict)


class Runner:
    """One configuration's model and how it generates a list of requests."""

    def __init__(self, config: Config, pipeline: Any, *, device: str, sync: Callable[[], None]) -> None:
        self.config = config
        self.device = device
        self.sync = sync
        self.pipeline = pipeline
        self.engine = None if config.stock else Engine(pipeline, optimizations=ModuleOptimizations.of(config.profile))
        self.options = RunOptions.of(config.profile)

    def generate(self, requests: Sequence[GenerationRequest]) -> tuple[list[Image.Image], float]:
        """The images and the UNet's steps per second (from the first step's end to the last's)."""
        marks: list[float] = []
        total = requests[0].num_inference_steps

        def mark(step: int) -> None:
            if step in (1, total):
                self.sync()
                marks.append(time.perf_counter())

        if self.engine is None:

            def on_step_end(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
                mark(index + 1)
                return tensors

            # Stock batches too, when given several prompts: one call, a generator per image.
            first = requests[0]
            images = self.pipeline(
                prompt=[prompt for request in requests for prompt in request.prompts],
                generator=[torch.Generator().manual_seed(seed) for request in requests for seed in request.seeds],
                num_inference_steps=first.num_inference_steps,
                guidance_scale=first.guidance_scale,
                height=first.height,
                width=first.width,
                output_type="pil",
                callback_on_step_end=on_step_end,
            ).images
        else:
            outcomes = self.engine.run_batch(requests, options=self.options, on_step=lambda step, _: mark(step))
            images = [image for outcome in outcomes for image in outcome.images]  # type: ignore[union-attr]
        self.sync()
        rate = (total - 1) / (marks[-1] - marks[0]) if len(marks) == 2 and marks[-1] > marks[0] else float("nan")
        return images, rate


class MediaRunner:
    """One configuration of a video or audio model: stock's pipeline call, or the engine's (`MediaEngine`)."""

    def __init__(self, config: Config, pipeline: Any) -> None:
        self.config = config
        self.pipeline = pipeline
        self.engine = (
            None if config.stock else MediaEngine(pipeline, optimizations=ModuleOptimizations.of(config.profile))
        )
        self.options = RunOptions.of(config.profile)

    def generate(self, requests: Sequence[GenerationRequest]) -> tuple[list[np.ndarray], float]:
        """Each request's output as an array (video frames in 0..255, audio in 16-bit steps), and nan for the rate."""
        first = requests[0]
        if self.engine is not None:
            outcomes = self.engine.run_batch(requests, options=self.options)
            results = [outcome for outcome in outcomes if not isinstance(outcome, Exception)]
            if first.audio_seconds:
                return [result.audios[0] * 32767.0 for result in results], float("nan")
            return [result.videos[0].astype(np.float64) for result in results], float("nan")
        # Stock: the pipeline as its documentation calls it, one call for the batch, a generator per output.
        arguments: dict[str, Any] = {
            "prompt": [request.prompts[0] for request in requests],
            "generator": [torch.Generator().manual_seed(request.seeds[0]) for request in requests],
            "num_inference_steps": first.num_inference_steps,
            "guidance_scale": first.guidance_scale,
            "output_type": "np",
        }
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Should have")  # torchsde's, on every step of Stable Audio
            if first.audio_seconds:
                audios = self.pipeline(audio_end_in_s=first.audio_seconds, **arguments).audios
                return [np.asarray(audio, dtype=np.float64) * 32767.0 for audio in audios], float("nan")
            frames = self.pipeline(
                width=first.width,
                height=first.height,
                num_frames=frames_to_generate(first.num_frames, self.pipeline.vae.temporal_compression_ratio),
                frame_rate=first.frame_rate,
                **arguments,
            ).frames
        return [to_uint8_frames(np.asarray(video)[: first.num_frames]).astype(np.float64) for video in frames], float(
            "nan"
        )


def video_requests(seeds: Sequence[int], *, steps: int) -> list[GenerationRequest]:
    return [
        GenerationRequest(prompts=[f"waves on a beach at dusk, study {seed}"], seeds=[seed], width=64, height=64,
                          num_inference_steps=steps, guidance_scale=3.0, num_frames=16, frame_rate=8)
        for seed in seeds
    ]  # fmt: skip


def audio_requests(seeds: Sequence[int], *, steps: int) -> list[GenerationRequest]:
    return [
        GenerationRequest(prompts=[f"rain on a tin roof, take {seed}"], seeds=[seed], num_inference_steps=steps,
                          guidance_scale=7.0, audio_seconds=2.0)
        for seed in seeds
    ]  # fmt: skip


def requests_for(seeds: Sequence[int], *, size: int, steps: int) -> list[GenerationRequest]:
    # A prompt of its own per request: the prompt cache gains nothing it would not gain in service.
    return [
        GenerationRequest(
            prompts=[f"a lighthouse at dusk, study {seed}"],
            seeds=[seed],
            width=size,
            height=size,
            num_inference_steps=steps,
            guidance_scale=7.5,
        )
        for seed in seeds
    ]


def measure(
    runners: Sequence[Runner | MediaRunner],
    *,
    rounds: int,
    per_round: int,
    steps: int,
    log: Callable[[str], None],
    size: int = 0,
    make_requests: Callable[..., list[GenerationRequest]] | None = None,
) -> list[Measured]:
    """``make_requests(seeds, steps=...)``: the requests (images of ``size`` by default)."""
    make = make_requests or functools.partial(requests_for, size=size)
    results = [Measured(runner.config) for runner in runners]
    for runner, result in zip(runners, results, strict=True):
        started = time.perf_counter()
        seeds = list(range(10_000, 10_000 + runner.config.batch))
        # Two steps compile every shape (and capture every graph) a full run needs; the full run then shows
        # nothing is left to prepare.
        runner.generate(make(seeds, steps=2))
        runner.generate(make(seeds, steps=steps))
        result.warmup_s = time.perf_counter() - started
        log(f"  warmed up {runner.config.name} in {result.warmup_s:.1f} s")
    for round_number in range(rounds):
        seeds = list(range(round_number * per_round, (round_number + 1) * per_round))
        # Configurations take turns call by call, in an order that rotates every round: a passing load on the
        # machine falls on all of them, and none always runs right after another.
        order = list(range(len(runners)))
        order = order[round_number % len(order) :] + order[: round_number % len(order)]
        for start in range(per_round):
            for index in order:
                runner, result = runners[index], results[index]
                batch = runner.config.batch
                if start % batch:
                    continue
                chunk = make(seeds[start : start + batch], steps=steps)
                began = time.perf_counter()
                images, rate = runner.generate(chunk)
                elapsed = time.perf_counter() - began
                result.calls_s.append(elapsed)
                result.images += len(images)
                result.step_rates.append(rate)
                for seed, image in zip(seeds[start : start + batch], images, strict=True):
                    result.outputs[seed] = np.asarray(image, dtype=np.float64)
        log(f"  round {round_number + 1}/{rounds} done")
    return results


def images_per_second(result: Measured) -> float:
    """From the median call: robust to the odd call slowed by something else on the machine."""
    return result.config.batch / statistics.median(result.calls_s)


def difference(result: Measured, stock: Measured, *, peak: float = 255.0) -> tuple[float, float]:
    """Largest absolute difference (pixels 0..255, or audio's 16-bit steps) and PSNR in dB against stock's outputs of
    the same seeds (``peak``: the largest value, 255 or 32767)."""
    errors = [result.outputs[seed] - stock.outputs[seed] for seed in stock.outputs]
    largest = max(float(np.abs(error).max()) for error in errors)
    mse = float(np.mean([np.mean(error**2) for error in errors]))
    return largest, (math.inf if mse == 0 else 10 * math.log10(peak**2 / mse))


def table(
    results: list[Measured],
    *,
    gpu_model: str | None = None,
    published_its: float | None = None,
    outputs: str = "images/s",
    difference_label: str = "max|dpx|",
    peak: float = 255.0,
) -> str:
    """`published_its`: a published UNet it/s to set each row's beside (batch 1 only: see PUBLISHED_H100_ITS).

    The speedup is over the row's baseline (`Config.baseline`: stock's own batched call for a batched row); the
    difference is from stock's one-request calls (the first row), output by output.
    """
    stock = results[0]
    by_name = {result.config.name: result for result in results}
    head = (
        f"  {'configuration':46} {'batch':>5} {outputs:>9} {'p50 ms':>8} {'speedup':>8} {'vs':>8} "
        f"{difference_label:>9} {'PSNR dB':>8}"
    )
    if gpu_model:
        head += f" {'s/image':>8} {'UNet it/s':>9}"
        if published_its:
            head += f" {'/ publ.':>7}"
    head += f" {'warm-up s':>9}"
    lines = [head, "  " + "-" * (len(head) - 2)]
    for result in results:
        rate = images_per_second(result)
        baseline = by_name.get(result.config.baseline, stock)
        largest, psnr = difference(result, stock, peak=peak)
        line = (
            f"  {result.config.name:46} {result.config.batch:>5} {rate:>9.3f} "
            f"{statistics.median(result.calls_s) * 1000:>8.0f} {rate / images_per_second(baseline):>7.2f}x "
            f"{'stock x' + str(baseline.config.batch):>8} {largest:>9.0f} {psnr:>8.1f}"
        )
        if gpu_model:
            its = statistics.median(result.step_rates)
            line += f" {1 / rate:>8.3f} {its:>9.1f}"
            if published_its:
                line += f" {its / published_its:>6.2f}x"
        line += f" {result.warmup_s:>9.1f}"
        lines.append(line)
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import diffusers

    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads){gpu}; "
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, Python {sys.version.split()[0]}"
    )


def only(configs: list[Config], parts: Sequence[str] | None) -> list[Config]:
    """Stock (always the first), the configurations whose names contain one of ``parts`` (all without any), and the
    stock rows those are compared with."""
    if not parts:
        return configs
    chosen = [config for config in configs[1:] if any(part in config.name for part in parts)]
    baselines = {config.baseline for config in chosen}
    return [configs[0]] + [config for config in configs[1:] if config in chosen or config.name in baselines]


def run_cpu(args: argparse.Namespace, log: Callable[[str], None]) -> str:
    configs = cpu_configs()
    if args.quick:
        keep = {"stock diffusers", "lossless set", "lossless set, batch of 4", "DeepCache k=3 (lossy)"}
        configs = [config for config in configs if config.name in keep]
    configs = only(configs, args.only)
    if not torch.cpu._is_avx512_bf16_supported():
        # Emulated, bfloat16 runs about 30x slower than float32 (0.03x stock measured on an AVX2 EPYC): no news.
        configs = [config for config in configs if config.profile.precision != "bfloat16"]
        log("bfloat16 configurations left out: this CPU has no bfloat16 instructions")
    runners = []
    for config in configs:
        pipeline = build_tiny_pipeline("small")  # seeded: every copy has the same weights
        if config.profile.precision != "float32":
            pipeline = pipeline.to(dtype=getattr(torch, config.profile.precision))
        runners.append(Runner(config, pipeline, device="cpu", sync=lambda: None))
    size, steps = 128, args.steps
    log(f"CPU: the small built-in model, {size}x{size}, {steps} steps, guidance 7.5, DDIM; {args.rounds} rounds")
    results = measure(runners, rounds=args.rounds, per_round=4, size=size, steps=steps, log=log)
    return "images: the small built-in model, 128x128, 20 steps, guidance 7.5, DDIM\n" + table(results)


def run_media(args: argparse.Namespace, section: str, log: Callable[[str], None]) -> str:
    """The tiny video or audio model: stock diffusers' pipeline against the engine, in one process."""
    configs = only(media_configs(), args.only)
    if args.quick:
        configs = [config for config in configs if "compile" not in config.name]
    build = build_tiny_video_pipeline if section == "video" else build_tiny_audio_pipeline
    runners = [MediaRunner(config, build("tiny")) for config in configs]  # seeded: the same weights in every copy
    steps = args.media_steps
    if section == "video":
        title = f"video: the tiny LTX-Video, 64x64, 16 frames (17 made) at 8 fps, {steps} steps, guidance 3"
        make, label, peak = video_requests, "videos/s", 255.0
    else:
        title = f"audio: the tiny Stable Audio Open, 2 s at 16 kHz stereo, {steps} steps, guidance 7"
        make, label, peak = audio_requests, "clips/s", 32767.0
    log(f"CPU, {title}; {args.rounds} rounds")
    results = measure(runners, rounds=args.rounds, per_round=4, steps=steps, make_requests=make, log=log)
    difference_label = "max|dpx|" if section == "video" else "max|d16|"
    return f"{title}\n" + table(results, outputs=label, difference_label=difference_label, peak=peak)


def run_gpu(args: argparse.Namespace, log: Callable[[str], None], *, dry_run: bool = False) -> str:
    if not dry_run:
        return "\n\n".join(gpu_sections(args, log, dry_run=False))
    # The dry run compiles with Dynamo's capture alone (Inductor's code generation would take many minutes on a CPU):
    # at toy size it meets what compiling the real architectures meets in Dynamo (graph breaks under fullgraph,
    # guards, recompile limits), at no speed. CUDA graphs stay off: there is no GPU.
    with mock.patch.object(torch, "compile", functools.partial(torch.compile, backend="eager")):
        return "\n\n".join(gpu_sections(args, log, dry_run=True))


def gpu_sections(args: argparse.Namespace, log: Callable[[str], None], *, dry_run: bool) -> list[str]:
    device = "cpu" if dry_run else "cuda"
    dtype = torch.float32 if dry_run else torch.float16

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def release() -> None:
        # Pipelines with compiled modules hold reference cycles, and Dynamo's cache keeps frozen weights (full
        # compilation) alive past their model: without this, each section's engines stay on the GPU beside the
        # next section's (an SDXL engine is about 6 GiB).
        gc.collect()
        torch._dynamo.reset()
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()

    sections = []
    for name in args.architectures:
        size = 64 if dry_run else NATIVE_SIZE[name]
        steps = 2 if dry_run else args.steps
        base = build_architecture(name, device=device, dtype=dtype, scale=10 if dry_run else 1)
        # The engine changes only the UNet and the VAE (fused projections, memory format, compilation, SDXL's VAE in
        # float32): every copy shares the stock pipeline's text encoders and tokenizers (SDXL's: 1.5 GiB a copy).
        shared = {
            id(module): module
            for module in (base.text_encoder, getattr(base, "text_encoder_2", None), base.tokenizer)
            if module is not None
        }
        for batch in (1, 2) if dry_run else args.batches:
            configs = gpu_configs(batch)
            configs = only(configs, args.only)
            if dry_run:
                # Float32 on a CPU: the dry run checks the path, not the speed.
                configs = [replace(c, profile=replace(c.profile, precision="float32")) for c in configs]
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            runners = [
                Runner(config, base if index == 0 else copy.deepcopy(base, dict(shared)), device=device, sync=sync)
                for index, config in enumerate(configs)
            ]
            log(f"{name}: {size}x{size}, {steps} steps, guidance 7.5, batch {batch}")
            results = measure(
                runners, rounds=1 if dry_run else args.rounds, per_round=batch, size=size, steps=steps, log=log
            )
            title, published = PUBLISHED_H100_ITS[name]
            note = " DRY RUN at toy size on a CPU: float32, Dynamo's capture only, no CUDA graphs;" if dry_run else ""
            memory = (
                f"; peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB on the GPU" if device == "cuda" else ""
            )
            comparable = (
                f"published: {title} {published} it/s on an H100, batch 1; target {TARGET_S_PER_IMAGE[name]} s/image"
                if batch == 1
                else f"it/s: steps of {batch} images, not comparable with {title}'s batch-1 {published} it/s"
            )
            sections.append(
                f"{name} architecture,{note} {size}x{size}, {steps} steps, guidance 7.5, batch {batch} "
                f"({comparable}{memory})\n"
                + table(results, gpu_model=name, published_its=published if batch == 1 else None)
            )
            del runners
            release()
        del base, shared
        release()
    return sections


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds (CPU: 4 requests per configuration)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (CPU 20, GPU 30)")
    parser.add_argument("--quick", action="store_true", help="CPU: four configurations only")
    parser.add_argument("--only", nargs="*", help="stock and the configurations whose names contain these")
    parser.add_argument("--gpu", action="store_true", help="the SD 1.5 / SDXL benchmark on CUDA")
    parser.add_argument("--gpu-dry-run", action="store_true", help="the GPU benchmark's path at toy size on a CPU")
    parser.add_argument("--architectures", nargs="*", default=["sd15", "sdxl"])
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 8])
    parser.add_argument("--quiet", action="store_true", help="print the table only")
    parser.add_argument(
        "--sections", nargs="*", default=["images", "video", "audio"], choices=["images", "video", "audio"],
        help="CPU: which models",
    )  # fmt: skip
    parser.add_argument("--media-steps", type=int, default=10, help="denoising steps of the video and audio rows")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch's intra-op threads (0: its default, one per core)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    import diffusers.utils.logging

    diffusers.utils.logging.set_verbosity_error()
    configure_compile_cache(Path(os.environ.get("PLATFORM_DATA_DIR") or REPO / "var") / "compile-cache")
    load_before = os.getloadavg()[0]
    if args.gpu or args.gpu_dry_run:
        if args.gpu and not torch.cuda.is_available():
            parser.error("--gpu needs CUDA; --gpu-dry-run runs the same path on a CPU")
        args.steps = args.steps or 30
        body = run_gpu(args, log, dry_run=args.gpu_dry_run)
    else:
        args.steps = args.steps or 20
        sections = [run_cpu(args, log)] if "images" in args.sections else []
        sections += [run_media(args, section, log) for section in ("video", "audio") if section in args.sections]
        body = "\n\n".join(sections)
    report = (
        f"Engine benchmark on {machine()}\n"
        f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after\n\n{body}\n"
    )
    print(report)
    return report


if __name__ == "__main__":
    main()
