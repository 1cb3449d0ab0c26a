"""The small-head attention kernel against PyTorch's SDPA on the attention layers of the `small` built-in model.

    python -m tests.bench.attention [--rounds 200]

One UNet call for a batch of four requests with guidance has 8 rows: at the 16x16 level 256 queries over heads of
8 channels (self-attention over 256 keys, cross-attention over the 77 text tokens, or 80 of them padded and
masked), in the middle block 64 queries over heads of 16. Both kernels get the same tensors, laid out as the UNet's
fused projections leave them; calls alternate, and the medians are printed with the largest difference.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from inference.engine.attention import kernel_available, small_head_attention

# (name, rows, queries, keys, heads, head size, padded keys masked)
SHAPES = [
    ("self-attention, 256 tokens, heads of 8", 8, 256, 256, 8, 8, False),
    ("cross-attention, 77 text tokens, heads of 8", 8, 256, 77, 8, 8, False),
    ("cross-attention, 80 tokens (3 masked), heads of 8", 8, 256, 80, 8, 8, True),
    ("self-attention, 64 tokens, heads of 16", 8, 64, 64, 8, 16, False),
    ("cross-attention, 77 text tokens, heads of 16", 8, 64, 77, 8, 16, False),
]


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The reference: PyTorch's attention on the kernel's [B, tokens, H, D] tensors, as [B, L, H * D]."""
    mask = None if bias is None else bias[:, None, None, :]
    out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), mask)
    return out.transpose(1, 2).flatten(2)


def compare(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None, *, rounds: int
) -> tuple[float, float, float]:
    """Median milliseconds of SDPA and of the kernel, calls alternating, and their largest difference."""
    scale = query.shape[-1] ** -0.5
    calls: list[Callable[[], torch.Tensor]] = [
        lambda: sdpa(query, key, value, bias),
        lambda: small_head_attention(query, key, value, bias, scale),
    ]
    difference = float((calls[0]() - calls[1]()).abs().max())
    for _ in range(10):
        for call in calls:
            call()
    times: list[list[float]] = [[], []]
    for _ in range(rounds):
        for call, series in zip(calls, times, strict=True):
            began = time.perf_counter()
            call()
            series.append((time.perf_counter() - began) * 1000)
    return statistics.median(times[0]), statistics.median(times[1]), difference


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args(argv)
    if not kernel_available():
        parser.error("the kernel could not be built here (see the log)")
    generator = torch.Generator().manual_seed(0)
    lines = [
        f"{torch.backends.cpu.get_cpu_capability()} CPU, {torch.get_num_threads()} threads; median of {args.rounds}",
        f"  {'layer':52} {'SDPA ms':>8} {'kernel ms':>9} {'speedup':>8} {'max|diff|':>10}",
    ]
    with torch.inference_mode():
        for name, rows, queries, keys, heads, size, masked in SHAPES:
            width = heads * size
            query = torch.randn(rows, queries, width, generator=generator).view(rows, queries, heads, size)
            key, value = (
                part.view(rows, keys, heads, size)
                for part in torch.randn(rows, keys, 2 * width, generator=generator).chunk(2, dim=-1)
            )
            bias = None
            if masked:
                bias = torch.zeros(rows, keys)
                bias[:, 77:] = -10000.0
            sdpa_ms, kernel_ms, difference = compare(query, key, value, bias, rounds=args.rounds)
            lines.append(
                f"  {name:52} {sdpa_ms:>8.3f} {kernel_ms:>9.3f} {sdpa_ms / kernel_ms:>7.2f}x {difference:>10.1e}"
            )
    report = "\n".join(lines)
    print(report)
    return report


if __name__ == "__main__":
    main()
