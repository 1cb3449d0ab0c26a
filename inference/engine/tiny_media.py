"""Built-in tiny video and audio models: LTX-Video and Stable Audio Open at toy size, random weights, built from config.

As for the tiny Stable Diffusion (``tiny.py``), nothing can be downloaded here: the real diffusers architectures are
built with a fixed seed, so every process builds bit-identical weights and every line of the real pipelines runs
(the outputs are noise). Component sizes follow diffusers' own fast tests of these pipelines.

Two choices are ours, not the tests':

- LTX's video VAE gets every ``decoder_*`` argument explicitly. Left out, they take the full model's defaults
  (a 237M-parameter decoder of the wrong depth, decoding frames of another size than the encoder's).
- Its decoder is causal in time (``decoder_causal=True``, a setting of the real architecture). Then the first
  decoded frame depends on the first latent frame only, which image to video holds fixed to the encoded start image;
  with the encoder's posterior made narrow (as a trained one is: below), the video's first frame is the model's
  rendering of the start image alone, whatever the prompt and the seed.

Tokenizers are made offline too: T5's from a generated Unigram vocabulary (every printable ASCII character, alone and
starting a word, and a few common words), so any prompt tokenizes (characters outside it become ``<unk>``).
"""

from __future__ import annotations

import string
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from diffusers.models.autoencoders.autoencoder_kl_ltx import AutoencoderKLLTXVideo
from diffusers.models.autoencoders.autoencoder_oobleck import AutoencoderOobleck
from diffusers.models.transformers.stable_audio_transformer import StableAudioDiTModel
from diffusers.models.transformers.transformer_ltx import LTXVideoTransformer3DModel
from diffusers.pipelines.ltx.pipeline_ltx import LTXPipeline
from diffusers.pipelines.stable_audio.modeling_stable_audio import StableAudioProjectionModel
from diffusers.pipelines.stable_audio.pipeline_stable_audio import StableAudioPipeline
from diffusers.schedulers.scheduling_cosine_dpmsolver_multistep import CosineDPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
from transformers.models.t5.configuration_t5 import T5Config
from transformers.models.t5.modeling_t5 import T5EncoderModel
from transformers.models.t5.tokenization_t5 import T5Tokenizer

from inference.engine.tiny import quiet

# T5's fixed ids: padding 0, end of sequence 1, unknown 2 (the Unigram model's unk_id).
_T5_SPECIALS = (("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0))
_WORD_START = "▁"
# The log-variance of the tiny video VAE's posterior: a standard deviation of e^-15, as good as none.
_NARROW_LOG_VARIANCE = -30.0
_COMMON_WORDS = ("a", "the", "of", "and", "in", "on", "at", "with", "sound", "video", "light", "rain", "sea", "city")


@dataclass(frozen=True, kw_only=True)
class TinyVideoPreset:
    """How big the built-in video model is. Sizes of the frames it makes are multiples of 32 (LTX's pipeline)."""

    name: str
    text_hidden_size: int = 32
    text_layers: int = 2
    transformer_layers: int = 2
    transformer_heads: int = 4
    transformer_head_dim: int = 8
    latent_channels: int = 8
    vae_channels: tuple[int, int, int, int] = (8, 8, 8, 8)
    # Which VAE levels halve space and time: two of four, so 4x in both (a latent frame stands for 4 frames).
    vae_scaling: tuple[bool, bool, bool, bool] = (True, True, False, False)
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class TinyAudioPreset:
    """How big the built-in audio model is; how long a clip it can make is ``max_seconds`` at ``sample_rate``."""

    name: str
    text_hidden_size: int = 32
    text_layers: int = 2
    sample_rate: int = 16_000
    max_seconds: int = 8
    # The VAE's hop (samples per latent step) is the product of these: 256.
    downsampling_ratios: tuple[int, ...] = (2, 4, 4, 8)
    latent_channels: int = 8
    transformer_layers: int = 2
    transformer_heads: int = 4
    transformer_head_dim: int = 8
    seed: int = 0


VIDEO_PRESETS: Mapping[str, TinyVideoPreset] = MappingProxyType({"tiny": TinyVideoPreset(name="tiny")})
AUDIO_PRESETS: Mapping[str, TinyAudioPreset] = MappingProxyType({"tiny": TinyAudioPreset(name="tiny")})


def t5_vocabulary() -> list[tuple[str, float]]:
    """T5's specials, then word pieces with Unigram scores: whole common words first (they win over letters)."""
    characters = [char for char in string.printable if not char.isspace()]
    pieces = [*_T5_SPECIALS, (_WORD_START, -2.0)]
    pieces += [(_WORD_START + word, -1.0) for word in _COMMON_WORDS]
    pieces += [(_WORD_START + char, -3.0) for char in characters]
    pieces += [(char, -4.0) for char in characters]
    return pieces


def build_t5_tokenizer(*, max_length: int) -> T5Tokenizer:
    return T5Tokenizer(vocab=t5_vocabulary(), extra_ids=0, model_max_length=max_length)


def _t5_encoder(tokenizer: T5Tokenizer, hidden_size: int, layers: int) -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=hidden_size,
            d_kv=8,
            d_ff=hidden_size * 2,
            num_layers=layers,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )


def build_tiny_video_pipeline(preset: str | TinyVideoPreset = "tiny") -> LTXPipeline:
    """A text-to-video LTXPipeline with seeded random weights, on the CPU in float32 (image to video shares it)."""
    spec = VIDEO_PRESETS[preset] if isinstance(preset, str) else preset
    tokenizer = build_t5_tokenizer(max_length=128)
    levels = len(spec.vae_channels)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(spec.seed)
        text_encoder = _t5_encoder(tokenizer, spec.text_hidden_size, spec.text_layers)
        transformer = LTXVideoTransformer3DModel(
            in_channels=spec.latent_channels,
            out_channels=spec.latent_channels,
            patch_size=1,
            patch_size_t=1,
            num_attention_heads=spec.transformer_heads,
            attention_head_dim=spec.transformer_head_dim,
            cross_attention_dim=spec.transformer_heads * spec.transformer_head_dim,
            num_layers=spec.transformer_layers,
            caption_channels=spec.text_hidden_size,
        )
        vae = AutoencoderKLLTXVideo(
            latent_channels=spec.latent_channels,
            block_out_channels=spec.vae_channels,
            decoder_block_out_channels=spec.vae_channels,
            layers_per_block=(1,) * (levels + 1),
            decoder_layers_per_block=(1,) * (levels + 1),
            spatio_temporal_scaling=spec.vae_scaling,
            decoder_spatio_temporal_scaling=spec.vae_scaling,
            decoder_inject_noise=(False,) * (levels + 1),
            upsample_residual=(False,) * levels,
            upsample_factor=(1,) * levels,
            patch_size=1,
            patch_size_t=1,
            encoder_causal=True,
            decoder_causal=True,
        )
    with torch.no_grad():
        # A trained VAE's posterior is narrow; a random one's variance is about 1, and an encoded start image would be
        # mostly the generator's noise. Its log-variance (the encoder's last output channel) is pinned near zero
        # width instead, so the start image's latent, and the first frame decoded from it, is the image's alone.
        vae.encoder.conv_out.conv.bias[-1] = _NARROW_LOG_VARIANCE
    # The whole clip in one pass: at this size framewise coding only adds overhead.
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    components: dict[str, Any] = {
        "transformer": transformer.train(False),
        "vae": vae.train(False),
        "text_encoder": text_encoder.train(False),
        "tokenizer": tokenizer,
        "scheduler": FlowMatchEulerDiscreteScheduler(),
    }
    return quiet(LTXPipeline(**components))


def build_tiny_audio_pipeline(preset: str | TinyAudioPreset = "tiny") -> StableAudioPipeline:
    """A text-to-audio StableAudioPipeline with seeded random weights, on the CPU in float32.

    Its transformer's ``sample_size`` (latent steps) times the VAE's hop covers ``max_seconds`` at the sample rate:
    the pipeline always denoises that many steps and cuts the clip asked for out of them.
    """
    spec = AUDIO_PRESETS[preset] if isinstance(preset, str) else preset
    tokenizer = build_t5_tokenizer(max_length=64)
    hop = 1
    for ratio in spec.downsampling_ratios:
        hop *= ratio
    conditioning = spec.transformer_heads * spec.transformer_head_dim
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(spec.seed)
        text_encoder = _t5_encoder(tokenizer, spec.text_hidden_size, spec.text_layers)
        transformer = StableAudioDiTModel(
            sample_size=-(-spec.max_seconds * spec.sample_rate // hop),
            in_channels=spec.latent_channels,
            num_layers=spec.transformer_layers,
            attention_head_dim=spec.transformer_head_dim,
            num_attention_heads=spec.transformer_heads,
            num_key_value_attention_heads=spec.transformer_heads // 2,
            out_channels=spec.latent_channels,
            cross_attention_dim=conditioning,
            time_proj_dim=16,
            # The start and end of the clip, each projected to `conditioning` values, side by side.
            global_states_input_dim=2 * conditioning,
            cross_attention_input_dim=conditioning,
        )
        with warnings.catch_warnings():
            # diffusers' Oobleck still uses torch's older weight_norm, which warns at every build.
            warnings.filterwarnings("ignore", message=".*weight_norm.*", category=FutureWarning)
            vae = AutoencoderOobleck(
                encoder_hidden_size=8,
                downsampling_ratios=list(spec.downsampling_ratios),
                decoder_channels=8,
                decoder_input_channels=spec.latent_channels,
                audio_channels=2,
                channel_multiples=[1, 2, 2, 2],
                sampling_rate=spec.sample_rate,
            )
        projection_model = StableAudioProjectionModel(
            text_encoder_dim=spec.text_hidden_size,
            conditioning_dim=conditioning,
            min_value=0,
            max_value=spec.max_seconds,
        )
    components: dict[str, Any] = {
        "transformer": transformer.train(False),
        "vae": vae.train(False),
        "text_encoder": text_encoder.train(False),
        "tokenizer": tokenizer,
        "projection_model": projection_model.train(False),
        # Stable Audio Open's scheduler (its SDE noise comes from torchsde).
        "scheduler": CosineDPMSolverMultistepScheduler(
            solver_order=2, prediction_type="v_prediction", sigma_data=1.0, sigma_schedule="exponential"
        ),
    }
    return quiet(StableAudioPipeline(**components))
