"""Previews of a run in progress: the latents turned into a small RGB picture without the VAE.

Stable Diffusion's latents are close to a linear function of colour: projecting their four channels onto RGB with
one 4x3 matrix (and, for SDXL, a bias) gives a blurry but faithful picture of what the VAE would decode. These are
the factors ComfyUI's "latent2rgb" previews use (`comfy/latent_formats.py`), fitted on the real VAEs, applied as
ComfyUI applies them: to the latents as the UNet sees them, the result mapped from [-1, 1] to [0, 255]. A model with
other latents gets a fixed projection of its channels onto R, G and B in turn (grey below three): a picture of the
latents' structure rather than their colours, still a real image of the latents' size. The built-in tiny models keep
SD's four channels and get SD's factors; with random weights the picture is noise, but it is the picture a real
model's factors draw.

A preview has two halves. ``latents_to_rgb`` runs where the run is (one small matrix product on the device, and a
copy of h x w x 3 bytes to the host); ``Preview.encoded`` upscales and encodes that to a small JPEG, and can run on
any thread (the worker runs it beside the engine, not in its loop). ``python -m tests.bench.previews`` prints what
each half costs.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from inference.engine.outputs import EncodedImage, encode_image

# The longest side of a preview image, in pixels: latents are upscaled (bilinear) toward the output's size up to it.
PREVIEW_MAX_SIDE = 256
PREVIEW_FORMAT = "jpeg"
PREVIEW_QUALITY = 70

# Rows: latent channels; columns: R, G, B.
SD_FACTORS = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
SDXL_FACTORS = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
SDXL_BIAS = (0.1084, -0.0175, -0.0011)


@dataclass(frozen=True)
class LatentProjection:
    """Latent channels to RGB: ``rgb = latents . factors + bias``, per pixel."""

    factors: tuple[tuple[float, float, float], ...]
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @classmethod
    def for_latents(cls, channels: int, *, xl: bool = False) -> LatentProjection:
        if channels == len(SD_FACTORS):
            return cls(SDXL_FACTORS, SDXL_BIAS) if xl else cls(SD_FACTORS)
        if channels < 1:
            raise ValueError("latents need at least one channel")
        if channels < 3:  # grey: every channel feeds every colour
            return cls(((0.5 / channels,) * 3,) * channels)
        # Channel c feeds colour c mod 3, every colour receiving the same total weight.
        per_colour = [len(range(colour, channels, 3)) for colour in range(3)]
        rows = []
        for channel in range(channels):
            colour = channel % 3
            weight = 0.5 / per_colour[colour]
            rows.append(tuple(weight if index == colour else 0.0 for index in range(3)))
        return cls(tuple(rows))  # type: ignore[arg-type]  # three entries per row by construction

    @classmethod
    def for_pipeline(cls, pipeline: Any) -> LatentProjection:
        """The projection for a diffusers pipeline's latents (its VAE's channels; SDXL's factors for an SDXL VAE)."""
        from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline

        channels = int(pipeline.vae.config.latent_channels)
        return cls.for_latents(channels, xl=isinstance(pipeline, StableDiffusionXLPipeline))


def latents_to_rgb(latents: torch.Tensor, projection: LatentProjection) -> np.ndarray:
    """``latents`` (batch, channels, h, w), on any device: (batch, h, w, 3) bytes on the host."""
    if latents.ndim != 4 or latents.shape[1] != len(projection.factors):
        raise ValueError(f"latents of shape {tuple(latents.shape)} do not fit {len(projection.factors)} channels")
    factors = torch.tensor(projection.factors, dtype=torch.float32, device=latents.device)
    bias = torch.tensor(projection.bias, dtype=torch.float32, device=latents.device)
    rgb = torch.einsum("bchw,cr->bhwr", latents.float(), factors) + bias
    pixels = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8)
    return pixels.cpu().numpy()


def preview_size(latent_width: int, latent_height: int, *, scale: int) -> tuple[int, int]:
    """The preview's size: the output's (``scale`` times the latents'), shrunk to fit ``PREVIEW_MAX_SIDE``, never
    smaller than the latents themselves."""
    width, height = latent_width * scale, latent_height * scale
    shrink = min(1.0, PREVIEW_MAX_SIDE / max(width, height))
    return max(latent_width, math.floor(width * shrink)), max(latent_height, math.floor(height * shrink))


@dataclass(frozen=True)
class Preview:
    """The picture of a request's images after ``step`` of ``total`` steps: one RGB array per image."""

    step: int
    total: int
    pixels: list[np.ndarray]
    # The size each image is shown at (width, height).
    size: tuple[int, int]
    _encoded: list[EncodedImage] = field(default_factory=list, init=False, compare=False, repr=False)

    def encoded(self) -> list[EncodedImage]:
        """Upscaled and encoded (once): small JPEGs."""
        if not self._encoded:
            for rgb in self.pixels:
                image = Image.fromarray(rgb)
                if image.size != self.size:
                    image = image.resize(self.size, Image.Resampling.BILINEAR)
                self._encoded.append(encode_image(image, PREVIEW_FORMAT, quality=PREVIEW_QUALITY))
        return self._encoded

    def as_json(self) -> dict[str, Any]:
        """fal's image objects with data URIs, and the step they show."""
        return {
            "step": self.step,
            "total": self.total,
            "images": [
                {
                    "url": f"data:{image.content_type};base64,{base64.b64encode(image.data).decode('ascii')}",
                    "width": image.width,
                    "height": image.height,
                    "content_type": image.content_type,
                }
                for image in self.encoded()
            ],
        }


def make_preview(latents: torch.Tensor, projection: LatentProjection, *, step: int, total: int, scale: int) -> Preview:
    """The preview of every row of ``latents`` (one image each), at ``step`` of ``total``."""
    pixels = latents_to_rgb(latents, projection)
    height, width = pixels.shape[1:3]
    return Preview(step=step, total=total, pixels=list(pixels), size=preview_size(width, height, scale=scale))


OnPreview = Callable[[int, Preview], None]


@dataclass(frozen=True)
class PreviewOptions:
    """Which requests of a batch want previews, how often, and where they go.

    ``on_preview(member, preview)`` is called on the engine's thread after every ``every``-th step but the last (the
    output follows that one), for each request in ``members`` still in the batch.
    """

    every: int
    members: frozenset[int]
    on_preview: OnPreview

    def due(self, step: int, total: int) -> bool:
        return self.every > 0 and bool(self.members) and step < total and step % self.every == 0
