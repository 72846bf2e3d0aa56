"""Cross-entropy over the vocabulary, fused with the final projection, as Triton kernels.

Loss (mean over the rows whose target is not `ignore_index`), with logits z = h W^T per row:
    loss_i = logsumexp(z_i) - z_i[y_i],    dL/dz_i = (softmax(z_i) - onehot(y_i)) / n_valid
    dL/dh = (dL/dz) W,                     dL/dW = (dL/dz)^T h
The eager form materialises the (N, V) logits, an fp32 copy and an (N, V) gradient: for 16k
tokens and a 128k vocabulary that is gigabytes. Here the rows go through in chunks sized so a
chunk's logits are about as large as the hidden states (N x D); per chunk a matmul makes the
logits, one Triton program per row computes the loss and overwrites that row with its
gradient (online softmax: one pass for max and sum, one for the gradient; Milakov &
Gimelshein, 2018, arXiv:1805.02867), and two matmuls fold the chunk into dL/dh and dL/dW. The
full logits never exist, and since the gradient is known in the forward, the backward only
scales it by the incoming gradient. This is Liger-Kernel's `fused_linear_cross_entropy.py`
(after mgmalek/efficient_cross_entropy); the row kernel is `ops/cross_entropy.py` there.

Under autocast the matmuls run in the autocast dtype, as `h @ W.t()` would; softmax and loss are
always fp32. dL/dW accumulates in the weight's dtype (fp32 master weights under autocast).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from optrun.runtime.kernels.ops._launch import kernel
from optrun.runtime.kernels.ops._settings import TILE_ELEMENTS, warps_for

IGNORE_INDEX = -100
# The widest block a row program loads at once; longer rows are walked in blocks of this size.
_MAX_BLOCK = 32768


@kernel
def _ce_loss_grad(
    Z,
    G,
    stride_z,
    stride_g,
    Y,
    LOSS,
    n_rows,
    n_cols,
    ignore_index,
    grad_scale,
    HAS_GRAD: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """ROWS rows of logits z with targets y: LOSS = logsumexp(z) - z[y]; with HAS_GRAD, G gets
    (softmax(z) - onehot(y)) * grad_scale (G may be Z itself: each element is read before written). An ignored row gets loss 0, gradient 0.
    Several rows share a program when the vocabulary is small; a large one takes a row each."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    y = tl.load(Y + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (y != ignore_index)
    z_rows = Z + rows * stride_z  # (ROWS,) row starts
    z_y = tl.load(z_rows + tl.where(valid, y, 0), mask=valid, other=0.0).to(tl.float32)
    # Online logsumexp; rows past the end read zeros (finite) and are never stored.
    m = tl.full((ROWS,), float("-inf"), dtype=tl.float32)  # running max
    s = tl.zeros((ROWS,), dtype=tl.float32)  # running sum of exp(z - m)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        col_ok = (cols < n_cols)[None, :]
        z = tl.load(z_rows[:, None] + cols[None, :], mask=row_ok[:, None] & col_ok, other=0.0).to(tl.float32)
        z = tl.where(col_ok, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
    lse = m + tl.log(s)
    tl.store(LOSS + rows, tl.where(valid, lse - z_y, 0.0), mask=row_ok)
    if HAS_GRAD:
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = row_ok[:, None] & (cols < n_cols)[None, :]
            z = tl.load(z_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(z - lse[:, None]) - tl.where(cols[None, :] == y[:, None], 1.0, 0.0)
            g = tl.where(valid[:, None], g * grad_scale, 0.0)
            g_rows = G + rows * stride_g
            tl.store(g_rows[:, None] + cols[None, :], g.to(G.dtype.element_ty), mask=mask)


def default_chunk_rows(n_rows: int, dim: int, vocab: int) -> int:
    """Rows per chunk so a chunk's logits hold about as many elements as the hidden states."""
    return max(1, min(n_rows, triton.next_power_of_2(triton.cdiv(n_rows, triton.cdiv(vocab, dim)))))


def _compute_dtype(h: Tensor) -> torch.dtype:
    """The dtype `h @ W.t()` would run in here: the autocast dtype when autocast is on."""
    kind = h.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return h.dtype


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Mean cross-entropy of (hidden @ weight^T) against targets; the gradients are computed in
    the forward, chunk by chunk, and only scaled in the backward."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        ignore_index: int,
        chunk_rows: int | None,
    ) -> Tensor:
        dim = hidden.shape[-1]
        vocab = weight.shape[0]
        if weight.dim() != 2 or weight.shape[1] != dim:
            raise ValueError(
                f"weight: expected (vocab, {dim}) to match hidden's last dimension, got {tuple(weight.shape)}"
            )
        h = hidden.reshape(-1, dim)
        y = targets.reshape(-1)
        n_rows = h.shape[0]
        if y.numel() != n_rows:
            raise ValueError(f"targets: expected {n_rows} targets (one per hidden row), got {y.numel()}")
        if y.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"targets: expected an integer tensor (int64 or int32), got {y.dtype}")
        if chunk_rows is not None and chunk_rows < 1:
            raise ValueError(f"chunk_rows: expected a positive number of rows, got {chunk_rows}")
        y = y.contiguous()
        # One host sync for both facts: how many rows count, and whether any target is out of range.
        valid = y != ignore_index
        bad = valid & ((y < 0) | (y >= vocab))
        n_valid, n_bad = torch.stack((valid.sum(), bad.sum())).tolist()
        if n_bad:
            raise ValueError(
                f"targets: {n_bad} target(s) outside [0, {vocab}) and not ignore_index={ignore_index}"
            )

        cdt = _compute_dtype(h)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        has_grad = need_h or need_w
        chunk = chunk_rows or default_chunk_rows(n_rows, dim, vocab)
        block = min(_MAX_BLOCK, triton.next_power_of_2(vocab))
        rows = max(1, TILE_ELEMENTS // block)
        warps = warps_for(rows * block)
        # Without valid rows the mean is 0/0 (nan, as in F.cross_entropy); the gradient is zero.
        scale = 1.0 / n_valid if n_valid else 0.0
        loss_rows = torch.empty(n_rows, dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(cdt)
            for start in range(0, n_rows, chunk):
                end = min(start + chunk, n_rows)
                h_c = h[start:end].to(cdt)
                z = h_c @ w.t()  # (rows, V), the chunk's logits; becomes their gradient in place
                _ce_loss_grad[(triton.cdiv(end - start, rows),)](
                    z,
                    z,
                    z.stride(0),
                    z.stride(0),
                    y[start:end],
                    loss_rows[start:end],
                    end - start,
                    vocab,
                    ignore_index,
                    scale,
                    HAS_GRAD=has_grad,
                    ROWS=rows,
                    BLOCK=block,
                    num_warps=warps,
                )
                if grad_h is not None:
                    if grad_h.dtype == cdt:  # straight into place, no temporary
                        torch.mm(z, w, out=grad_h[start:end])
                    else:
                        grad_h[start:end] = z @ w
                if grad_w is not None:
                    if grad_w.dtype == cdt:
                        grad_w.addmm_(z.t(), h_c)
                    else:  # fp32 master weight under autocast: accumulate in fp32
                        grad_w.add_(z.t() @ h_c)
                del z
        loss = loss_rows.sum() / n_valid if n_valid else loss_rows.sum() * float("nan")
        ctx.save_for_backward(
            grad_h if grad_h is not None else torch.empty(0), grad_w if grad_w is not None else torch.empty(0)
        )
        ctx.hidden_shape = hidden.shape
        ctx.need_h, ctx.need_w = need_h, need_w
        return loss

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        # The loss is usually the end of the graph (grad 1): skip two full-size multiplies then.
        unit = bool(torch.equal(grad_loss, torch.ones_like(grad_loss)))
        dh = dw = None
        if ctx.need_h:
            dh = (grad_h if unit else grad_h * grad_loss.to(grad_h.dtype)).view(ctx.hidden_shape)
        if ctx.need_w:
            dw = grad_w if unit else grad_w * grad_loss.to(grad_w.dtype)
        return dh, dw, None, None, None


class CrossEntropyFunction(torch.autograd.Function):
    """Mean cross-entropy of logits (N, V) against targets (N,), one Triton pass computing loss
    and gradient (the gradient is only scaled in the backward). The logits stay untouched."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, logits: Tensor, targets: Tensor, ignore_index: int
    ) -> Tensor:
        if logits.dim() != 2 or targets.shape != logits.shape[:1]:
            raise ValueError(
                f"logits, targets: expected (N, V) and (N,), got {tuple(logits.shape)} and {tuple(targets.shape)}"
            )
        z = logits if logits.stride(-1) == 1 else logits.contiguous()
        y = targets.contiguous()
        n_rows, vocab = z.shape
        valid = y != ignore_index
        bad = valid & ((y < 0) | (y >= vocab))
        n_valid, n_bad = torch.stack((valid.sum(), bad.sum())).tolist()
        if n_bad:
            raise ValueError(
                f"targets: {n_bad} target(s) outside [0, {vocab}) and not ignore_index={ignore_index}"
            )
        has_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(z) if has_grad else z
        loss_rows = torch.empty(n_rows, dtype=torch.float32, device=z.device)
        block = min(_MAX_BLOCK, triton.next_power_of_2(vocab))
        rows = max(1, TILE_ELEMENTS // block)
        if n_rows:
            _ce_loss_grad[(triton.cdiv(n_rows, rows),)](
                z,
                grad,
                z.stride(0),
                grad.stride(0),
                y,
                loss_rows,
                n_rows,
                vocab,
                ignore_index,
                1.0 / n_valid if n_valid else 0.0,
                HAS_GRAD=has_grad,
                ROWS=rows,
                BLOCK=block,
                num_warps=warps_for(rows * block),
            )
        ctx.save_for_backward(grad if has_grad else torch.empty(0))
        return loss_rows.sum() / n_valid if n_valid else loss_rows.sum() * float("nan")

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        if not bool(torch.equal(grad_loss, torch.ones_like(grad_loss))):
            grad = grad * grad_loss.to(grad.dtype)
        return grad, None, None


def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean cross-entropy of logits (N, V) against targets (N,) with the Triton kernel (fp32 maths)."""
    return CrossEntropyFunction.apply(logits, targets, ignore_index)


def cross_entropy_reference(logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Plain PyTorch, as LMHeadLoss applies it to logits: fp32 cross-entropy."""
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)


def fused_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_rows: int | None = None,
) -> Tensor:
    """Mean cross-entropy of hidden (..., D) @ weight (V, D)^T against targets (...), fused."""
    return FusedLinearCrossEntropyFunction.apply(hidden, weight, targets, ignore_index, chunk_rows)


def linear_cross_entropy_reference(
    hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Plain PyTorch: optrun.runtime.model.LMHeadLoss (full logits, fp32 cross-entropy)."""
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()  # (N, V)
    return F.cross_entropy(logits.float(), targets.reshape(-1), ignore_index=ignore_index)
