"""The decode of every pipeline the engine serves, done by the engine once diffusers' call has given its latents.

Past its last denoising step a request's work is done and paid for; what is left is the decode: the VAE, and what the
pipeline does to the latents before it and to the pixels or samples after it. Celery's soft time limit can land in
it. Inside diffusers' call a decode cut short cannot start over, and every job of the batch ended as a timeout, its
work thrown away and unbilled. So the pipelines run with ``output_type="latent"`` and decode here, where
`decoded_once_more` can start the decode over, once (the hard limit is a minute after the soft one).

Each function makes the same operations in the same order as its pipeline's own decode in the installed diffusers,
so an output is bit-identical to the stock call's (tests/inference/test_decoding.py compares them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

# Asked when an exception cuts short the decoding of a batch past its last step: decode it once more?
DecodeAgain = Callable[[Exception], bool]

# LTX-Video's decode timestep (the VAE's own last denoising of timestep-conditioned latents): the pipelines' default,
# which the engine does not change. Its noise scale defaults to the same value.
LTX_DECODE_TIMESTEP = 0.0

Decoded = TypeVar("Decoded")


def decoded_once_more(decode: Callable[[], Decoded], decode_again: DecodeAgain | None) -> Decoded:
    """What `decode()` gives. An exception that cuts it short is put to `decode_again`; answered True (a soft time
    limit, with time left before the hard one), the decode starts over, once: a second exception goes on up."""
    try:
        return decode()
    except Exception as exc:
        if decode_again is None or not decode_again(exc):
            raise
    return decode()


@torch.no_grad()
def decode_images(pipe: Any, latents: torch.Tensor, generators: Sequence[torch.Generator]) -> list[Image.Image]:
    """Stable Diffusion 1.x/2.x latents as images: the text-to-image and image-to-image pipelines' decode (the engine
    loads no safety checker, so every image is denormalized)."""
    vae = pipe.vae
    image = vae.decode(latents / vae.config.scaling_factor, return_dict=False, generator=list(generators))[0]
    images: list[Image.Image] = pipe.image_processor.postprocess(
        image, output_type="pil", do_denormalize=[True] * image.shape[0]
    )
    return images


@torch.no_grad()
def decode_video(
    pipe: Any,
    latents: torch.Tensor,
    *,
    num_frames: int,
    height: int,
    width: int,
    generators: Sequence[torch.Generator],
) -> np.ndarray:
    """LTX-Video's packed latents as clips of floats in [0, 1], one (frames, height, width, 3) array per row: the
    text-to-video and image-to-video pipelines' decode for a call of `num_frames` frames of `height` x `width`.

    A VAE conditioned on the timestep draws noise from the call's generators, as the pipeline left them after its
    loop: from copies of them, so that a decode started over draws the same noise. It is drawn per row, as text to
    video draws it (image to video draws it for a single generator, which is the same noise: it runs alone).
    """
    temporal, spatial = pipe.vae_temporal_compression_ratio, pipe.vae_spatial_compression_ratio
    latents = pipe._unpack_latents(
        latents,
        (num_frames - 1) // temporal + 1,
        height // spatial,
        width // spatial,
        pipe.transformer_spatial_patch_size,
        pipe.transformer_temporal_patch_size,
    )
    vae = pipe.vae
    latents = pipe._denormalize_latents(latents, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
    # The pipeline casts to its prompt embeddings' dtype: the text encoder's, which the engine's always are.
    latents = latents.to(pipe.text_encoder.dtype)
    timestep: torch.Tensor | None = None
    if vae.config.timestep_conditioning:
        rows, device = latents.shape[0], latents.device
        copies = [torch.Generator(device=generator.device).set_state(generator.get_state()) for generator in generators]
        noise = randn_tensor(latents.shape, generator=copies, device=device, dtype=latents.dtype)
        timestep = torch.tensor([LTX_DECODE_TIMESTEP] * rows, device=device, dtype=latents.dtype)
        noise_scale = torch.tensor([LTX_DECODE_TIMESTEP] * rows, device=device, dtype=latents.dtype)[
            :, None, None, None, None
        ]
        latents = (1 - noise_scale) * latents + noise_scale * noise
    # Text to video casts to the VAE's dtype here, image to video does not: with every module in one dtype, as the
    # engine loads them, the cast changes nothing.
    latents = latents.to(vae.dtype)
    video = vae.decode(latents, timestep, return_dict=False)[0]
    frames: np.ndarray = pipe.video_processor.postprocess_video(video, output_type="np")
    return frames


@torch.no_grad()
def decode_audio(pipe: Any, latents: torch.Tensor, *, seconds: float) -> np.ndarray:
    """Stable Audio's latents as clips of float32 samples, one (channels, samples) array per row: the pipeline's
    decode, cut to the `seconds` asked from the start (its denoising always fills the model's whole length)."""
    audio = pipe.vae.decode(latents).sample
    audio = audio[:, :, 0 : int(seconds * pipe.vae.config.sampling_rate)]
    samples: np.ndarray = audio.cpu().float().numpy()
    return samples
