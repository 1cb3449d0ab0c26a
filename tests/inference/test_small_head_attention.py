"""The small-head attention kernel against PyTorch's SDPA, and the processor that puts it into a UNet."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from inference.engine import STOCK_PROFILE, ModuleOptimizations, build_tiny_pipeline
from inference.engine.attention import (
    KernelUnavailable,
    SmallHeadAttnProcessor,
    build,
    eligible,
    kernel_available,
    load,
    small_head_attention,
    use_small_head_attention,
)
from tests.bench.attention import sdpa


@pytest.fixture(autouse=True)
def _kernel() -> None:
    # A machine that runs the tests has a C compiler (torch.compile needs one too): a missing kernel is a failure.
    assert kernel_available()


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def projections(batch: int, queries: int, keys: int, heads: int, size: int, *, self_attention: bool) -> tuple:
    """Query, key and value as views of fused projections' outputs, the way the UNet's processors make them."""
    generator = torch.Generator().manual_seed(batch * 1000 + queries + keys + size)
    width = heads * size
    if self_attention:
        qkv = torch.randn(batch, queries, 3 * width, generator=generator)
        return tuple(part.unflatten(-1, (heads, size)) for part in qkv.chunk(3, dim=-1))
    query = torch.randn(batch, queries, width, generator=generator).unflatten(-1, (heads, size))
    kv = torch.randn(batch, keys, 2 * width, generator=generator)
    key, value = (part.unflatten(-1, (heads, size)) for part in kv.chunk(2, dim=-1))
    return query, key, value


@pytest.mark.parametrize("size", [8, 16])
@pytest.mark.parametrize(
    ("batch", "queries", "keys", "self_attention"),
    [(2, 256, 256, True), (8, 64, 77, False), (3, 33, 80, False), (1, 1, 1, False), (2, 100, 100, True)],
)
def test_the_kernel_gives_what_sdpa_gives(batch: int, queries: int, keys: int, self_attention: bool, size: int) -> None:
    query, key, value = projections(batch, queries, keys, 4, size, self_attention=self_attention)
    got = small_head_attention(query, key, value, None, size**-0.5)
    assert got.shape == (batch, queries, 4 * size)
    torch.testing.assert_close(got, sdpa(query, key, value, None), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [8, 16])
def test_a_key_bias_is_added_and_masked_keys_weigh_nothing(size: int) -> None:
    query, key, value = projections(4, 64, 80, 8, size, self_attention=False)
    bias = torch.randn(4, 80)
    bias[:, 77:] = -10000.0  # diffusers' padding mask, as the engine passes it for padded text tokens
    got = small_head_attention(query, key, value, bias, size**-0.5)
    torch.testing.assert_close(got, sdpa(query, key, value, bias), atol=1e-5, rtol=1e-5)
    # What the masked keys hold changes nothing.
    key, value = key.clone(), value.clone()
    key[:, 77:], value[:, 77:] = 100.0, -100.0
    torch.testing.assert_close(small_head_attention(query, key, value, bias, size**-0.5), got, atol=0, rtol=0)


@pytest.mark.parametrize("lowest", [torch.finfo(torch.float32).min, -1e30])
def test_a_row_whose_keys_are_all_masked_averages_them_as_sdpa_does(lowest: float) -> None:
    # 13 keys: three more pad them to a multiple of eight inside the kernel, and those must not win either.
    query, key, value = projections(2, 5, 13, 4, 8, self_attention=False)
    bias = torch.full((2, 13), lowest)
    got = small_head_attention(query, key, value, bias, 8**-0.5)
    torch.testing.assert_close(got, sdpa(query, key, value, bias), atol=1e-5, rtol=1e-5)
    assert got.abs().max() > 0.01


@pytest.mark.parametrize("where", ["query", "key", "value", "bias"])
def test_a_nan_comes_out_as_nan_as_with_sdpa(where: str) -> None:
    query, key, value = (part.clone() for part in projections(1, 4, 16, 2, 8, self_attention=False))
    bias = torch.zeros(1, 16)
    {"query": query, "key": key, "value": value, "bias": bias}[where].view(-1)[0] = math.nan
    got = small_head_attention(query, key, value, bias, 8**-0.5)
    expected = sdpa(query, key, value, bias)
    assert got.isnan().any()
    assert torch.equal(got.isnan(), expected.isnan())


def test_no_keys_attend_to_nothing() -> None:
    query = torch.randn(2, 3, 4, 8)
    empty = torch.randn(2, 0, 4, 8)
    assert torch.equal(small_head_attention(query, empty, empty, None, 0.3), torch.zeros(2, 3, 32))


def test_the_result_does_not_depend_on_the_number_of_threads(one_thread: None) -> None:
    query, key, value = projections(2, 96, 96, 8, 16, self_attention=True)
    alone = small_head_attention(query, key, value, None, 0.25)
    torch.set_num_threads(2)
    torch.testing.assert_close(small_head_attention(query, key, value, None, 0.25), alone, atol=0, rtol=0)


def test_contiguous_and_strided_inputs_agree() -> None:
    query, key, value = projections(2, 40, 40, 8, 8, self_attention=True)
    assert not query.is_contiguous()
    strided = small_head_attention(query, key, value, None, 0.3)
    contiguous = small_head_attention(query.contiguous(), key.contiguous(), value.contiguous(), None, 0.3)
    torch.testing.assert_close(strided, contiguous, atol=0, rtol=0)
    # Heads not D apart (a transposed view) are copied into place first.
    transposed = query.transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(small_head_attention(transposed, key, value, None, 0.3), strided, atol=0, rtol=0)
    # One set of keys and values broadcast over the batch (stride 0 between batches).
    shared_key, shared_value = key[:1].expand_as(key), value[:1].expand_as(value)
    torch.testing.assert_close(
        small_head_attention(query, shared_key, shared_value, None, 0.3),
        small_head_attention(query, shared_key.contiguous(), shared_value.contiguous(), None, 0.3),
        atol=0,
        rtol=0,
    )


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"size": 40}, "heads of [8, 16] channels"),
        ({"dtype": torch.float64}, "float32 CPU tensor"),
        ({"bias": torch.zeros(2, 5)}, "bias must be a float32 CPU tensor [2, 10]"),
        ({"bias": torch.zeros(2, 10, dtype=torch.float64)}, "not torch.float64 (2, 10) on cpu"),
        ({"keys": 9}, "do not fit"),
    ],
)
def test_what_the_kernel_cannot_take_is_refused_clearly(change: dict, problem: str) -> None:
    size = change.get("size", 8)
    query = torch.randn(2, 10, 4, size, dtype=change.get("dtype", torch.float32))
    key = torch.randn(2, 10, 4, size, dtype=query.dtype)
    value = torch.randn(2, change.get("keys", 10), 4, size, dtype=query.dtype)
    with pytest.raises(ValueError, match=re.escape(problem)):
        small_head_attention(query, key, value, change.get("bias"), 0.5)


@pytest.mark.slow  # torch.compile traces the model: the longest tests of the engine
def test_the_operator_is_registered_for_torch_compile() -> None:
    query, key, value = projections(2, 48, 77, 4, 8, self_attention=False)
    bias = torch.zeros(2, 77)
    # PyTorch's own checks: schema, fake (meta) implementation, dispatch under AOT autograd.
    torch.library.opcheck(small_head_attention, (query, key, value, bias, 0.35))

    def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return small_head_attention(query * 2, key, value, bias, 0.35) + 1

    compiled = torch.compile(attend, fullgraph=True)
    torch.testing.assert_close(compiled(query, key, value), attend(query, key, value), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("cross", [False, True])
def test_the_processor_computes_what_diffusers_sdpa_processor_does(fused: bool, cross: bool) -> None:
    torch.manual_seed(0)
    attn = Attention(64, cross_attention_dim=32 if cross else None, heads=8, dim_head=8)
    if fused:
        attn.fuse_projections()
    hidden = torch.randn(3, 50, 64)
    context = torch.randn(3, 77, 32) if cross else None
    # The UNet's padded-token mask arrives as a [B, 1, S] bias.
    mask = None
    if cross:
        mask = torch.randn(3, 1, 77)
        mask[:, :, 70:] = -10000.0
    with torch.inference_mode():
        expected = AttnProcessor2_0()(attn, hidden, context, mask)
        got = SmallHeadAttnProcessor(AttnProcessor2_0())(attn, hidden, context, mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


class _Recorder:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, attn: Attention, hidden: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        self.calls += 1
        result: torch.Tensor = AttnProcessor2_0()(attn, hidden, *args, **kwargs)
        return result


def test_the_processor_hands_back_what_the_kernel_does_not_take() -> None:
    attn = Attention(64, heads=8, dim_head=8)
    fallback = _Recorder()
    processor = SmallHeadAttnProcessor(fallback)
    with torch.inference_mode():
        processor(attn, torch.randn(2, 16, 64))
        assert fallback.calls == 0
        processor(attn.to(torch.float64), torch.randn(2, 16, 64, dtype=torch.float64))
        # A mask per query is not a bias per key.
        processor(attn.to(torch.float32), torch.randn(2, 16, 64), None, torch.zeros(2, 16, 16))
    assert fallback.calls == 2


def test_only_modules_diffusers_runs_on_sdpa_at_sdpa_scale_are_eligible() -> None:
    plain = Attention(64, heads=8, dim_head=8)
    assert eligible(plain)
    # Without scaling the scores, diffusers keeps its classic processor (SDPA would scale them).
    assert not eligible(Attention(64, heads=8, dim_head=8, scale_qk=False))
    assert not eligible(Attention(64, heads=2, dim_head=32))
    assert not eligible(Attention(64, heads=8, dim_head=8, processor=AttnProcessor()))
    assert not eligible(Attention(64, heads=8, dim_head=8, residual_connection=True))
    # A profile with `sdpa: false` asks for classic attention everywhere.
    classic = replace(STOCK_PROFILE, sdpa=False, small_head_attention=True)
    assert not ModuleOptimizations.of(classic).small_head_attention
    assert ModuleOptimizations.of(replace(classic, sdpa=True)).small_head_attention


def test_the_engine_puts_small_heads_on_the_kernel_and_leaves_the_others() -> None:
    # The tiny model: 32 and 64 channels over 8 heads, heads of 4 (SDPA) and 8 (the kernel) channels.
    unet = build_tiny_pipeline("tiny").unet
    sizes = {
        name: module.inner_dim // module.heads for name, module in unet.named_modules() if isinstance(module, Attention)
    }
    switched = use_small_head_attention(unet)
    on_kernel = {
        name
        for name, module in unet.named_modules()
        if isinstance(module, Attention) and isinstance(module.processor, SmallHeadAttnProcessor)
    }
    assert switched == len(on_kernel) > 0
    assert on_kernel == {name for name, size in sizes.items() if size == 8}
    assert {sizes[name] for name in sizes.keys() - on_kernel} == {4}


def test_a_build_failure_says_why(tmp_path: Path) -> None:
    with pytest.raises(KernelUnavailable, match="no-such-compiler"):
        build(tmp_path, compiler="no-such-compiler")
    with pytest.raises(KernelUnavailable, match="failed"):
        build(tmp_path, compiler="false")
    assert not any(tmp_path.iterdir())


def test_a_build_is_reused_and_new_flags_build_anew(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = build(tmp_path)
    built = first.stat().st_mtime_ns
    assert build(tmp_path) == first
    assert first.stat().st_mtime_ns == built
    monkeypatch.setattr("inference.engine.attention.BASE_FLAGS", ["-O2", "-fPIC", "-shared", "-fopenmp"])
    second = build(tmp_path)
    assert second != first
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([first.name, second.name])


def test_the_baseline_build_gives_what_the_tuned_one_gives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A CPU PyTorch finds neither AVX2 nor AVX-512 on gets the plain build: the same C, other instructions.
    query, key, value = projections(2, 40, 77, 8, 16, self_attention=False)
    bias = torch.randn(2, 77)
    bias[0, 0] = math.nan
    tuned = small_head_attention(query, key, value, bias, 0.25)
    monkeypatch.setattr("inference.engine.attention.ISA_FLAGS", {})
    baseline = load(build(tmp_path))
    monkeypatch.setattr("inference.engine.attention._kernel", lambda: baseline)
    plain = small_head_attention(query, key, value, bias, 0.25)
    assert plain[0].isnan().all()
    torch.testing.assert_close(plain[1], tuned[1], atol=1e-6, rtol=1e-6)
