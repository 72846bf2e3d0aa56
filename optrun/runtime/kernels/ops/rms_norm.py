"""RMSNorm as Triton kernels: forward, backward, the autograd function, and the reference.

Maths (Zhang & Sennrich, 2019, arXiv:1910.07467), per row x of length D, in fp32:
    r = 1 / sqrt(mean(x^2) + eps),   y = x * r * w
Backward, with g = dy * w and xhat = x * r:
    dx = r * (g - xhat * mean(g * xhat)),   dw = sum over rows of dy * xhat
The forward saves r (one fp32 per row) so the backward never recomputes the reduction.
Layout follows the Triton layer-norm tutorial and Liger-Kernel's `ops/rms_norm.py`: a forward
program normalises a tile of rows (one row when D is wide, several when it is narrow, so small
models do not leave most lanes idle); backward programs each walk a contiguous run of rows and
keep their share of dw in registers, so dw is a small (programs, D) partial sum, not (N, D).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from optrun.runtime.kernels.ops._launch import kernel
from optrun.runtime.kernels.ops._settings import row_tile


@kernel
def _rms_norm_fwd(
    X, W, Y, RSTD, stride_x, stride_y, n_rows, n_cols, eps, ROWS: tl.constexpr, BLOCK: tl.constexpr
):
    """ROWS rows: r = rsqrt(mean(x^2) + eps); y = x * r * w (fp32 maths, stored in y's dtype)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < n_cols)[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)  # (ROWS,)
    tl.store(RSTD + rows, rstd, mask=row_ok)
    y = x * rstd[:, None] * w[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@kernel
def _rms_norm_bwd(
    DY,
    X,
    W,
    RSTD,
    DX,
    DW_PART,
    stride_dy,
    stride_x,
    stride_dx,
    n_rows,
    n_cols,
    rows_per_program,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Rows [pid * rows_per_program, ...), ROWS at a time: dx per row; this program's share of dw
    into DW_PART[pid]. rows_per_program is a multiple of ROWS."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for start in range(row_start, row_end, ROWS):
        rows = start + tl.arange(0, ROWS)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = x * rstd[:, None]
        g = dy * w[None, :]
        dx = rstd[:, None] * (g - xhat * (tl.sum(g * xhat, axis=1) / n_cols)[:, None])
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
    tl.store(DW_PART + pid.to(tl.int64) * n_cols + cols, dw, mask=col_ok)


def _programs(n_rows: int, device: torch.device) -> int:
    """Backward programs: a few per SM on a GPU (enough to fill it), a handful in the interpreter."""
    if device.type == "cuda":
        return max(1, min(n_rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(n_rows, 3))


class RMSNormFunction(torch.autograd.Function):
    """y = rms_norm(x, weight, eps) with Triton forward and backward; y has x's dtype, dw has w's."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        shape = x.shape
        n_cols = shape[-1]
        if weight.shape != (n_cols,):
            raise ValueError(
                f"weight: expected shape ({n_cols},) to match x's last dimension, got {tuple(weight.shape)}"
            )
        block, rows, warps = row_tile(n_cols, what="rms_norm x")
        x2 = x.reshape(-1, n_cols)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        w = weight.contiguous()
        n_rows = x2.shape[0]
        y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        if n_rows:
            _rms_norm_fwd[(triton.cdiv(n_rows, rows),)](
                x2,
                w,
                y,
                rstd,
                x2.stride(0),
                y.stride(0),
                n_rows,
                n_cols,
                eps,
                ROWS=rows,
                BLOCK=block,
                num_warps=warps,
            )
        ctx.save_for_backward(x2, w, rstd)
        ctx.block, ctx.rows, ctx.warps, ctx.shape = block, rows, warps, shape
        return y.view(shape)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, dy: Tensor) -> tuple[Tensor | None, ...]:
        x2, w, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = dy.reshape(-1, n_cols)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
        programs = _programs(n_rows, x2.device)
        dw_part = torch.zeros((programs, n_cols), dtype=torch.float32, device=x2.device)
        if n_rows:
            _rms_norm_bwd[(programs,)](
                dy2,
                x2,
                w,
                rstd,
                dx,
                dw_part,
                dy2.stride(0),
                x2.stride(0),
                dx.stride(0),
                n_rows,
                n_cols,
                ctx.rows * triton.cdiv(n_rows, programs * ctx.rows),
                ROWS=ctx.rows,
                BLOCK=ctx.block,
                num_warps=ctx.warps,
            )
        dw = dw_part.sum(0).to(w.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(ctx.shape), dw, None


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    """RMSNorm of x over its last dimension with the Triton kernels."""
    return RMSNormFunction.apply(x, weight, eps)


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    """Plain PyTorch: the same maths as optrun.runtime.model.RMSNorm (fp32 inside, x's dtype out)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
