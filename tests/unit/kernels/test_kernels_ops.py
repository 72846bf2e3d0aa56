"""Every Triton kernel against its plain-PyTorch reference, in Triton's interpreter on the CPU:
outputs and every gradient, round and odd shapes, fp32 and bf16.

The reference runs in fp32 on the very same (possibly bf16) inputs, so the only error a kernel
may show is its own rounding (`parity.OP_TOLERANCE`); a failure names the tensor and where it
differs.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from optrun.runtime.kernels.ops.cross_entropy import (
    cross_entropy,
    cross_entropy_reference,
    fused_linear_cross_entropy,
    linear_cross_entropy_reference,
)
from optrun.runtime.kernels.ops.rms_norm import rms_norm, rms_norm_reference
from optrun.runtime.kernels.ops.rope import rotary, rotary_reference
from optrun.runtime.kernels.ops.swiglu import swiglu, swiglu_reference
from optrun.runtime.kernels.parity import OP_TOLERANCE, compare
from optrun.runtime.model import rope_tables

DTYPES = [torch.float32, torch.bfloat16]


def assert_matches(actual: Tensor, expected: Tensor, dtype: torch.dtype, what: str) -> None:
    assert actual.dtype == dtype or what.startswith("loss"), f"{what}: dtype {actual.dtype}, expected {dtype}"
    mismatch = compare(actual, expected, OP_TOLERANCE[dtype], what)
    assert mismatch is None, str(mismatch)


def gold(*tensors: Tensor) -> list[Tensor]:
    """fp32 leaf copies of the inputs: the reference computes on exactly the kernel's inputs."""
    return [t.detach().float().requires_grad_() for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", [(4, 64, 128), (3, 423, 213), (5, 1, 7)], ids=str)
def test_rms_norm_matches_reference_in_output_and_gradients(
    shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype).requires_grad_()
    w = (1 + 0.2 * torch.randn(shape[-1], generator=gen)).to(dtype).requires_grad_()
    dy = torch.randn(shape, generator=gen).to(dtype)
    y = rms_norm(x, w, 1e-5)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    xr, wr = gold(x, w)
    yr = rms_norm_reference(xr, wr, 1e-5)
    dxr, dwr = torch.autograd.grad(yr, (xr, wr), dy.float())
    assert_matches(y, yr, dtype, "y")
    assert_matches(dx, dxr, dtype, "dx")
    assert_matches(dw, dwr, dtype, "dw")


def test_rms_norm_keeps_activation_dtype_with_fp32_weight_as_under_autocast() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 33, 96, generator=gen).to(torch.bfloat16).requires_grad_()
    w = (1 + 0.1 * torch.randn(96, generator=gen)).requires_grad_()
    y = rms_norm(x, w)
    dx, dw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
    xr, wr = gold(x, w)
    dxr, dwr = torch.autograd.grad(rms_norm_reference(xr, wr), (xr, wr), torch.ones(y.shape))
    assert y.dtype == torch.bfloat16 and dw.dtype == torch.float32
    assert_matches(y, rms_norm_reference(xr, wr), torch.bfloat16, "y")
    assert_matches(dx, dxr, torch.bfloat16, "dx")
    # dw is reduced in fp32 from bf16 inputs and stays fp32: fp32 tolerance.
    assert_matches(dw, dwr, torch.float32, "dw")


def test_rms_norm_refuses_a_weight_of_the_wrong_size() -> None:
    with pytest.raises(ValueError, match="weight: expected shape \\(8,\\)"):
        rms_norm(torch.randn(2, 8), torch.ones(7))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", [(2, 64, 344), (3, 423, 213)], ids=str)
def test_swiglu_matches_reference_in_output_and_gradients(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    a = (torch.randn(shape, generator=gen) * 4).to(dtype).requires_grad_()
    b = torch.randn(shape, generator=gen).to(dtype).requires_grad_()
    dc = torch.randn(shape, generator=gen).to(dtype)
    c = swiglu(a, b)
    da, db = torch.autograd.grad(c, (a, b), dc)
    ar, br = gold(a, b)
    cr = swiglu_reference(ar, br)
    dar, dbr = torch.autograd.grad(cr, (ar, br), dc.float())
    assert_matches(c, cr, dtype, "c")
    assert_matches(da, dar, dtype, "da")
    assert_matches(db, dbr, dtype, "db")


def test_swiglu_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="b: expected the shape of a"):
        swiglu(torch.randn(2, 3), torch.randn(3, 2))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize(
    ("b", "t", "hq", "hk", "d", "start", "attention_layout"),
    [(2, 64, 4, 4, 32, 0, True), (3, 423, 3, 1, 26, 5, True), (2, 7, 8, 2, 64, 100, False)],
    ids=["round", "odd-gqa-offset", "contiguous-bhtd"],
)
def test_rotary_matches_reference_in_output_and_gradients(
    b: int, t: int, hq: int, hk: int, d: int, start: int, attention_layout: bool, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(3)

    def make(h: int) -> Tensor:
        if attention_layout:  # (B, H, T, D) view of (B, T, H, D) memory, as Attention builds it
            return torch.randn(b, t, h, d, generator=gen).to(dtype).transpose(1, 2).requires_grad_()
        return torch.randn(b, h, t, d, generator=gen).to(dtype).requires_grad_()

    q, k = make(hq), make(hk)
    cos, sin = rope_tables(start + t, d, 10000.0)
    cos, sin = cos[start:], sin[start:]
    dq, dk = torch.randn(q.shape, generator=gen).to(dtype), torch.randn(k.shape, generator=gen).to(dtype)
    qo, ko = rotary(q, k, cos, sin)
    gq, gk = torch.autograd.grad((qo, ko), (q, k), (dq, dk))
    qr, kr = gold(q, k)
    qor, kor = rotary_reference(qr, kr, cos, sin)
    gqr, gkr = torch.autograd.grad((qor, kor), (qr, kr), (dq.float(), dk.float()))
    assert_matches(qo, qor, dtype, "q")
    assert_matches(ko, kor, dtype, "k")
    assert_matches(gq, gqr, dtype, "dq")
    assert_matches(gk, gkr, dtype, "dk")


def test_rotary_backward_is_the_inverse_rotation() -> None:
    # Rotation is orthogonal: pulling a rotated vector back through the backward returns it.
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 2, 9, 16, generator=gen, requires_grad=True)
    k = torch.randn(1, 1, 9, 16, generator=gen, requires_grad=True)
    cos, sin = rope_tables(9, 16, 10000.0)
    qo, ko = rotary(q, k, cos, sin)
    back_q, back_k = torch.autograd.grad((qo, ko), (q, k), (qo.detach(), ko.detach()))
    assert compare(back_q, q.detach(), OP_TOLERANCE[torch.float32], "q") is None
    assert compare(back_k, k.detach(), OP_TOLERANCE[torch.float32], "k") is None


def test_rotary_refuses_an_odd_head_dimension() -> None:
    cos, sin = rope_tables(4, 6, 10000.0)
    with pytest.raises(ValueError, match="head dimension must be even"):
        rotary(torch.randn(1, 1, 4, 5), torch.randn(1, 1, 4, 5), cos[:, :2], sin[:, :2])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize(
    ("shape", "vocab", "chunk_rows", "grad_scale"),
    [((4, 64, 128), 260, None, 1.0), ((3, 141, 213), 1031, 64, 2.5)],
    ids=["round-one-chunk-unit-grad", "odd-many-chunks-scaled-grad"],
)
def test_fused_linear_cross_entropy_matches_reference_in_loss_and_gradients(
    shape: tuple[int, ...], vocab: int, chunk_rows: int | None, grad_scale: float, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(shape, generator=gen).to(dtype).requires_grad_()
    w = (0.05 * torch.randn(vocab, shape[-1], generator=gen)).to(dtype).requires_grad_()
    y = torch.randint(0, vocab, shape[:-1], generator=gen)
    y.view(-1)[::7] = -100  # ignored positions count neither in the loss nor in the mean
    loss = fused_linear_cross_entropy(h, w, y, chunk_rows=chunk_rows)
    dh, dw = torch.autograd.grad(loss * grad_scale, (h, w))
    hr, wr = gold(h, w)
    ref = linear_cross_entropy_reference(hr, wr, y)
    dhr, dwr = torch.autograd.grad(ref * grad_scale, (hr, wr))
    assert loss.dtype == torch.float32
    # The loss is a mean over logits the kernel holds in `dtype`: it inherits their rounding.
    assert_matches(loss, ref, dtype, "loss")
    assert_matches(dh, dhr, dtype, "dh")
    assert_matches(dw, dwr, dtype, "dw")


def test_fused_linear_cross_entropy_needs_no_gradient_without_grad_inputs() -> None:
    gen = torch.Generator().manual_seed(6)
    h, w = torch.randn(10, 16, generator=gen), torch.randn(40, 16, generator=gen)
    y = torch.randint(0, 40, (10,), generator=gen)
    loss = fused_linear_cross_entropy(h, w, y)
    assert not loss.requires_grad
    assert compare(loss, linear_cross_entropy_reference(h, w, y), OP_TOLERANCE[torch.float32], "loss") is None


def test_fused_linear_cross_entropy_names_out_of_range_targets() -> None:
    y = torch.tensor([0, 5, 40, -100])
    with pytest.raises(ValueError, match=r"targets: 1 target\(s\) outside \[0, 40\)"):
        fused_linear_cross_entropy(torch.randn(4, 8), torch.randn(40, 8), y)


def test_triton_kernels_refuse_a_cpu_without_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    from optrun.runtime.kernels.ops._launch import TritonUnavailableError

    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(TritonUnavailableError, match=r"needs a CUDA device.*TRITON_INTERPRET=1"):
        rms_norm(torch.randn(2, 8), torch.ones(8))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize(("n", "vocab"), [(64, 260), (423, 3001)], ids=str)
def test_cross_entropy_over_given_logits_matches_reference_and_leaves_them_untouched(
    n: int, vocab: int, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(7)
    z = (3 * torch.randn(n, vocab, generator=gen)).to(dtype).requires_grad_()
    y = torch.randint(0, vocab, (n,), generator=gen)
    y[::5] = -100
    before = z.detach().clone()
    loss = cross_entropy(z, y)
    (dz,) = torch.autograd.grad(loss * 0.5, z)
    (zr,) = gold(z)
    ref = cross_entropy_reference(zr, y)
    (dzr,) = torch.autograd.grad(ref * 0.5, zr)
    assert torch.equal(z.detach(), before)
    assert_matches(loss, ref, torch.float32, "loss")  # fp32 maths on exactly these logits
    assert_matches(dz, dzr, dtype, "dz")
