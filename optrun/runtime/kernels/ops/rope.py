"""Rotary position embedding as a Triton kernel (forward and backward), and the reference.

Rotate-half convention (Su et al., 2021, arXiv:2104.09864; the Llama / Hugging Face layout):
for a head vector x of size D and position t, the pair (x[i], x[i + D/2]) is rotated by the
angle t * f_i, with cos/sin tables (T, D/2) precomputed in fp32:
    y[i]       = x[i] * cos - x[i + D/2] * sin
    y[i + D/2] = x[i + D/2] * cos + x[i] * sin
A rotation is orthogonal, so the backward is the rotation by -angle (sin -> -sin) applied
to the incoming gradient; one kernel serves both directions. A program rotates a tile of head
vectors (rows over (B, T, H)), so narrow heads still fill a program. Inputs may be (B, H, T, D)
views of (B, T, H, D) memory, as attention produces them; outputs use that layout too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from optrun.runtime.kernels.ops._launch import kernel
from optrun.runtime.kernels.ops._settings import TILE_ELEMENTS, warps_for


@kernel
def _rope(
    X,
    Y,
    COS,
    SIN,
    x_sb,
    x_sh,
    x_st,
    y_sb,
    y_sh,
    y_st,
    cs_st,
    n_rows,
    n_heads,
    seq_len,
    half,
    SIGN: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Rotate ROWS head vectors by SIGN * angle(t). Row r is (b, t, h) in row-major order over
    (B, T, H); the last dimension is contiguous."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    h = rows % n_heads
    t = (rows // n_heads) % seq_len
    b = rows // (n_heads * seq_len)
    d = tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (d < half)[None, :]
    cs = t[:, None] * cs_st + d[None, :]
    cos = tl.load(COS + cs, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(SIN + cs, mask=mask, other=0.0).to(tl.float32) * SIGN
    src = X + (b * x_sb + t * x_st + h * x_sh)[:, None] + d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
    dst = Y + (b * y_sb + t * y_st + h * y_sh)[:, None] + d[None, :]
    tl.store(dst, (x1 * cos - x2 * sin).to(Y.dtype.element_ty), mask=mask)
    tl.store(dst + half, (x2 * cos + x1 * sin).to(Y.dtype.element_ty), mask=mask)


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _like_bthd(x: Tensor) -> Tensor:
    """An empty (B, H, T, D) tensor laid out as (B, T, H, D) in memory, the layout attention uses."""
    b, h, t, d = x.shape
    return torch.empty((b, t, h, d), dtype=x.dtype, device=x.device).transpose(1, 2)


def _rotate_one(x: Tensor, cos: Tensor, sin: Tensor, sign: float) -> Tensor:
    b, h, t, d = x.shape
    y = _like_bthd(x)
    n_rows = b * h * t
    if n_rows == 0:
        return y
    half = d // 2
    block_d = triton.next_power_of_2(half)
    rows = max(1, TILE_ELEMENTS // block_d)
    _rope[(triton.cdiv(n_rows, rows),)](
        x,
        y,
        cos,
        sin,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        y.stride(0),
        y.stride(1),
        y.stride(2),
        cos.stride(0),
        n_rows,
        h,
        t,
        half,
        SIGN=sign,
        ROWS=rows,
        BLOCK_D=block_d,
        num_warps=warps_for(rows * block_d),
    )
    return y


def _rotate(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, sign: float) -> tuple[Tensor, Tensor]:
    return _rotate_one(q, cos, sin, sign), _rotate_one(k, cos, sin, sign)


class RotaryFunction(torch.autograd.Function):
    """(q, k) rotated by the (T, D/2) tables cos and sin; the tables get no gradient."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor
    ) -> tuple[Tensor, Tensor]:
        if q.dim() != 4 or k.dim() != 4:
            raise ValueError(
                f"q, k: expected (B, H, T, D) tensors, got {tuple(q.shape)} and {tuple(k.shape)}"
            )
        b, _, t, d = q.shape
        if d % 2:
            raise ValueError(f"q: the head dimension must be even for rotary embeddings, got {d}")
        if k.shape[0] != b or k.shape[2:] != q.shape[2:]:
            raise ValueError(f"k: expected (B={b}, Hkv, T={t}, D={d}), got {tuple(k.shape)}")
        if cos.shape != (t, d // 2) or sin.shape != cos.shape:
            raise ValueError(
                f"cos, sin: expected ({t}, {d // 2}) tables, got {tuple(cos.shape)} and {tuple(sin.shape)}"
            )
        if k.dtype != q.dtype:
            raise ValueError(f"k: expected the dtype of q ({q.dtype}), got {k.dtype}")
        cos, sin = _last_dim_contiguous(cos), _last_dim_contiguous(sin)
        if cos.stride(0) != sin.stride(0):
            cos, sin = cos.contiguous(), sin.contiguous()
        ctx.save_for_backward(cos, sin)
        return _rotate(_last_dim_contiguous(q), _last_dim_contiguous(k), cos, sin, 1.0)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, dq: Tensor, dk: Tensor
    ) -> tuple[Tensor, Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        dq, dk = _last_dim_contiguous(dq), _last_dim_contiguous(dk)
        dq, dk = _rotate(dq, dk, cos, sin, -1.0)
        return dq, dk, None, None


def rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotary embedding of q (B, H, T, D) and k (B, Hkv, T, D) with the Triton kernel."""
    return RotaryFunction.apply(q, k, cos, sin)


def rotary_reference(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Plain PyTorch: optrun.runtime.model.apply_rotary on q and k (fp32 inside, input dtype out)."""

    def rot(x: Tensor) -> Tensor:
        d2 = x.shape[-1] // 2
        x1, x2 = x[..., :d2].float(), x[..., d2:].float()
        c, s = cos[None, None], sin[None, None]  # (1, 1, T, D/2)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)

    return rot(q), rot(k)
