"""Numerical parity: per-dtype tolerances and a comparison that says where two tensors differ.

Two tables, for two questions:
- `OP_TOLERANCE`: does a kernel compute its operation correctly? The kernel's result is
  compared with the reference evaluated in fp32 on the same (possibly low-precision) inputs, so
  the only error allowed is the kernel's own rounding: a few units in the last place of its
  output dtype.
- `MODEL_TOLERANCE`: does a patched model still compute the same function? Both sides round
  at every layer in their own order, so the allowance is wider, yet far below what a wrong
  kernel would produce (a dropped term or wrong sign moves values by O(1) of their scale).

A bound is |actual - expected| <= atol * max|expected| + rtol * |expected|, elementwise: the
absolute part scales with the tensor, so one table serves activations of size 1 and weight
gradients of size 1e-4 alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Tolerance:
    rtol: float  # relative to each expected element
    atol: float  # relative to the largest expected magnitude


# bf16 keeps 8 significant bits (one ulp = 2^-7 relative), fp16 11 bits (2^-10).
OP_TOLERANCE: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(rtol=1e-5, atol=1e-6),
    torch.bfloat16: Tolerance(rtol=2**-6, atol=2**-8),
    torch.float16: Tolerance(rtol=2**-9, atol=2**-11),
}
MODEL_TOLERANCE: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(rtol=1e-4, atol=1e-5),
    torch.bfloat16: Tolerance(rtol=2**-4, atol=2**-5),
    torch.float16: Tolerance(rtol=2**-7, atol=2**-8),
}


def tolerance(dtype: torch.dtype, table: dict[torch.dtype, Tolerance]) -> Tolerance:
    if dtype not in table:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in table)
        raise ValueError(f"dtype: no tolerance for {dtype}; allowed: {allowed}")
    return table[dtype]


@dataclass(frozen=True)
class Mismatch:
    """Where two tensors differ beyond tolerance."""

    what: str
    count: int
    total: int
    index: tuple[int, ...]
    actual: float
    expected: float
    max_abs_diff: float

    def __str__(self) -> str:
        return (
            f"{self.what}: {self.count} of {self.total} elements beyond tolerance; worst at {list(self.index)}: "
            f"{self.actual:.6g} vs {self.expected:.6g} (max |diff| {self.max_abs_diff:.3g})"
        )


def compare(actual: Tensor, expected: Tensor, tol: Tolerance, what: str = "tensor") -> Mismatch | None:
    """None when `actual` matches `expected` within `tol`; else where and by how much it does not.
    Shapes must agree; NaN or Inf on either side is a mismatch unless both agree exactly."""
    if actual.shape != expected.shape:
        raise ValueError(
            f"{what}: shape {tuple(actual.shape)} does not match expected {tuple(expected.shape)}"
        )
    # fp32 judges tolerances down to 1e-6 exactly enough, at half the memory of fp64 (GPU-sized
    # weight gradients are gigabytes); fp64 inputs keep their precision.
    work = torch.float64 if torch.float64 in (actual.dtype, expected.dtype) else torch.float32
    shape = actual.shape or (1,)
    a, e = actual.detach().to(work).reshape(shape), expected.detach().to(work).reshape(shape)
    if a.numel() == 0:
        return None
    diff = (a - e).abs()
    finite = torch.isfinite(e)
    scale = e.abs().where(finite, 0).max()
    bound = tol.atol * scale + tol.rtol * e.abs()
    same_nonfinite = ~finite & (a == e)  # matching infinities
    bad = ~((diff <= bound) | same_nonfinite)
    if not bad.any():
        return None
    excess = torch.where(bad, torch.nan_to_num(diff - bound, nan=float("inf"), posinf=float("inf")), -1.0)
    flat = int(excess.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), shape))
    return Mismatch(
        what=what,
        count=int(bad.sum()),
        total=a.numel(),
        index=index,
        actual=float(a.reshape(-1)[flat]),
        expected=float(e.reshape(-1)[flat]),
        max_abs_diff=float(torch.nan_to_num(diff, nan=float("inf")).max()),
    )
