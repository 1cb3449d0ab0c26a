"""Feature caching across denoising steps (DeepCache, Ma et al. 2023): a lossy, opt-in speed-up.

Between neighbouring steps the UNet's deep features barely change. Every `interval` steps the whole UNet runs and
the input of its last up block (everything below the first level) is kept; the steps in between run only the
shallow path (conv_in, the first down block, the last up block, conv_out) on the kept features. The forward below
mirrors diffusers' `UNet2DConditionModel.forward` for plain SD 1.x / SDXL UNets (no ControlNet, adapters or image
masks; a text-token mask is passed on as stock passes it), so a refreshing step computes exactly what the stock
forward does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class FeatureCache:
    """The deep features of one run, and when to recompute them."""

    interval: int
    features: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.interval < 2:
            raise ValueError("a feature cache needs an interval of at least 2 steps")

    def refresh_due(self, step_index: int) -> bool:
        return self.features is None or step_index % self.interval == 0

    def predict(self, forward: Any, unet: Any, *args: Any, step_index: int, **kwargs: Any) -> torch.Tensor:
        """`forward` is `cached_unet_forward` or a compiled version of it (which sees only tensors and a flag)."""
        refresh = self.refresh_due(step_index)
        prediction, features = forward(unet, *args, features=None if refresh else self.features, **kwargs)
        self.features = features
        return prediction

    def keep_rows(self, rows: torch.Tensor) -> None:
        """The batch lost some rows (a request left it): drop theirs from the kept features too."""
        if self.features is not None:
            self.features = self.features.index_select(0, rows.to(self.features.device))


def check_supported(unet: Any) -> None:
    """Refuse UNets whose forward this module does not mirror."""
    config = unet.config
    unsupported = {
        "class_embed_type": config.class_embed_type,
        "time_cond_proj_dim": config.time_cond_proj_dim,
        "center_input_sample": config.center_input_sample or None,
        "addition_embed_type (other than text_time)": (
            config.addition_embed_type if config.addition_embed_type not in (None, "text_time") else None
        ),
    }
    named = [name for name, value in unsupported.items() if value is not None]
    if named:
        raise ValueError(f"feature caching does not support UNets with {', '.join(named)}")
    if len(unet.up_blocks) < 2:
        raise ValueError("feature caching needs a UNet of at least two levels")


def cached_unet_forward(
    unet: Any,
    sample: torch.Tensor,
    timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    *,
    features: torch.Tensor | None,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's noise prediction and the deep features it used: recomputed when `features` is None.

    `encoder_attention_mask` (1: a text token to attend to, 0: padding) is turned into a bias as stock does.
    """
    refresh = features is None  # a refreshing step: the whole UNet runs
    deep: torch.Tensor
    added = added_cond_kwargs or {}
    upsample_factor = 2**unet.num_upsamplers
    forward_upsample_size = any(size % upsample_factor != 0 for size in sample.shape[-2:])

    t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
    emb = unet.time_embedding(t_emb, None)
    aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added)
    emb = emb + aug_emb if aug_emb is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    encoder_hidden_states = unet.process_encoder_hidden_states(
        encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added
    )
    text_bias = None
    if encoder_attention_mask is not None:
        text_bias = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)

    def run(block: Any, *args: Any, **kwargs: Any) -> Any:
        # Blocks with attention take the text embeddings; the others do not accept them.
        if getattr(block, "has_cross_attention", False):
            kwargs["encoder_hidden_states"] = encoder_hidden_states
            kwargs["encoder_attention_mask"] = text_bias
        return block(*args, **kwargs)

    sample = unet.conv_in(sample)
    residuals: tuple[torch.Tensor, ...] = (sample,)
    for block in unet.down_blocks if refresh else unet.down_blocks[:1]:
        sample, block_residuals = run(block, hidden_states=sample, temb=emb)
        residuals += block_residuals

    if features is None:
        if unet.mid_block is not None:
            sample = run(unet.mid_block, sample, emb)
        for block in unet.up_blocks[:-1]:
            block_residuals = residuals[-len(block.resnets) :]
            residuals = residuals[: -len(block.resnets)]
            upsample_size = residuals[-1].shape[2:] if forward_upsample_size else None
            sample = run(
                block,
                hidden_states=sample,
                temb=emb,
                res_hidden_states_tuple=block_residuals,
                upsample_size=upsample_size,
            )
        deep = sample
    else:
        deep = features
    # The last up block takes the first level's residuals: conv_in's output and the first down block's.
    last_block = unet.up_blocks[-1]
    block_residuals = residuals[: len(last_block.resnets)]
    sample = run(last_block, hidden_states=deep, temb=emb, res_hidden_states_tuple=block_residuals, upsample_size=None)

    if unet.conv_norm_out is not None:
        sample = unet.conv_norm_out(sample)
        sample = unet.conv_act(sample)
    result: torch.Tensor = unet.conv_out(sample)
    return result, deep
