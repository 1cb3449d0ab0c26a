"""The small-head attention kernel: attention for heads of 8 or 16 channels on a CPU (2.5-2.9x PyTorch's on 8).

PyTorch's CPU flash-attention kernel works in matrix-multiply blocks, which with heads this narrow (the built-in
models: 64 or 128 channels over 8 heads) are mostly overhead. `kernels/small_head_attention.c` computes a row of
scores at a time instead. It is compiled on first use with the machine's C compiler for the instruction set PyTorch
detected (AVX-512, AVX2 or the baseline), kept in the compile cache's folder under a name that changes with the
source and the flags, and called through ctypes inside a PyTorch custom operator, so `torch.compile` graphs it like
any other op. Where it cannot be built (no compiler) the engine says so in its log and keeps SDPA.

`use_small_head_attention(unet)` gives every eligible attention module of a UNet a processor that runs the kernel
and hands anything else (another dtype or device, an unusual mask) back to the processor it replaced. Heads of 40
or 64 channels (Stable Diffusion 1.5, SDXL) stay on SDPA, which is the faster there.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, FusedAttnProcessor2_0

from inference.engine.optimize import COMPILE_CACHE_ENV

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "kernels" / "small_head_attention.c"
HEAD_SIZES = frozenset({8, 16})
# What GCC and Clang target for each of PyTorch's CPU capabilities (exactly the extensions PyTorch checked for: an
# -march level would also assume others, BMI2 for one, that a virtual machine may hide); the baseline builds anywhere.
ISA_FLAGS = {
    "AVX512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq"],
    "AVX2": ["-mavx2", "-mfma"],
}
BASE_FLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=fast", "-std=gnu11"]


class KernelUnavailable(RuntimeError):
    """The kernel could not be built or loaded here."""


def build_flags() -> list[str]:
    return [*BASE_FLAGS, *ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])]


def kernel_folder() -> Path:
    """Beside torch.compile's cache (the engine configures it: `configure_compile_cache`), else under ~/.cache."""
    configured = os.environ.get(COMPILE_CACHE_ENV)
    return (Path(configured) if configured else Path.home() / ".cache" / "platform") / "kernels"


def _private_folder(folder: Path) -> None:
    """Create `folder` for this user only, and refuse one that someone else could have put a library into."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    status = folder.stat()
    if status.st_uid != os.getuid() or status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise KernelUnavailable(f"{folder} is not this user's alone: no library is loaded from it")


def build(folder: Path, *, compiler: str | None = None) -> Path:
    """The kernel's shared library in `folder`, compiled unless a build of the same source and flags is there.

    Raises `KernelUnavailable` with the compiler's complaint when the build fails.
    """
    command = shlex.split(compiler or os.environ.get("CC") or "cc")
    flags = build_flags()
    source = SOURCE.read_bytes()
    recipe = "\0".join([platform.machine(), *command, *flags]).encode()
    target = folder / f"small_head_attention-{hashlib.sha256(source + recipe).hexdigest()[:16]}.so"
    _private_folder(folder)
    if target.exists():
        return target
    # Built beside the target under a name of its own and renamed into place: concurrent builds and crashes never
    # leave half a library where it would be loaded.
    handle, name = tempfile.mkstemp(dir=folder, prefix=f".{target.stem}.", suffix=".partial")
    os.close(handle)
    partial = Path(name)
    command = [*command, *flags, str(SOURCE), "-o", str(partial)]
    try:
        finished = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)  # noqa: S603
        if finished.returncode != 0:
            raise KernelUnavailable(f"{shlex.join(command)} failed: {finished.stderr.strip()[-2000:]}")
        partial.replace(target)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise KernelUnavailable(f"{shlex.join(command)}: {error}") from error
    finally:
        partial.unlink(missing_ok=True)
    return target


def load(path: Path) -> Any:
    library = ctypes.CDLL(str(path))
    function = library.small_head_attention
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 12 + [ctypes.c_float, ctypes.c_int]
    return function


@functools.cache
def _kernel() -> Any:
    return load(build(kernel_folder()))


def kernel_available() -> bool:
    """Whether the kernel is built and loaded (building it now if it has not been); logs why not when it is not."""
    try:
        _kernel()
    except (KernelUnavailable, OSError) as error:
        logger.warning("small-head attention kernel unavailable, SDPA stays: %s", error)
        return False
    return True


def _token_major(tensor: torch.Tensor, name: str) -> torch.Tensor:
    if tensor.dim() != 4 or tensor.dtype != torch.float32 or tensor.device.type != "cpu":
        raise ValueError(f"{name} must be a float32 CPU tensor [batch, tokens, heads, head size]")
    heads, size = tensor.shape[2], tensor.shape[3]
    if tensor.stride(3) != 1 or (heads > 1 and tensor.stride(2) != size):
        tensor = tensor.contiguous()
    return tensor


@torch.library.custom_op("platform_engine::small_head_attention", mutates_args=())
def small_head_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """softmax(query key^T * scale + bias) value per head.

    query [B, L, H, D], key and value [B, S, H, D] (D 8 or 16; any strides between tokens and batches), bias None or
    [B, S] (added to the scores of each key); returns [B, L, H * D].
    """
    query, key, value = (_token_major(t, n) for t, n in ((query, "query"), (key, "key"), (value, "value")))
    batch, queries, heads, size = query.shape
    keys = key.shape[1]
    if size not in HEAD_SIZES:
        raise ValueError(f"the small-head kernel takes heads of {sorted(HEAD_SIZES)} channels, not {size}")
    if key.shape != value.shape or key.shape[0] != batch or key.shape[2:] != query.shape[2:]:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} do not fit query {tuple(query.shape)}")
    if bias is not None:
        if bias.shape != (batch, keys) or bias.dtype != torch.float32 or bias.device.type != "cpu":
            raise ValueError(
                f"bias must be a float32 CPU tensor [{batch}, {keys}], not {bias.dtype} {tuple(bias.shape)} "
                f"on {bias.device}"
            )
        bias = bias.contiguous()
    out = query.new_empty((batch, queries, heads * size))
    if out.numel() == 0 or keys == 0:
        # No keys: nothing to attend to, as SDPA answers.
        return out.zero_()
    status = _kernel()(
        query.data_ptr(),
        key.data_ptr(),
        value.data_ptr(),
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        batch,
        heads,
        queries,
        keys,
        size,
        query.stride(0),
        query.stride(1),
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        0 if bias is None else bias.stride(0),
        scale,
        torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("the small-head attention kernel could not allocate its buffers")
    return out


@small_head_attention.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None, scale: float) -> Any:
    batch, queries, heads, size = query.shape
    return query.new_empty((batch, queries, heads * size))


def head_size(attn: Attention) -> int:
    return int(attn.inner_dim // attn.heads)


def eligible(attn: Attention) -> bool:
    """What the processor below computes: plain multi-head attention (no extra norms or projections) at SDPA's
    scale, where diffusers runs its SDPA processors (anything else, an IP-Adapter's processor say, is left alone)."""
    return (
        isinstance(attn.processor, AttnProcessor2_0 | FusedAttnProcessor2_0)
        and head_size(attn) in HEAD_SIZES
        and attn.scale_qk
        and attn.spatial_norm is None
        and attn.group_norm is None
        and attn.norm_q is None
        and attn.norm_k is None
        and getattr(attn, "add_k_proj", None) is None
        and not attn.residual_connection
        and attn.rescale_output_factor == 1.0
    )


class SmallHeadAttnProcessor:
    """diffusers' SDPA processors' computation (fused projections or not), with the kernel doing the attention."""

    def __init__(self, fallback: Any) -> None:
        self.fallback = fallback

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        batch = hidden_states.shape[0]
        bias = None if attention_mask is None else _key_bias(attention_mask, batch)
        if (
            hidden_states.dim() != 3
            or hidden_states.dtype != torch.float32
            or hidden_states.device.type != "cpu"
            or (attention_mask is not None and bias is None)
        ):
            result: torch.Tensor = self.fallback(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
            return result
        fused = getattr(attn, "fused_projections", False)
        if encoder_hidden_states is None:
            if fused:
                query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
            else:
                query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        else:
            if attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            query = attn.to_q(hidden_states)
            if fused:
                key, value = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
            else:
                key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        size = key.shape[-1] // attn.heads
        query = query.unflatten(-1, (attn.heads, size))
        key = key.unflatten(-1, (attn.heads, size))
        value = value.unflatten(-1, (attn.heads, size))
        # SDPA's default scale, as diffusers' SDPA processors use.
        out = torch.ops.platform_engine.small_head_attention(query, key, value, bias, size**-0.5)
        out = attn.to_out[0](out)
        dropout: torch.Tensor = attn.to_out[1](out)
        return dropout


def _key_bias(mask: torch.Tensor, batch: int) -> torch.Tensor | None:
    """A mask that adds one value per key for every head and query ([B, 1, S] or [B, S]) as [B, S]; else None."""
    if mask.dtype != torch.float32:
        return None
    if mask.dim() == 3 and mask.shape[0] == batch and mask.shape[1] == 1:
        return mask[:, 0, :]
    if mask.dim() == 2 and mask.shape[0] == batch:
        return mask
    return None


def use_small_head_attention(unet: torch.nn.Module) -> int:
    """Switch every eligible attention module of `unet` to the kernel; how many were switched (0 without it)."""
    modules = [module for module in unet.modules() if isinstance(module, Attention) and eligible(module)]
    if not modules or not kernel_available():
        return 0
    for module in modules:
        # diffusers types processors as a union of its own classes; any callable of that signature is one.
        module.set_processor(SmallHeadAttnProcessor(module.processor))  # type: ignore[arg-type]
    return len(modules)


class LTXSmallHeadAttnProcessor:
    """LTX-Video's attention processor's computation (RMS norms of query and key, rotary embeddings), with the kernel
    doing the attention. The tiny built-in video model has heads of 8 channels, like the image models'."""

    def __init__(self, fallback: Any) -> None:
        self.fallback = fallback

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
    ) -> torch.Tensor:
        from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

        batch = hidden_states.shape[0]
        bias = None if attention_mask is None else _key_bias(attention_mask, batch)
        if (
            hidden_states.dim() != 3
            or hidden_states.dtype != torch.float32
            or hidden_states.device.type != "cpu"
            or (attention_mask is not None and bias is None)
        ):
            result: torch.Tensor = self.fallback(
                attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb
            )
            return result
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.norm_q(attn.to_q(hidden_states))
        key = attn.norm_k(attn.to_k(context))
        value = attn.to_v(context)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb)  # type: ignore[no-untyped-call]  # untyped in diffusers
            key = apply_rotary_emb(key, image_rotary_emb)  # type: ignore[no-untyped-call]
        size = query.shape[-1] // attn.heads
        query, key, value = (tensor.unflatten(2, (attn.heads, size)) for tensor in (query, key, value))
        # SDPA's default scale, as LTX's processor uses.
        out = torch.ops.platform_engine.small_head_attention(query, key, value, bias, size**-0.5)
        out = attn.to_out[0](out)
        dropout: torch.Tensor = attn.to_out[1](out)
        return dropout


def use_small_head_attention_ltx(transformer: torch.nn.Module) -> int:
    """Switch every attention module of an LTX-Video transformer with heads of 8 or 16 channels (and as many key as
    query heads) to the kernel; how many were switched (0 without it)."""
    modules = [
        module
        for module in transformer.modules()
        if type(getattr(module, "processor", None)).__name__ == "LTXVideoAttnProcessor"
        and getattr(module, "head_dim", 0) in HEAD_SIZES
        and getattr(module, "inner_kv_dim", None) == getattr(module, "inner_dim", 0)
    ]
    if not modules or not kernel_available():
        return 0
    for module in modules:
        module.set_processor(LTXSmallHeadAttnProcessor(module.processor))  # type: ignore[operator]  # an LTXAttention
    return len(modules)
