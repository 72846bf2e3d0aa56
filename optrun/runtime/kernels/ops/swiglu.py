"""The SwiGLU gate as Triton kernels: c = silu(a) * b, forward and backward, and the reference.

In the feed-forward y = W2 (silu(W1 x) * W3 x) (Shazeer, 2020, arXiv:2002.05202) the matmuls stay
with cuBLAS; this fuses the elementwise part between them. Per element, in fp32, with
s = sigmoid(a):
    c = a * s * b
    da = dc * b * s * (1 + a * (1 - s)),   db = dc * a * s
Eager autograd keeps a, silu(a) and b for the backward and runs three elementwise kernels
each way; this keeps a and b, recomputes s, and runs one kernel each way (Liger-Kernel
`ops/swiglu.py` does the same).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from optrun.runtime.kernels.ops._launch import kernel

# Elements per program: large enough to amortise the launch, small enough to keep many programs.
_BLOCK = 4096


@kernel
def _swiglu_fwd(A, B, C, n, BLOCK: tl.constexpr):
    """c = silu(a) * b over a flat, contiguous range (fp32 maths, stored in c's dtype)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    tl.store(C + offs, (a * s * b).to(C.dtype.element_ty), mask=mask)


@kernel
def _swiglu_bwd(DC, A, B, DA, DB, n, BLOCK: tl.constexpr):
    """da = dc * b * s * (1 + a * (1 - s)); db = dc * a * s, with s = sigmoid(a)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dc = tl.load(DC + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    tl.store(DA + offs, (dc * b * s * (1.0 + a * (1.0 - s))).to(DA.dtype.element_ty), mask=mask)
    tl.store(DB + offs, (dc * a * s).to(DB.dtype.element_ty), mask=mask)


class SwiGLUFunction(torch.autograd.Function):
    """c = silu(a) * b with Triton forward and backward; a and b must have one shape and dtype."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, a: Tensor, b: Tensor) -> Tensor:
        if a.shape != b.shape:
            raise ValueError(f"b: expected the shape of a {tuple(a.shape)}, got {tuple(b.shape)}")
        if a.dtype != b.dtype:
            raise ValueError(f"b: expected the dtype of a ({a.dtype}), got {b.dtype}")
        a, b = a.contiguous(), b.contiguous()
        c = torch.empty_like(a)
        n = a.numel()
        if n:
            _swiglu_fwd[(triton.cdiv(n, _BLOCK),)](a, b, c, n, BLOCK=_BLOCK, num_warps=8)
        ctx.save_for_backward(a, b)
        return c

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, dc: Tensor) -> tuple[Tensor, Tensor]:
        a, b = ctx.saved_tensors
        dc = dc.contiguous()
        da, db = torch.empty_like(a), torch.empty_like(b)
        n = a.numel()
        if n:
            _swiglu_bwd[(triton.cdiv(n, _BLOCK),)](dc, a, b, da, db, n, BLOCK=_BLOCK, num_warps=8)
        return da, db


def swiglu(a: Tensor, b: Tensor) -> Tensor:
    """silu(a) * b with the Triton kernels."""
    return SwiGLUFunction.apply(a, b)


def swiglu_reference(a: Tensor, b: Tensor) -> Tensor:
    """Plain PyTorch: what optrun.runtime.model.SwiGLU computes between its projections."""
    return F.silu(a) * b
