"""The caches themselves: storage, byte accounting, the KIVI quantization layout and its error."""

from __future__ import annotations

import pytest
import torch

from optrun.runtime.kvcache import cache as kv
from optrun.runtime.kvcache.acceptance import ERROR_MAX, SCALE_OVERHEAD
from optrun.runtime.model import PRESETS, ModelConfig

TINY = PRESETS["tiny-lm"]
FP8_OK, FP8_WHY = kv.fp8_supported("cpu")
QUANT = [
    "int8",
    pytest.param("fp8", marks=pytest.mark.skipif(not FP8_OK, reason=f"fp8 unsupported: {FP8_WHY}")),
]


def _kv(b: int = 2, h: int = 4, t: int = 96, d: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys with a few outlier channels (as LLM keys have, per KIVI) and plain values."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, h, t, d, generator=g)
    k[..., [3, 17]] *= 12.0  # outlier channels
    v = torch.randn(b, h, t, d, generator=g)
    return k, v


def test_dense_cache_returns_exactly_what_was_stored_across_chunks():
    cache = kv.make_cache(TINY, 2, 40, "fp32")
    k, v = _kv(t=40, d=TINY.head_dim)
    cache.update(1, k[:, :, :25], v[:, :, :25], 0)
    k_all, v_all = cache.update(1, k[:, :, 25:], v[:, :, 25:], 25)
    assert torch.equal(k_all, k) and torch.equal(v_all, v)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16", "int8", "fp8"])
def test_allocated_bytes_equal_the_computed_layout(dtype):
    if dtype == "fp8" and not FP8_OK:
        pytest.skip(f"fp8 unsupported: {FP8_WHY}")
    cache = kv.make_cache(TINY, 3, 200, dtype)
    assert cache.nbytes() == kv.cache_bytes(TINY, 3, 200, dtype)
    assert cache.bytes_per_token() == pytest.approx(cache.nbytes() / (3 * 200))


def test_int8_cache_stores_at_most_half_the_fp16_bytes_per_token_plus_its_scales():
    fp32, fp16, int8 = (kv.bytes_per_token(TINY, d) for d in ("fp32", "fp16", "int8"))
    # Codes alone are exactly half of fp16; the fp16 scales add 2.3 % on the tiny-lm (cache.py).
    assert int8 / fp16 <= 0.5 * (1 + SCALE_OVERHEAD)
    assert int8 / fp32 <= 0.25 * (1 + SCALE_OVERHEAD)
    assert int8 / fp16 == pytest.approx(0.5117, abs=1e-3)
    assert fp16 / fp32 == 0.5


def test_int8_cache_fits_at_least_1_9x_the_fp16_batch_in_the_same_budget():
    budget = 64 * 2**20
    for context in (64, 256, 512):
        b16 = kv.largest_batch(TINY, context, "fp16", budget)
        b8 = kv.largest_batch(TINY, context, "int8", budget)
        assert b8 >= 1.9 * b16, (context, b8, b16)
        assert (
            kv.cache_bytes(TINY, b8, context, "int8")
            <= budget
            < kv.cache_bytes(TINY, b8 + 1, context, "int8")
        )


@pytest.mark.parametrize("dtype", ["fp16", "bf16", *QUANT])
@pytest.mark.parametrize("stream", [False, True], ids=["prefill", "streamed"])
def test_reconstruction_error_stays_within_the_codes_bound(dtype, stream):
    k, v = _kv()
    err = kv.reconstruction_error(k, v, dtype, stream=stream, block=32)
    assert 0.0 < err["key"] <= ERROR_MAX[dtype], err
    assert 0.0 < err["value"] <= ERROR_MAX[dtype], err


@pytest.mark.parametrize("dtype", QUANT)
def test_keys_are_quantized_per_channel_so_an_outlier_channel_spares_the_others(dtype):
    k, v = _kv(b=1)
    out, _ = kv.make_cache(kv._Dims(1, 4, 32), 1, 96, dtype).update(0, k, v, 0)
    plain = [c for c in range(32) if c not in (3, 17)]
    rel = (out[..., plain] - k[..., plain]).norm() / k[..., plain].norm()
    # A per-token scale would be set by the 12x outliers: about 12x the error on the plain channels.
    assert rel <= ERROR_MAX[dtype] / 2, rel


@pytest.mark.parametrize("dtype", QUANT)
def test_values_are_quantized_per_token_so_an_outlier_token_spares_the_others(dtype):
    k, v = _kv(b=1)
    v[:, :, 10] *= 50.0
    _, out = kv.make_cache(kv._Dims(1, 4, 32), 1, 96, dtype).update(0, k, v, 0)
    others = [t for t in range(96) if t != 10]
    rel = (out[:, :, others] - v[:, :, others]).norm() / v[:, :, others].norm()
    assert rel <= ERROR_MAX[dtype] / 2, rel


def test_int8_streaming_requantizes_a_block_when_a_channel_grows():
    """A later token that raises a channel's absmax re-scales the block's earlier tokens: no
    clipping, whatever order the magnitudes arrive in."""
    cache = kv.make_cache(kv._Dims(1, 1, 4), 1, 8, "int8", block=8)
    small = torch.full((1, 1, 1, 4), 0.1)
    big = torch.full((1, 1, 1, 4), 5.0)
    cache.update(0, small, small, 0)
    k_all, _ = cache.update(0, big, big, 1)
    assert torch.allclose(k_all[0, 0, 1], big[0, 0, 0], rtol=1e-3)
    assert torch.allclose(
        k_all[0, 0, 0], small[0, 0, 0], atol=5.0 / 254 + 1e-6
    )  # half a step of the new scale
    assert cache.k_scale[0, 0, 0, 0, 0].item() == pytest.approx(5.0 / 127, rel=1e-3)


def test_quantized_cache_returns_the_dtype_it_was_given():
    cache = kv.make_cache(TINY, 1, 16, "int8")
    k, v = _kv(b=1, t=16, d=TINY.head_dim)
    k_all, v_all = cache.update(0, k.bfloat16(), v.bfloat16(), 0)
    assert k_all.dtype == v_all.dtype == torch.bfloat16


def test_grouped_query_attention_shapes_are_cached_per_kv_head():
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=64)
    cache = kv.make_cache(cfg, 2, 32, "int8")
    assert cache.k.shape == (2, 2, 2, 32, 16)
    assert kv.bytes_per_token(cfg, "fp32") == 2 * 2 * 2 * 16 * 4


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: kv.make_cache(TINY, 1, 8, "int4"), "allowed: fp32, fp16, bf16, int8, fp8"),
        (lambda: kv.make_cache(TINY, 0, 8, "fp32"), "batch must be >= 1"),
        (lambda: kv.make_cache(TINY, 1, 8, "fp32").update(0, *_kv(1, 4, 9, 32), 0), "do not fit max_len 8"),
        (
            lambda: kv.make_cache(TINY, 1, 8, "int8").update(2, *_kv(1, 4, 1, 32), 0),
            "layer must be in [0, 2)",
        ),
        (lambda: kv.make_cache(TINY, 1, 8, "fp16").update(0, *_kv(2, 4, 1, 32), 0), "(B, Hkv, T, D)"),
    ],
)
def test_bad_arguments_fail_with_a_message_naming_them(call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        call()


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
def test_capacity_is_measured_by_allocation_with_the_layout_beside(dtype: str) -> None:
    # The storage a real cache allocates and the layout formula are two computations of one
    # figure: on the CPU they agree, and the capacity reports both.
    from optrun.runtime.kvcache.sweep import allocated_bytes, capacity

    cfg = PRESETS["tiny-lm"]
    allocated = allocated_bytes(cfg, 96, dtype)
    assert allocated == kv.cache_bytes(cfg, 1, 96, dtype)
    cap = capacity(cfg, 96, [dtype], budget_bytes=10 * allocated + 1)[dtype]
    assert cap["bytes_per_token"] == cap["layout_bytes_per_token"] == allocated / 96
    assert cap["largest_batch"] == cap["layout_largest_batch"] == 10
