"""An endpoint's optimization profile: which engine optimizations run, checked before anything loads.

``Endpoint.optimization_profile`` stores only what an operator set; every key left out takes the default of the
device the worker runs on (`resolve`). Unknown keys and ill-typed values are refused, in the admin and again when
a worker loads the endpoint, so a typo never silently turns an optimization off. Plain Python: the web process
validates profiles without importing torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

Precision = Literal["auto", "float32", "float16", "bfloat16"]
CompileMode = Literal["off", "regional", "full"]

PRECISIONS: tuple[str, ...] = ("auto", "float32", "float16", "bfloat16")
COMPILE_MODES: tuple[str, ...] = ("off", "regional", "full")
MAX_BATCH_SIZE = 64
# "A request never waits longer than a few milliseconds for company."
MAX_BATCH_WAIT_MS = 50
MAX_PROMPT_CACHE = 4096
MAX_FEATURE_CACHE_INTERVAL = 10

# What each key does, for the admin's help text and the README.
DESCRIPTIONS: Mapping[str, str] = {
    "inference_mode": "run under torch.inference_mode (no autograd bookkeeping); lossless",
    "sdpa": "scaled-dot-product attention kernels (false: diffusers' classic attention); lossless",
    "channels_last": "NHWC memory format for the UNet and VAE convolutions; lossless",
    "fuse_qkv": "one projection for query, key and value (key and value for cross-attention); lossless",
    "pad_text_tokens": "pad the text embeddings to a multiple of 16 tokens (77 -> 80, the extra keys masked out): "
    "the CPU attention kernel is 1.4-2.5x faster on them (CPU only; ignored on CUDA); lossless",
    "small_head_attention": "attention heads of 8 or 16 channels (the built-in models) run in the engine's own "
    "kernel, up to 2.9x faster than PyTorch's there; other heads keep SDPA (CPU only; ignored on CUDA); lossless",
    "precision": "auto (float16 on CUDA, float32 on CPU), float32, float16 or bfloat16",
    "compile": "torch.compile: off, regional (the repeated transformer blocks) or full (UNet and VAE decoder, "
    "weights frozen); compiled code is kept in a persistent cache",
    "cuda_graphs": "replay the UNet as a captured CUDA graph per shape (CUDA only; ignored on CPU)",
    "prompt_cache": "keep text-encoder outputs of recent prompts (entries; 0: off); lossless",
    "max_batch_size": "images of compatible queued requests run as one pipeline call (1: no batching)",
    "batch_wait_ms": "how long a request waits for company before its batch starts, at most: only while requests "
    "arrive faster than a batch runs",
    "feature_cache_interval": "LOSSY: reuse the UNet's deep features, recomputing them every k steps "
    "(DeepCache); 0: off",
}


class ProfileError(ValueError):
    """The profile names an unknown optimization or gives one a value it cannot take."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True, kw_only=True)
class OptimizationProfile:
    """Every optimization with a concrete value: what a worker actually runs. Hashable."""

    inference_mode: bool = True
    sdpa: bool = True
    channels_last: bool = False
    fuse_qkv: bool = True
    pad_text_tokens: bool = True
    small_head_attention: bool = True
    precision: Precision = "float32"
    compile: CompileMode = "off"
    cuda_graphs: bool = False
    prompt_cache: int = 64
    max_batch_size: int = 4
    batch_wait_ms: int = 2
    feature_cache_interval: int = 0

    @property
    def lossy(self) -> bool:
        """Whether outputs may move beyond float rounding from stock diffusers' (half precision counts as lossless)."""
        return self.feature_cache_interval > 1

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


# The stock stack as diffusers ships it, for comparisons: no engine optimization at all (SDPA is diffusers' default).
STOCK_PROFILE = OptimizationProfile(
    inference_mode=False,
    fuse_qkv=False,
    pad_text_tokens=False,
    small_head_attention=False,
    prompt_cache=0,
    max_batch_size=1,
    batch_wait_ms=0,
)

_KEYS = tuple(field.name for field in fields(OptimizationProfile))
_BOOLEANS = (
    "inference_mode",
    "sdpa",
    "channels_last",
    "fuse_qkv",
    "pad_text_tokens",
    "small_head_attention",
    "cuda_graphs",
)
_INTEGERS: Mapping[str, tuple[int, int]] = {
    "prompt_cache": (0, MAX_PROMPT_CACHE),
    "max_batch_size": (1, MAX_BATCH_SIZE),
    "batch_wait_ms": (0, MAX_BATCH_WAIT_MS),
    "feature_cache_interval": (0, MAX_FEATURE_CACHE_INTERVAL),
}
_CHOICES: Mapping[str, tuple[str, ...]] = {"precision": PRECISIONS, "compile": COMPILE_MODES}


def validate_profile(raw: Any) -> dict[str, Any]:
    """The stored profile, checked: a JSON object of known keys with values of the right type and range.

    Raises `ProfileError` listing every problem at once.
    """
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ProfileError([f"the profile must be a JSON object, not {type(raw).__name__}"])
    problems: list[str] = []
    for key, value in raw.items():
        if key not in _KEYS:
            problems.append(f"unknown optimization {key!r}; known: {', '.join(_KEYS)}")
        elif key in _BOOLEANS:
            if not isinstance(value, bool):
                problems.append(f"{key} must be true or false")
        elif key in _INTEGERS:
            low, high = _INTEGERS[key]
            # bool is an int in Python; `true` is not a batch size.
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                problems.append(f"{key} must be a whole number from {low} to {high}")
        elif value not in _CHOICES[key]:
            problems.append(f"{key} must be one of {', '.join(_CHOICES[key])}")
    if raw.get("feature_cache_interval") == 1:
        problems.append("feature_cache_interval 1 recomputes every step: use 0 to switch it off")
    if problems:
        raise ProfileError(problems)
    return dict(raw)


def device_defaults(device: str) -> OptimizationProfile:
    """What an endpoint that sets nothing runs on this device.

    On CUDA: half precision, regional compilation and CUDA graphs, batches of up to 8. On a CPU, the lossless set
    that pays off there without a warm-up: fused projections, text embeddings padded for the attention kernel, the
    small-head attention kernel, the prompt cache, batches of up to 4. Compiling is
    opt-in on a CPU, since every new shape costs a compile of tens of seconds. Lossy feature caching is always opt-in.
    """
    if device.startswith("cuda"):
        return OptimizationProfile(
            precision="float16",
            compile="regional",
            cuda_graphs=True,
            pad_text_tokens=False,
            small_head_attention=False,
            max_batch_size=8,
            batch_wait_ms=5,
        )
    return OptimizationProfile()


def resolve(raw: Any, *, device: str) -> OptimizationProfile:
    """The stored profile over the device's defaults, with what the device cannot do switched off.

    Raises `ProfileError` for a profile `validate_profile` refuses.
    """
    overrides = validate_profile(raw)
    values = {**device_defaults(device).as_json(), **overrides}
    cuda = device.startswith("cuda")
    if values["precision"] == "auto":
        values["precision"] = "float16" if cuda else "float32"
    if cuda:
        values["pad_text_tokens"] = False
        values["small_head_attention"] = False
    else:
        values["cuda_graphs"] = False
    return OptimizationProfile(**values)
