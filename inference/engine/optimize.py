"""Optimizations applied to a loaded pipeline's modules: attention kernels, fused projections, memory format,
torch.compile (with a persistent cache) and CUDA graphs.

Each is lossless in the sense that matters here: the same arithmetic, rearranged, so images move by float rounding
only (measured by `make bench-engine`). Half precision is chosen at load time (`LoadOptions.dtype`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from inference.engine.profile import OptimizationProfile

logger = logging.getLogger(__name__)

COMPILE_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
# Graphs Dynamo may keep for one compiled function (its default, 8, is reached by SD 1.5's regional compilation
# with three batch sizes; `compiling`). Past it a `fullgraph` compile fails the call.
RECOMPILE_LIMIT = 64


@dataclass(frozen=True)
class ModuleOptimizations:
    """The part of a profile that changes the modules themselves: pipelines are cached per value of it."""

    sdpa: bool = True
    channels_last: bool = False
    fuse_qkv: bool = False
    small_head_attention: bool = False
    compile: Literal["off", "regional", "full"] = "off"
    cuda_graphs: bool = False

    @classmethod
    def of(cls, profile: OptimizationProfile) -> ModuleOptimizations:
        return cls(
            sdpa=profile.sdpa,
            channels_last=profile.channels_last,
            # The fused processor is an SDPA processor: without SDPA the projections stay apart.
            fuse_qkv=profile.fuse_qkv and profile.sdpa,
            # It stands in for SDPA where heads are small: `sdpa: false` (classic attention) keeps it out.
            small_head_attention=profile.small_head_attention and profile.sdpa,
            compile=profile.compile,
            cuda_graphs=profile.cuda_graphs,
        )


def configure_compile_cache(folder: str | Path) -> Path:
    """Keep what torch.compile produces (Inductor's FX graph and kernel caches, Triton's) under `folder`.

    A worker that starts again, or a second worker on the machine, then loads compiled code instead of compiling.
    An explicit TORCHINDUCTOR_CACHE_DIR in the environment wins. (Inductor writes its default, a temporary
    folder, into the environment the first time it looks: that one is replaced.)
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get(COMPILE_CACHE_ENV)
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ[COMPILE_CACHE_ENV] = os.path.abspath(folder)
    path = Path(os.environ[COMPILE_CACHE_ENV])
    path.mkdir(parents=True, exist_ok=True)
    return path


def apply_module_optimizations(pipeline: Any, optimizations: ModuleOptimizations) -> None:
    """Switch `pipeline`'s UNet and VAE to the optimized forms, in place."""
    unet, vae = pipeline.unet, pipeline.vae
    if not optimizations.sdpa:
        unet.set_attn_processor(AttnProcessor())
        vae.set_attn_processor(AttnProcessor())
    elif optimizations.fuse_qkv:
        unet.fuse_qkv_projections()
    else:
        unet.set_attn_processor(AttnProcessor2_0())  # type: ignore[no-untyped-call]  # untyped in diffusers
    if optimizations.small_head_attention and unet.device.type == "cpu":
        # Imported here: the kernel's module reads this one's cache folder setting.
        from inference.engine.attention import use_small_head_attention

        switched = use_small_head_attention(unet)
        logger.info("small-head attention kernel on %d attention modules", switched)
    if optimizations.channels_last:
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    if optimizations.compile == "regional":
        # Regional compilation: only the repeated transformer blocks, compiled once and shared by every instance,
        # so a compile takes seconds rather than minutes.
        unet.compile_repeated_blocks(fullgraph=True)
    elif optimizations.compile == "full":
        unet.compile(fullgraph=True)
        vae.decoder.compile(fullgraph=True)


def compiling(optimizations: ModuleOptimizations) -> AbstractContextManager[Any]:
    """The context every call of compiled modules runs in: for full compilation, Inductor's freezing switched on.

    Frozen weights are constants to Inductor: it folds them and fuses the activations that follow into the
    convolutions and linear layers that use them. Dynamo reads the switch when it traces (the
    first call of each shape), before `torch.compile(options=...)` would reach Inductor, so passing it there does
    nothing (pytorch/pytorch#139272); it has to be in force around the call. Freezing applies only where gradients
    are off, as they always are in the engine.

    Regional compilation is never frozen. Frozen, every parameter is guarded by identity, so each instance of the
    repeated block is a graph of its own: SD 1.5 has 16 of them and SDXL 70, and past Dynamo's `recompile_limit`
    (8) the ninth instance fails outright under `fullgraph=True` (FailOnRecompileLimitHit). Unfrozen, the weights
    are graph inputs and one compiled block serves every instance of its shapes.

    Dynamo's recompile limit is raised around the calls (`RECOMPILE_LIMIT`). Even unfrozen, a block's channel
    width is fixed by its weights, a batch of one row is always specialized, and a batch size seen second turns
    dynamic: SD 1.5's three widths make three graphs per kind of batch, and the ninth graph (two rows with
    guidance, one without, then four) failed a request outright. Frozen full compilation adds graphs per model.

    Weights are not pre-packed on a CPU (`cpp.weight_prepack` off): oneDNN-packed weights cannot be stored in
    Inductor's graph cache ("mkldnn tensors unpickleable"), so with them every worker start compiled afresh
    (about 60 s for the small model) and without them it loads in about 17 s, at the same speed (a batch of four,
    20 steps: 1634 ms packed, 1639 ms not, interleaved; identical images).
    """
    if optimizations.compile == "off":
        return nullcontext()
    return _compile_switches(frozen=optimizations.compile == "full")


@contextmanager
def _compile_switches(*, frozen: bool) -> Iterator[None]:
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    with dynamo_config.patch(recompile_limit=max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)):
        if frozen:
            with inductor_config.patch({"freezing": True, "cpp.weight_prepack": False}):
                yield
        else:
            yield


# The CPU flash-attention kernel's fast path wants key lengths in multiples of 16: with CLIP's 77 text tokens it
# runs 1.4x (SD 1.5 and SDXL shapes) to 2.5x (heads of 8) slower than with 80 (`make bench-engine` notes).
TEXT_TOKEN_MULTIPLE = 16


def pad_text_tokens(embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text embeddings padded with zero tokens to a multiple of 16, and the UNet's `encoder_attention_mask` for them.

    The mask (1: a real token, 0: padding) becomes a bias of -10000 on the padded keys inside the UNet, so their
    attention weights are exactly zero and cross-attention computes what it did on the unpadded tokens, up to the
    order of a float sum. None for the mask when nothing needed padding.
    """
    rows, tokens = embeddings.shape[:2]
    padded = -(-tokens // TEXT_TOKEN_MULTIPLE) * TEXT_TOKEN_MULTIPLE
    if padded == tokens:
        return embeddings, None
    mask = torch.zeros(rows, padded, dtype=embeddings.dtype, device=embeddings.device)
    mask[:, :tokens] = 1
    return torch.nn.functional.pad(embeddings, (0, 0, 0, padded - tokens)), mask


class CudaGraphUNet:
    """The UNet's forward replayed as a captured CUDA graph, one per input shape.

    Diffusion calls the UNet with the same shapes at every step, so after one capture each step is a single graph
    launch instead of hundreds of kernel launches from Python. Inputs are copied into the graph's static buffers.
    The output buffer is the graph's own and the next replay (of this shape, or of another sharing the memory
    pool) overwrites it, so callers get a copy: schedulers keep model outputs across steps (PNDM's `ets`, which
    without guidance is the UNet's output itself), and a kept buffer would silently change under them.

    Capture, copies and replays run in inference mode whatever the caller's grad mode: the static buffers are then
    inference tensors, which a later run under plain `no_grad` (an endpoint with `inference_mode: false` sharing
    the warm model) could not copy into.
    """

    def __init__(self, unet: torch.nn.Module, *, warmup_runs: int = 2) -> None:
        self.unet = unet
        self.warmup_runs = warmup_runs
        self._graphs: dict[tuple[Any, ...], _Captured] = {}
        self._pool: Any = None
        self._lock = threading.Lock()

    @property
    def captured_shapes(self) -> int:
        return len(self._graphs)

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        # The timestep is a graph input like the others: on the GPU, never a number baked into the capture.
        timestep = torch.as_tensor(timestep, device=sample.device)
        inputs = {"sample": sample, "timestep": timestep, "encoder_hidden_states": encoder_hidden_states}
        for name, tensor in (added_cond_kwargs or {}).items():
            inputs[f"added.{name}"] = tensor
        key = tuple((name, tuple(tensor.shape), tensor.dtype) for name, tensor in sorted(inputs.items()))
        with self._lock:
            with torch.inference_mode():
                captured = self._graphs.get(key)
                if captured is None:
                    captured = self._graphs[key] = self._capture(inputs)
                for name, tensor in inputs.items():
                    captured.inputs[name].copy_(tensor)
                captured.graph.replay()
            return captured.output.clone()

    def _forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        added = {name.removeprefix("added."): value for name, value in inputs.items() if name.startswith("added.")}
        return self.unet(
            inputs["sample"],
            inputs["timestep"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            added_cond_kwargs=added or None,
            return_dict=False,
        )[0]

    def _capture(self, inputs: dict[str, torch.Tensor]) -> _Captured:
        static = {name: tensor.detach().clone() for name, tensor in inputs.items()}
        # Streams, the memory pool and the graph belong to the current device: the UNet's, on a machine of several.
        with torch.cuda.device(static["sample"].device):
            # Warm up on a side stream (lazy initialisations, autotuning, compiled regions) before capturing.
            side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup_runs):
                    self._forward(static)
            torch.cuda.current_stream().wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                output = self._forward(static)
        logger.info("captured a CUDA graph of the UNet for %s", {name: tuple(t.shape) for name, t in static.items()})
        return _Captured(graph=graph, inputs=static, output=output)


@dataclass
class _Captured:
    graph: Any
    inputs: dict[str, torch.Tensor]
    output: torch.Tensor
