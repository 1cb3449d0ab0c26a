"""Stable Diffusion 1.5 and SDXL pipelines built from their published configurations, with random weights.

For the GPU benchmark: the real architectures (every layer, every width) so that speed is what the real models
would get, without downloading anything. The dictionaries are the `config.json` files of
runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-xl-base-1.0, written out. `scale` divides every
width (and the number of attention heads) for a dry run on a CPU: the same structure at toy size.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from transformers.models.clip.configuration_clip import CLIPTextConfig
from transformers.models.clip.modeling_clip import CLIPTextModel, CLIPTextModelWithProjection

from inference.engine.tiny import build_scheduler, build_tokenizer, quiet

SD15_UNET: Mapping[str, Any] = MappingProxyType(
    {
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": (320, 640, 1280, 1280),
        "center_input_sample": False,
        "cross_attention_dim": 768,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 64,
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    }
)

SD15_VAE: Mapping[str, Any] = MappingProxyType(
    {
        "act_fn": "silu",
        "block_out_channels": (128, 256, 512, 512),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 512,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "scaling_factor": 0.18215,
    }
)

# CLIP ViT-L/14's text tower (SD 1.5's text encoder, and SDXL's first).
CLIP_L_TEXT: Mapping[str, Any] = MappingProxyType(
    {
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
    }
)

SDXL_UNET: Mapping[str, Any] = MappingProxyType(
    {
        "act_fn": "silu",
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        "attention_head_dim": (5, 10, 20),
        "block_out_channels": (320, 640, 1280),
        "center_input_sample": False,
        "cross_attention_dim": 2048,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "downsample_padding": 1,
        "dual_cross_attention": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "projection_class_embeddings_input_dim": 2816,
        "resnet_time_scale_shift": "default",
        "sample_size": 128,
        "transformer_layers_per_block": (1, 2, 10),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "use_linear_projection": True,
    }
)

SDXL_VAE: Mapping[str, Any] = MappingProxyType(
    {**SD15_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
)

# OpenCLIP ViT-bigG/14's text tower (SDXL's second text encoder, with its projection).
CLIP_BIGG_TEXT: Mapping[str, Any] = MappingProxyType(
    {
        "vocab_size": 49408,
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 20,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
        "projection_dim": 1280,
    }
)

ARCHITECTURES = ("sd15", "sdxl")
# The size each architecture was trained at.
NATIVE_SIZE = MappingProxyType({"sd15": 512, "sdxl": 1024})


def _scaled_unet(config: Mapping[str, Any], scale: int) -> dict[str, Any]:
    scaled = dict(config)
    if scale == 1:
        return scaled
    scaled["block_out_channels"] = tuple(width // scale for width in config["block_out_channels"])
    heads = config["attention_head_dim"]
    scaled["attention_head_dim"] = (
        tuple(max(1, head // 5) for head in heads) if isinstance(heads, tuple) else max(1, heads // 4)
    )
    scaled["cross_attention_dim"] = config["cross_attention_dim"] // scale
    if "projection_class_embeddings_input_dim" in config:
        scaled["addition_time_embed_dim"] = config["addition_time_embed_dim"] // scale
        # Six micro-conditioning numbers, each embedded, then the second text encoder's pooled projection.
        pooled = _scaled_text(CLIP_BIGG_TEXT, scale)["projection_dim"]
        scaled["projection_class_embeddings_input_dim"] = 6 * scaled["addition_time_embed_dim"] + pooled
    return scaled


def _scaled_vae(config: Mapping[str, Any], scale: int) -> dict[str, Any]:
    scaled = dict(config)
    if scale > 1:
        # Group norm works in groups of 32 channels.
        widths = config["block_out_channels"]
        scaled["block_out_channels"] = tuple(max(32, width // scale // 32 * 32) for width in widths)
        scaled["layers_per_block"] = 1
    return scaled


def _scaled_text(config: Mapping[str, Any], scale: int) -> dict[str, Any]:
    scaled = dict(config)
    if scale > 1:
        scaled["hidden_size"] = config["hidden_size"] // scale
        scaled["intermediate_size"] = config["intermediate_size"] // scale
        scaled["projection_dim"] = config["projection_dim"] // scale
        scaled["num_attention_heads"] = 4
        scaled["num_hidden_layers"] = 2
    return scaled


def _text_config(config: Mapping[str, Any], tokenizer: Any) -> CLIPTextConfig:
    return CLIPTextConfig(
        **config,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_architecture(
    name: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32, scale: int = 1, seed: int = 0
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """`sd15` or `sdxl` with seeded random weights, built directly on `device` (no copy through host memory).

    `scale` 10 makes a dry-run model: widths divided by 10, the same blocks and layers (text encoders cut to two).
    The tokenizer is the built-in models' offline CLIP tokenizer: its ids fit the real vocabulary.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    tokenizer = build_tokenizer()
    xl = name == "sdxl"
    # The CPU generator is restored after; on CUDA, modules are initialised by (and reseed) the CUDA generator.
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**_scaled_unet(SDXL_UNET if xl else SD15_UNET, scale))
        vae = AutoencoderKL(**_scaled_vae(SDXL_VAE if xl else SD15_VAE, scale))
        text_encoder = CLIPTextModel(_text_config(_scaled_text(CLIP_L_TEXT, scale), tokenizer))
        text_encoder_2 = (
            CLIPTextModelWithProjection(_text_config(_scaled_text(CLIP_BIGG_TEXT, scale), tokenizer)) if xl else None
        )
    modules: list[torch.nn.Module] = [unet, vae, text_encoder] + ([text_encoder_2] if text_encoder_2 else [])
    for module in modules:
        module.train(False)
        if dtype != torch.float32:
            module.to(dtype=dtype)
    components: dict[str, Any]
    if xl:
        # Through a dict: diffusers annotates `scheduler` as an enum.
        components = {
            "vae": vae,
            "text_encoder": text_encoder,
            "text_encoder_2": text_encoder_2,
            "tokenizer": tokenizer,
            "tokenizer_2": tokenizer,
            "unet": unet,
            "scheduler": build_scheduler(),
        }
        return quiet(StableDiffusionXLPipeline(**components, add_watermarker=False))
    components = {
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "unet": unet,
        "scheduler": build_scheduler(),
        "safety_checker": None,
        "feature_extractor": None,
    }
    return quiet(StableDiffusionPipeline(**components, requires_safety_checker=False))
