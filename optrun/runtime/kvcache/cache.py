"""Preallocated KV caches: dense (fp32, fp16, bf16) and 8-bit quantized (int8, fp8 e4m3).

A cache implements the `KVCache` protocol of `optrun.runtime.model`: attention hands it the new
keys and values of a layer, (B, Hkv, T, D) at positions [start, start+T), and gets back every
key and value held for [0, start+T) in the dtype it handed in. Storage is allocated once for
(batch, max_len), so decoding never reallocates and the memory a batch needs is known up front
(`cache_bytes`), which is what the largest-batch search of the sweep relies on.

The quantized layout follows KIVI (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit
Quantization for KV Cache"): keys have outlier *channels*, so they are quantized per channel,
with one scale per (sequence, head, channel) for each block of `block` consecutive tokens;
values have no fixed outlier channels and feed a convex combination, so they are quantized per
token, with one scale per (sequence, token) shared by the token's heads. Both are symmetric
absmax codes: q = round(x / s), s = absmax / qmax (qmax = 127 for int8, 448 for fp8 e4m3,
where the cast to float8 does the rounding; `absmax_quantize`, shared with the compression
codecs). Scales are stored in fp16, and values are quantized with the fp16-rounded scale, so the
stored scale is exactly the one used.

KIVI keeps the block still being filled in full precision; here it is stored quantized too and
re-quantized when a new token raises a channel's absmax (the block's earlier entries are
dequantized and quantized again with the larger scale). That costs at most a half step of extra
rounding per raise and keeps the cache at 8 bits per element plus scales, with no
full-precision tail. Per token and layer an int8 cache stores 2*Hkv*D bytes of codes,
2 bytes of value scale and 2*Hkv*D/block bytes of key scales: for the tiny-lm (Hkv*D = 128,
block 64) that is 0.512x the bytes of an fp16 cache, 0.256x of fp32 (payload alone would be
exactly 0.5x; the scales are the 2.3 % above it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import Tensor

from optrun.runtime.compression.codecs import absmax_dequantize, absmax_quantize

CacheDtype = Literal["fp32", "fp16", "bf16", "int8", "fp8"]
CACHE_DTYPES: tuple[str, ...] = get_args(CacheDtype)
DENSE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
QUANT_DTYPES = ("int8", "fp8")
# Largest code magnitude per 8-bit payload: int8 symmetric, fp8 e4m3 finite maximum.
QMAX = {"int8": 127.0, "fp8": 448.0}
SCALE_DTYPE = torch.float16
# Tokens per key-scale block; 64 keeps the key scales at 1/32 byte per element (fp16 / 64).
DEFAULT_BLOCK = 64
# Smallest absmax a scale is computed from: an all-zero block must not divide by zero, and
# 1e-5 / 127 is still representable (as an fp16 subnormal).
_ABSMAX_FLOOR = 1e-5

KVCacheFactory = Callable[[int, int], Any]  # (batch, max_len) -> a KVCache


def fp8_supported(device: torch.device | str = "cpu") -> tuple[bool, str]:
    """Whether this torch can store float8_e4m3fn on `device`, and why not when it cannot."""
    if not hasattr(torch, "float8_e4m3fn"):
        return False, f"torch {torch.__version__} has no float8_e4m3fn dtype"
    try:
        x = torch.linspace(-2.0, 2.0, 8, device=device)
        buf = torch.zeros(8, dtype=torch.float8_e4m3fn, device=device)
        buf[:] = x.to(torch.float8_e4m3fn)
        buf.float().sum().item()
    except (RuntimeError, TypeError) as exc:
        return False, f"float8_e4m3fn casts fail on {device}: {exc}"
    return True, ""


def check_dtype(dtype: str) -> None:
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"cache dtype {dtype!r} is not allowed; allowed: {', '.join(CACHE_DTYPES)}")


def _storage_dtype(dtype: str) -> torch.dtype:
    if dtype in DENSE_DTYPES:
        return DENSE_DTYPES[dtype]
    return torch.int8 if dtype == "int8" else torch.float8_e4m3fn


def _model_dims(model_cfg: Any) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a TinyLM-style config."""
    return int(model_cfg.n_layers), int(model_cfg.n_kv_heads), int(model_cfg.head_dim)


def layout(
    n_layers: int,
    n_kv_heads: int,
    head_dim: int,
    batch: int,
    max_len: int,
    dtype: str,
    block: int = DEFAULT_BLOCK,
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, storage dtype) of every tensor a cache of these dimensions allocates."""
    check_dtype(dtype)
    for name, value in (("batch", batch), ("max_len", max_len), ("block", block)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    store = _storage_dtype(dtype)
    if dtype in DENSE_DTYPES:
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        return {"k": (shape, store), "v": (shape, store)}
    block = min(block, max_len)
    n_blocks = math.ceil(max_len / block)
    padded = n_blocks * block  # whole key blocks, so scales broadcast over a (blocks, block) view
    return {
        "k": ((n_layers, batch, n_kv_heads, padded, head_dim), store),
        "k_scale": ((n_layers, batch, n_kv_heads, n_blocks, head_dim), SCALE_DTYPE),
        "v": ((n_layers, batch, n_kv_heads, max_len, head_dim), store),
        "v_scale": ((n_layers, batch, max_len), SCALE_DTYPE),
    }


def cache_bytes(model_cfg: Any, batch: int, max_len: int, dtype: str, block: int = DEFAULT_BLOCK) -> int:
    """Bytes a cache for (batch, max_len) allocates, computed without allocating it."""
    shapes = layout(*_model_dims(model_cfg), batch, max_len, dtype, block)
    return sum(math.prod(shape) * torch.empty((), dtype=dt).element_size() for shape, dt in shapes.values())


def bytes_per_token(model_cfg: Any, dtype: str, max_len: int = 4096, block: int = DEFAULT_BLOCK) -> float:
    """Cache bytes per token slot (all layers, keys and values, scales included)."""
    return cache_bytes(model_cfg, 1, max_len, dtype, block) / max_len


def largest_batch(
    model_cfg: Any, max_len: int, dtype: str, budget_bytes: int, block: int = DEFAULT_BLOCK
) -> int:
    """The largest batch whose cache for `max_len` tokens fits in `budget_bytes` (0 if none)."""
    per_sequence = cache_bytes(model_cfg, 1, max_len, dtype, block)  # the cache is linear in batch
    return int(budget_bytes // per_sequence)


class _Cache:
    """Shared bookkeeping: dtype check, storage, shapes, bounds, byte counts."""

    kind: ClassVar[str]  # "dense" or "quantized", for messages
    dtypes: ClassVar[tuple[str, ...]]  # the dtypes this kind of cache stores; the first is the default

    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: str | None = None,
        device: torch.device | str = "cpu",
        block: int = DEFAULT_BLOCK,
    ) -> None:
        """`dtype` None is the kind's default (fp32 dense, int8 quantized); `block` (tokens per
        key-scale block) matters to quantized caches only."""
        dtype = self.dtypes[0] if dtype is None else dtype
        self._check_dtype(dtype, device)
        self.dtype = dtype
        self.n_layers, self.batch, self.n_kv_heads, self.head_dim = n_layers, batch, n_kv_heads, head_dim
        self.max_len = max_len
        self.block = min(block, max_len)
        self.device = torch.device(device)
        self._tensors = {
            name: torch.zeros(shape, dtype=dt, device=self.device)
            for name, (shape, dt) in layout(
                n_layers, n_kv_heads, head_dim, batch, max_len, self.dtype, block
            ).items()
        }
        # Dense: (L, B, Hkv, S, D) each. Quantized: keys (L, B, Hkv, S', D) with S' whole blocks,
        # values (L, B, Hkv, S, D).
        self.k, self.v = self._tensors["k"], self._tensors["v"]

    def _check_dtype(self, dtype: str, device: torch.device | str) -> None:
        if dtype not in self.dtypes:
            raise ValueError(
                f"{self.kind} cache dtype {dtype!r} is not allowed; allowed: {', '.join(self.dtypes)}"
            )

    def _check(self, layer: int, k: Tensor, v: Tensor, start: int) -> int:
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer must be in [0, {self.n_layers}), got {layer}")
        expected = (self.batch, self.n_kv_heads, k.shape[2], self.head_dim)
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise ValueError(
                f"k and v must be shaped (B, Hkv, T, D) = {expected}, got {tuple(k.shape)}, {tuple(v.shape)}"
            )
        end = start + k.shape[2]
        if start < 0 or end > self.max_len:
            raise ValueError(f"positions [{start}, {end}) do not fit max_len {self.max_len}")
        return end

    def nbytes(self) -> int:
        """Bytes this cache holds allocated."""
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def bytes_per_token(self) -> float:
        """Allocated bytes per token slot (batch x max_len slots)."""
        return self.nbytes() / (self.batch * self.max_len)


class DenseKVCache(_Cache):
    """Keys and values stored as they are, in fp32, fp16 or bf16."""

    kind = "dense"
    dtypes = tuple(DENSE_DTYPES)

    def update(self, layer: int, k: Tensor, v: Tensor, start: int) -> tuple[Tensor, Tensor]:
        end = self._check(layer, k, v, start)
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end].to(k.dtype), self.v[layer, :, :, :end].to(v.dtype)


class QuantizedKVCache(_Cache):
    """8-bit keys (per channel, per token block) and values (per token), KIVI layout; see the module doc."""

    kind = "quantized"
    dtypes = QUANT_DTYPES

    def _check_dtype(self, dtype: str, device: torch.device | str) -> None:
        super()._check_dtype(dtype, device)
        if dtype == "fp8":
            ok, why = fp8_supported(device)
            if not ok:
                raise RuntimeError(f"fp8 KV cache unavailable: {why}")

    @property
    def qmax(self) -> float:
        return QMAX[self.dtype]

    @property
    def k_scale(self) -> Tensor:
        """Key scales, (L, B, Hkv, S'/block, D) fp16."""
        return self._tensors["k_scale"]

    @property
    def v_scale(self) -> Tensor:
        """Value scales, (L, B, S) fp16."""
        return self._tensors["v_scale"]

    def _quantize(self, x: Tensor, scale: Tensor) -> Tensor:
        return absmax_quantize(x, scale, self.qmax, self.k.dtype)

    def _scale(self, absmax: Tensor) -> Tensor:
        """The fp16 scale of an absmax; codes are computed with exactly this (rounded) value."""
        return (absmax.clamp_min(_ABSMAX_FLOOR) / self.qmax).to(SCALE_DTYPE)

    def _keys(self, layer: int, first_block: int, n_blocks: int, dtype: torch.dtype) -> Tensor:
        """Dequantized keys of blocks [first_block, first_block + n_blocks): (B, Hkv, n*block, D)."""
        b, h, g, d = self.batch, self.n_kv_heads, self.block, self.head_dim
        lo, hi = first_block * g, (first_block + n_blocks) * g
        codes = self.k[layer, :, :, lo:hi].view(b, h, n_blocks, g, d)
        scale = self.k_scale[layer, :, :, first_block : first_block + n_blocks, None, :]  # (B, Hkv, n, 1, D)
        return absmax_dequantize(codes, scale, dtype).view(b, h, n_blocks * g, d)

    def _values(self, layer: int, end: int, dtype: torch.dtype) -> Tensor:
        scale = self.v_scale[layer, :, None, :end, None]  # (B, 1, T, 1)
        return absmax_dequantize(self.v[layer, :, :, :end], scale, dtype)

    def update(self, layer: int, k: Tensor, v: Tensor, start: int) -> tuple[Tensor, Tensor]:
        end = self._check(layer, k, v, start)
        b, h, _, d = k.shape
        g = self.block
        # Keys: re-quantize every block the new tokens touch, with the block's earlier tokens.
        b0, b1 = start // g, (end - 1) // g + 1
        x = k.float()
        if start > b0 * g:
            earlier = self._keys(layer, b0, 1, torch.float32)[:, :, : start - b0 * g]
            x = torch.cat((earlier, x), dim=2)
        n = x.shape[2]
        x = torch.nn.functional.pad(x, (0, 0, 0, (b1 - b0) * g - n))  # zero rows leave the absmax as is
        x = x.view(b, h, b1 - b0, g, d)  # (B, Hkv, blocks, block, D)
        k_scale = self._scale(x.abs().amax(dim=3))  # (B, Hkv, blocks, D)
        codes = self._quantize(x, k_scale.float()[:, :, :, None, :]).view(b, h, -1, d)
        self.k[layer, :, :, b0 * g : b0 * g + n] = codes[:, :, :n]
        self.k_scale[layer, :, :, b0:b1] = k_scale
        # Values: one scale per token over all its heads and channels.
        y = v.float()
        v_scale = self._scale(y.abs().amax(dim=(1, 3)))  # (B, T)
        self.v[layer, :, :, start:end] = self._quantize(y, v_scale.float()[:, None, :, None])
        self.v_scale[layer, :, start:end] = v_scale
        keys = self._keys(layer, 0, b1, k.dtype)[:, :, :end]
        return keys, self._values(layer, end, v.dtype)


def make_cache(
    model_cfg: Any,
    batch: int,
    max_len: int,
    dtype: str = "fp32",
    device: torch.device | str = "cpu",
    *,
    block: int = DEFAULT_BLOCK,
) -> DenseKVCache | QuantizedKVCache:
    """A cache for a TinyLM-style config (n_layers, n_kv_heads, head_dim) and (batch, max_len)."""
    check_dtype(dtype)
    n_layers, n_kv_heads, head_dim = _model_dims(model_cfg)
    if dtype in DENSE_DTYPES:
        return DenseKVCache(n_layers, batch, n_kv_heads, head_dim, max_len, dtype, device)
    return QuantizedKVCache(n_layers, batch, n_kv_heads, head_dim, max_len, dtype, device, block)


def cache_factory(model_cfg: Any, dtype: str, device: torch.device | str) -> KVCacheFactory:
    """A (batch, max_len) -> cache builder, as the speedup matrix and `generate` take it."""
    check_dtype(dtype)

    def build(batch: int, max_len: int) -> DenseKVCache | QuantizedKVCache:
        return make_cache(model_cfg, batch, max_len, dtype, device)

    return build


def reconstruction_error(
    k: Tensor, v: Tensor, dtype: str, *, stream: bool = True, block: int = DEFAULT_BLOCK
) -> dict[str, float]:
    """Relative error ||x - x'|| / ||x|| of keys and values (B, Hkv, T, D) after a round trip
    through a one-layer cache of `dtype`; `stream` writes them one token at a time, as decoding
    does (exercising the block re-quantization), instead of in one prefill chunk."""
    b, h, t, d = k.shape
    cache = make_cache(_Dims(1, h, d), b, t, dtype, k.device, block=block)
    if stream:
        for i in range(t):
            k_out, v_out = cache.update(0, k[:, :, i : i + 1], v[:, :, i : i + 1], i)
    else:
        k_out, v_out = cache.update(0, k, v, 0)
    return {
        "key": float((k_out.float() - k.float()).norm() / k.float().norm().clamp_min(1e-30)),
        "value": float((v_out.float() - v.float()).norm() / v.float().norm().clamp_min(1e-30)),
    }


class _Dims:
    """A minimal model config: what a cache needs to know about a model."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int) -> None:
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
