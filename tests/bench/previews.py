"""What a streamed request's previews cost (`inference.engine.previews`).

    python -m tests.bench.previews [--rounds 50] [--run-rounds 5]

First each half of one preview, on latents of the published shapes (Stable Diffusion 1.5 at 512x512: 4x64x64;
SDXL at 1024x1024: 4x128x128), one image and four: the projection to RGB bytes (on the device, with the copy to
the host: the engine's thread pays it) and the upscale and JPEG encoding (the worker's heartbeat thread pays it).
Then the whole cost inside a run: the `small` built-in model (128x128, 20 steps, guidance 7.5, DDIM), with a preview
every 2 steps and without, calls alternating; the difference per preview, and against one denoising step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from inference.engine import (
    STOCK_PROFILE,
    Engine,
    GenerationRequest,
    LatentProjection,
    ModuleOptimizations,
    Preview,
    PreviewOptions,
    build_tiny_pipeline,
    make_preview,
)
from inference.engine import engine as engine_module
from tests.bench.engine import machine

SHAPES = [("SD 1.5, 512x512", 64, False), ("SDXL, 1024x1024", 128, True)]


def median_ms(call: Callable[[], object], rounds: int) -> float:
    call()
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        call()
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


def halves(device: torch.device, rounds: int) -> list[str]:
    lines = [
        f"  {'latents':<20} {'images':>6} {'device':>6} {'project ms':>10} {'encode ms':>10} {'JPEG bytes':>10}",
    ]
    for name, side, xl in SHAPES:
        projection = LatentProjection.for_latents(4, xl=xl)
        for images in (1, 4):
            latents = torch.randn(images, 4, side, side, generator=torch.Generator().manual_seed(0)).to(device)

            def project(latents: torch.Tensor = latents, projection: LatentProjection = projection) -> object:
                return make_preview(latents, projection, step=1, total=2, scale=8)

            project_ms = median_ms(project, rounds)
            preview = make_preview(latents, projection, step=1, total=2, scale=8)

            def encode(preview: Preview = preview) -> object:
                # A fresh preview each time: `encoded` keeps what it made.
                return Preview(step=1, total=2, pixels=preview.pixels, size=preview.size).encoded()

            encode_ms = median_ms(encode, rounds)
            size = sum(len(image.data) for image in preview.encoded()) // images
            lines.append(f"  {name:<20} {images:>6} {device.type:>6} {project_ms:>10.3f} {encode_ms:>10.3f} {size:>10}")
    return lines


def in_a_run(rounds: int, every: int) -> list[str]:
    engine = Engine(build_tiny_pipeline("small"), optimizations=ModuleOptimizations.of(STOCK_PROFILE))
    request = GenerationRequest(
        prompts=["a lighthouse at dusk"], seeds=[7], width=128, height=128, num_inference_steps=20, guidance_scale=7.5
    )
    # The time the run spends on previews, measured where it is spent: the projection inside the engine's loop (its
    # `make_preview`, timed in place) and the encoding in the callback.
    spent = {"project": 0.0, "encode": 0.0, "count": 0}

    def timed_make_preview(*args: Any, **kwargs: Any) -> Preview:
        began = time.perf_counter()
        try:
            return make_preview(*args, **kwargs)
        finally:
            spent["project"] += time.perf_counter() - began

    def encode_here(member: int, preview: Preview) -> None:
        began = time.perf_counter()
        preview.encoded()  # both halves on the engine's thread: the most a run can pay
        spent["encode"] += time.perf_counter() - began
        spent["count"] += 1

    engine_module.make_preview = timed_make_preview  # type: ignore[assignment]  # a benchmark's own probe
    options = PreviewOptions(every=every, members=frozenset({0}), on_preview=encode_here)
    engine.run(request)  # warm up
    plain, previewed = [], []
    for _ in range(rounds):
        for series, previews in ((plain, None), (previewed, options)):
            began = time.perf_counter()
            engine.run(request, previews=previews)
            series.append((time.perf_counter() - began) * 1000)
    engine_module.make_preview = make_preview
    without, with_previews = statistics.median(plain), statistics.median(previewed)
    step_ms = without / 20
    count = int(spent["count"])
    project_ms, encode_ms = 1000 * spent["project"] / count, 1000 * spent["encode"] / count
    per_preview = project_ms + encode_ms
    return [
        f"  `small` model, 128x128, 20 steps, median of {rounds}: {without:.1f} ms without previews, "
        f"{with_previews:.1f} ms with one every {every} steps ({count // rounds} a run)",
        f"  per preview in the run: projection {project_ms:.3f} ms + encoding {encode_ms:.3f} ms"
        f" = {per_preview:.3f} ms,",
        f"  {100 * per_preview / step_ms:.1f}% of one denoising step ({step_ms:.1f} ms); "
        f"{100 * per_preview * (count // rounds) / without:.1f}% of the run",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=50, help="calls per half of a preview (median)")
    parser.add_argument("--run-rounds", type=int, default=5, help="runs with and without previews (median)")
    parser.add_argument("--every", type=int, default=2, help="steps between previews in the run")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    lines = [f"Preview benchmark on {machine()}", ""]
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        lines += halves(device, args.rounds)
    lines += ["", *in_a_run(args.run_rounds, args.every)]
    lines += ["", f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
