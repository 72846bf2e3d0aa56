"""Triton kernels for weight-only quantized matmul: y = x @ dequant(W)^T (+ bias), in one pass.

The weights stay quantized in memory; each tile is dequantized in registers right before the
dot product, so a decode step reads 1 byte (int8) or half a byte (int4) per weight instead of 2
or 4. That is where weight-only quantization gets its speed: batch-1 decoding is bound by
reading the weights (torchao's int8 weight-only: 107 -> 171 tokens/s on Llama-2-7B, A100).

Layouts (produced by optrun.runtime.compression.codecs):
- int8: q (N, K) int8, scale (N,) fp32: W[n, k] = q[n, k] * scale[n]. The per-row scale is
  applied once to the accumulator: y[m, n] = scale[n] * sum_k x[m, k] q[n, k].
- int4: packed (N, Kp/2) uint8 in split-half order (byte j of a row: element j in the low nibble,
  element j + Kp/2 in the high one), scale (N, Kp/G) fp32: W[n, k] = (nib(n, k) - 8) * scale[n, k // G].
  Each K step loads one tile of bytes and does two dots: the low nibbles against x[:, j] and
  the high nibbles against x[:, j + Kp/2].

Reference: the torch paths in optrun.runtime.compression.quantized_linear (dequantize, then
F.linear); the tests compare against them. Where a kernel runs: compiled on a CUDA tensor, in
Triton's interpreter on a CPU tensor when TRITON_INTERPRET=1 (correctness only). The choice is
made per launch from the tensors' device, not at import, so CPU and GPU tests share a process.
The bodies call only builtins (`tl.full`, not `tl.zeros`): `tl.zeros` is itself a `@triton.jit`
function, compiled or interpreted according to TRITON_INTERPRET when triton.language was first
imported, and a compiled one cannot be called from an interpreted kernel.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_available(device: torch.device) -> bool:
    """Whether these kernels can run on `device` (CUDA, or a CPU with TRITON_INTERPRET=1)."""
    return device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())


class _Kernel:
    """A kernel body, compiled for CUDA tensors or interpreted for CPU tensors, chosen per launch."""

    def __init__(self, fn: Callable[..., None]) -> None:
        self.fn = fn
        self._variants: dict[str, Any] = {}

    def launch(self, device: torch.device, grid: tuple[int, ...], *args: Any, **meta: Any) -> None:
        if not triton_available(device):
            raise RuntimeError(
                f"Triton kernel {self.fn.__name__} needs a CUDA device, got {device.type}; set TRITON_INTERPRET=1 "
                "to run it in Triton's interpreter on a CPU (correctness tests only)"
            )
        key = "cuda" if device.type == "cuda" else "interp"
        if key not in self._variants:
            self._variants[key] = JITFunction(self.fn) if key == "cuda" else InterpretedFunction(self.fn)
        self._variants[key][grid](*args, **meta)


def _int8_body(
    x_ptr,
    q_ptr,
    s_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_qn,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """y[m, n] = scale[n] * sum_k x[m, k] * q[n, k] (+ b[n]); fp32 accumulation."""
    # int64 rows and columns: row * stride overflows int32 once y (M x N, e.g. 16k tokens against a
    # 128k vocabulary) or q (N x K) holds 2**31 elements.
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
            mask=(offs_m[:, None] < M) & (kk[None, :] < K),
            other=0.0,
        )
        q = tl.load(
            q_ptr + offs_n[:, None] * stride_qn + kk[None, :],
            mask=(offs_n[:, None] < N) & (kk[None, :] < K),
            other=0,
        )
        # int8 values are exact in fp16/bf16/fp32, so the cast loses nothing.
        acc = tl.dot(x, tl.trans(q.to(x.dtype)), acc, input_precision=PRECISION)
    s = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0)
    acc = acc * s[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=(offs_m[:, None] < M) & (offs_n[None, :] < N),
    )


def _int4_body(
    x_ptr,
    p_ptr,
    s_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    KH,
    stride_xm,
    stride_pn,
    stride_sn,
    stride_ym,
    GROUP: tl.constexpr,
    TILE_IN_GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KH: tl.constexpr,
):
    """y[m, n] = sum_k x[m, k] * (nib(n, k) - 8) * scale[n, k // GROUP] (+ b[n]); KH = Kp / 2 bytes per row.

    TILE_IN_GROUP (GROUP a multiple of 2 * BLOCK_KH): a tile's low and high halves each lie in
    one group, so the dot runs on the integer levels (exact in every dtype) and the two row
    scales multiply its result; otherwise every element is scaled before the dot."""
    pid_m = tl.program_id(0).to(tl.int64)  # int64 offsets, as in _int8_body
    pid_n = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_KH)
    m_ok = offs_m[:, None] < M
    n_ok = offs_n[:, None] < N
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for j0 in range(0, KH, BLOCK_KH):
        jj = j0 + offs_j  # byte column; low nibble is element jj, high nibble element jj + KH
        j_ok = jj[None, :] < KH
        packed = tl.load(p_ptr + offs_n[:, None] * stride_pn + jj[None, :], mask=n_ok & j_ok, other=0)
        lo = (packed & 0xF).to(tl.float32) - 8.0
        hi = (packed >> 4).to(tl.float32) - 8.0
        x_lo = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + jj[None, :], mask=m_ok & (jj[None, :] < K), other=0.0
        )
        x_hi = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + (jj + KH)[None, :],
            mask=m_ok & ((jj + KH)[None, :] < K),
            other=0.0,
        )
        if TILE_IN_GROUP:
            s_lo = tl.load(s_ptr + offs_n * stride_sn + j0 // GROUP, mask=offs_n < N, other=0.0)
            s_hi = tl.load(s_ptr + offs_n * stride_sn + (j0 + KH) // GROUP, mask=offs_n < N, other=0.0)
            part_lo = tl.dot(x_lo, tl.trans(lo.to(x_lo.dtype)), input_precision=PRECISION)
            part_hi = tl.dot(x_hi, tl.trans(hi.to(x_hi.dtype)), input_precision=PRECISION)
            acc += part_lo * s_lo[None, :] + part_hi * s_hi[None, :]
        else:
            s_lo = tl.load(
                s_ptr + offs_n[:, None] * stride_sn + (jj // GROUP)[None, :], mask=n_ok & j_ok, other=0.0
            )
            s_hi = tl.load(
                s_ptr + offs_n[:, None] * stride_sn + ((jj + KH) // GROUP)[None, :],
                mask=n_ok & j_ok,
                other=0.0,
            )
            # Dequantize in fp32, then round once to the activation dtype, as the torch path does.
            acc = tl.dot(x_lo, tl.trans((lo * s_lo).to(x_lo.dtype)), acc, input_precision=PRECISION)
            acc = tl.dot(x_hi, tl.trans((hi * s_hi).to(x_hi.dtype)), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc = acc + tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=m_ok & (offs_n[None, :] < N),
    )


_INT8 = _Kernel(_int8_body)
_INT4 = _Kernel(_int4_body)


@dataclass(frozen=True)
class Config:
    """Tile sizes and launch options of one kernel launch."""

    block_m: int
    block_n: int
    block_k: int  # elements of K per step (int4: two nibbles per byte, so block_k / 2 bytes)
    num_warps: int = 4
    num_stages: int = 3


def default_config(m: int, n: int, k: int, *, group_size: int | None = None) -> Config:
    """Tiles by problem shape (measured on an H200, bf16, N x K = 4096 x 4096 and 11008 x 4096).

    Decoding (a handful of rows) is bound by reading the weights: narrow column tiles (32) keep
    every SM streaming, and a long K step keeps each load large (int8: 256; 8.2 us against
    cuBLAS bf16's 10.4 us at 4096 x 4096). int4 takes the longest K step whose halves stay inside
    one scale group, so the scales apply to the dot's result (16 us); scaling every element
    instead (a step across groups) measured 6x slower."""
    bm = 16 if m <= 16 else (32 if m <= 32 else 64)
    bn = 32 if m <= 16 else 64
    if group_size is None:  # int8
        return Config(bm, bn, 256 if m <= 16 else 64, num_warps=4, num_stages=3)
    bk = next((b for b in (128, 64, 32) if group_size % b == 0), 64)
    return Config(bm, bn, bk, num_warps=4, num_stages=3)


def _precision(dtype: torch.dtype) -> str:
    # fp32 activations: exact fp32 products (torch's default matmul does not use TF32 either).
    return "ieee" if dtype == torch.float32 else "tf32"


def int8_matmul(
    x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None = None, config: Config | None = None
) -> Tensor:
    """x (M, K) @ (q (N, K) * scale (N,)[:, None])^T (+ bias) -> (M, N) in x's dtype."""
    m, k = x.shape
    n = q.shape[0]
    x, q = x.contiguous(), q.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    c = config or default_config(m, n, k)
    grid = (triton.cdiv(m, c.block_m), triton.cdiv(n, c.block_n))
    _INT8.launch(
        x.device,
        grid,
        x,
        q,
        scale,
        bias if bias is not None else scale,
        y,
        m,
        n,
        k,
        x.stride(0),
        q.stride(0),
        y.stride(0),
        HAS_BIAS=bias is not None,
        PRECISION=_precision(x.dtype),
        BLOCK_M=c.block_m,
        BLOCK_N=c.block_n,
        BLOCK_K=c.block_k,
        num_warps=c.num_warps,
        num_stages=c.num_stages,
    )
    return y


def int4_matmul(
    x: Tensor,
    packed: Tensor,
    scale: Tensor,
    group_size: int,
    bias: Tensor | None = None,
    config: Config | None = None,
) -> Tensor:
    """x (M, K) @ dequant(packed (N, Kp/2), scale (N, Kp/G))^T (+ bias) -> (M, N) in x's dtype."""
    m, k = x.shape
    n, kh = packed.shape
    x, packed, scale = x.contiguous(), packed.contiguous(), scale.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    c = config or default_config(m, n, k, group_size=group_size)
    bkh = c.block_k // 2
    grid = (triton.cdiv(m, c.block_m), triton.cdiv(n, c.block_n))
    _INT4.launch(
        x.device,
        grid,
        x,
        packed,
        scale,
        bias if bias is not None else scale,
        y,
        m,
        n,
        k,
        kh,
        x.stride(0),
        packed.stride(0),
        scale.stride(0),
        y.stride(0),
        GROUP=group_size,
        TILE_IN_GROUP=group_size % (2 * bkh) == 0 and kh % bkh == 0,
        HAS_BIAS=bias is not None,
        PRECISION=_precision(x.dtype),
        BLOCK_M=c.block_m,
        BLOCK_N=c.block_n,
        BLOCK_KH=bkh,
        num_warps=c.num_warps,
        num_stages=c.num_stages,
    )
    return y
