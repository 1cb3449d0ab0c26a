"""Built-in tiny Stable Diffusion models: the real diffusers architecture, random weights, built from config.

No machine here can download weights, so the built-in models are made on the spot. A fixed seed makes
every process build bit-identical weights; the outputs are noise, but every line of the real pipeline runs.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import torch

# From the defining modules: diffusers' and transformers' package namespaces are lazy, and under type
# checking they resolve to placeholder classes.
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from transformers.models.clip.configuration_clip import CLIPTextConfig
from transformers.models.clip.modeling_clip import CLIPTextModel
from transformers.models.clip.tokenization_clip import CLIPTokenizer

PipelineT = TypeVar("PipelineT", bound=DiffusionPipeline)

# Stable Diffusion's text encoder reads 77 tokens, start and end markers included.
TOKENIZER_MAX_LENGTH = 77
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
_END_OF_WORD = "</w>"

# A few English merges so that common words become single tokens, as they do in CLIP's real vocabulary.
_MERGES: tuple[tuple[str, str], ...] = (
    ("t", "h"),
    ("th", "e</w>"),
    ("a", "n"),
    ("an", "d</w>"),
    ("i", "n"),
    ("in", "g</w>"),
    ("o", "f</w>"),
    ("o", "n</w>"),
    ("e", "r</w>"),
    ("a", "t</w>"),
)


@dataclass(frozen=True, kw_only=True)
class TinyPreset:
    """How big a built-in model is. Channel tuples follow diffusers' `block_out_channels`."""

    name: str
    unet_channels: tuple[int, ...]
    unet_layers_per_block: int = 2
    unet_attention_heads: int = 8
    text_hidden_size: int
    text_layers: int
    text_heads: int = 4
    vae_channels: tuple[int, int, int, int]
    vae_layers_per_block: int = 1
    # The size a request gets when it names none (UNet sample_size x the VAE's factor of 8).
    default_image_size: int
    seed: int = 0


PRESETS: Mapping[str, TinyPreset] = MappingProxyType(
    {
        # Fast enough for unit tests: a 64x64 image in 4 steps takes well under a second on a laptop CPU.
        "tiny": TinyPreset(
            name="tiny",
            unet_channels=(32, 64),
            text_hidden_size=32,
            text_layers=2,
            vae_channels=(32, 32, 32, 32),
            default_image_size=64,
        ),
        # The size the benchmarks use (128x128, 20 steps): big enough that optimizations show.
        "small": TinyPreset(
            name="small",
            unet_channels=(64, 128),
            text_hidden_size=64,
            text_layers=4,
            vae_channels=(32, 64, 128, 128),
            default_image_size=128,
        ),
    }
)

# SD 1.x's latent space: 4 channels, 8x smaller than the image (four VAE levels), scaled by 0.18215.
_LATENT_CHANNELS = 4
_VAE_SCALING_FACTOR = 0.18215


def byte_level_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE (GPT-2, CLIP) uses for the 256 byte values, in CLIP's order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    code_points = list(printable)
    for byte in range(256):
        if byte not in printable:
            # Bytes that are spaces or control characters borrow a printable code point above 255.
            code_points.append(256 + len(code_points) - len(printable))
    return [chr(code_point) for code_point in code_points]


def tiny_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A valid CLIP vocabulary in CLIP's own order: bytes, bytes ending a word, merges, then the two markers.

    Every byte is a token, so any prompt in any script tokenizes (as bytes where no merge applies).
    """
    alphabet = byte_level_alphabet()
    tokens = [*alphabet, *(char + _END_OF_WORD for char in alphabet), *("".join(pair) for pair in _MERGES)]
    tokens += [START_OF_TEXT, END_OF_TEXT]
    return {token: index for index, token in enumerate(tokens)}, list(_MERGES)


def build_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer made offline: the vocabulary files are written to a temporary folder and read back."""
    vocab, merges = tiny_vocabulary()
    with tempfile.TemporaryDirectory(prefix="tiny-clip-tokenizer-") as folder:
        vocab_file = Path(folder, "vocab.json")
        merges_file = Path(folder, "merges.txt")
        vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
        return CLIPTokenizer(
            vocab=str(vocab_file),
            merges=str(merges_file),
            model_max_length=TOKENIZER_MAX_LENGTH,
        )


def build_scheduler() -> DDIMScheduler:
    """DDIM with Stable Diffusion 1.x's noise schedule."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


def build_tiny_pipeline(preset: str | TinyPreset = "tiny") -> StableDiffusionPipeline:
    """A text-to-image StableDiffusionPipeline with seeded random weights, on the CPU in float32.

    The global RNG is seeded inside `fork_rng`, so callers' random state is left as it was.
    """
    spec = PRESETS[preset] if isinstance(preset, str) else preset
    tokenizer = build_tokenizer()
    levels = len(spec.unet_channels)
    with torch.random.fork_rng(devices=[]):
        # Only the CPU generator: the modules are built on the CPU (and no CUDA state is touched).
        torch.default_generator.manual_seed(spec.seed)
        unet = UNet2DConditionModel(
            sample_size=spec.default_image_size // 8,
            in_channels=_LATENT_CHANNELS,
            out_channels=_LATENT_CHANNELS,
            block_out_channels=spec.unet_channels,
            layers_per_block=spec.unet_layers_per_block,
            # As in SD 1.x: cross-attention at every level but the lowest-resolution one.
            down_block_types=(*("CrossAttnDownBlock2D",) * (levels - 1), "DownBlock2D"),
            up_block_types=("UpBlock2D", *("CrossAttnUpBlock2D",) * (levels - 1)),
            cross_attention_dim=spec.text_hidden_size,
            attention_head_dim=spec.unet_attention_heads,
        )
        vae = AutoencoderKL(
            sample_size=spec.default_image_size,
            in_channels=3,
            out_channels=3,
            latent_channels=_LATENT_CHANNELS,
            block_out_channels=spec.vae_channels,
            layers_per_block=spec.vae_layers_per_block,
            down_block_types=("DownEncoderBlock2D",) * len(spec.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(spec.vae_channels),
            scaling_factor=_VAE_SCALING_FACTOR,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=spec.text_hidden_size,
                intermediate_size=spec.text_hidden_size * 4,
                num_hidden_layers=spec.text_layers,
                num_attention_heads=spec.text_heads,
                max_position_embeddings=TOKENIZER_MAX_LENGTH,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    # Modules are built in training mode; `from_pretrained` would switch them to inference mode, so do the same.
    components: dict[str, Any] = {
        "vae": vae.train(False),
        "text_encoder": text_encoder.train(False),
        "tokenizer": tokenizer,
        "unet": unet.train(False),
        "scheduler": build_scheduler(),
        "safety_checker": None,
        "feature_extractor": None,
    }
    # Through a dict: diffusers annotates `scheduler` as an enum and the optional parts as required.
    return quiet(StableDiffusionPipeline(**components, requires_safety_checker=False))


def quiet(pipeline: PipelineT) -> PipelineT:
    """No tqdm progress bar: progress goes to the caller's `on_step`, not to stderr."""
    pipeline.set_progress_bar_config(disable=True)  # type: ignore[no-untyped-call]  # untyped in diffusers
    return pipeline
