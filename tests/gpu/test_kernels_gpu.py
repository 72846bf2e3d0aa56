"""The Triton kernels compiled for a CUDA device: the same checks as the CPU tests (outputs and
every gradient against the fp32 reference on the same inputs), at model-sized shapes, plus
what only a GPU shows: the patched model on the device, selection among all three candidates,
a candidate rejected for parity, and the fused cross-entropy's memory."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from optrun.runtime.kernels.ops.cross_entropy import (
    cross_entropy,
    cross_entropy_reference,
    fused_linear_cross_entropy,
    linear_cross_entropy_reference,
)
from optrun.runtime.kernels.ops.rms_norm import rms_norm, rms_norm_reference
from optrun.runtime.kernels.ops.rope import rotary, rotary_reference
from optrun.runtime.kernels.ops.swiglu import swiglu, swiglu_reference
from optrun.runtime.kernels.parity import MODEL_TOLERANCE, OP_TOLERANCE, Tolerance, compare
from optrun.runtime.kernels.patcher import Binding, patch_model
from optrun.runtime.kernels.select import select_kernels
from optrun.runtime.model import build_model, rope_tables

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CUDA = torch.device("cuda")
# fp32 and bf16 (the training precisions); fp16 shares bf16's code path. Shapes: one odd, one
# model-sized per kernel, so the whole file compiles few kernels and fits a short GPU lease.
DTYPES = [torch.float32, torch.bfloat16]
IDS = lambda d: str(d).removeprefix("torch.")  # noqa: E731


@pytest.fixture(autouse=True)
def exact_fp32_matmuls() -> None:
    # TF32 would make the fp32 reference itself a 10-bit computation.
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def check(actual: Tensor, expected: Tensor, tol: Tolerance, what: str) -> None:
    mismatch = compare(actual, expected, tol, what)
    assert mismatch is None, str(mismatch)


def gold(*tensors: Tensor) -> list[Tensor]:
    return [t.detach().float().requires_grad_() for t in tensors]


def randn(*shape: int, dtype: torch.dtype, scale: float = 1.0, seed: int = 0) -> Tensor:
    gen = torch.Generator(device=CUDA).manual_seed(seed)
    return (torch.randn(*shape, generator=gen, device=CUDA) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("shape", [(3, 423, 213), (8, 512, 8192)], ids=str)
def test_rms_norm_on_cuda_matches_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = randn(*shape, dtype=dtype, scale=3).requires_grad_()
    w = (1 + randn(shape[-1], dtype=torch.float32, scale=0.2, seed=1)).to(dtype).requires_grad_()
    dy = randn(*shape, dtype=dtype, seed=2)
    y = rms_norm(x, w)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    xr, wr = gold(x, w)
    yr = rms_norm_reference(xr, wr)
    dxr, dwr = torch.autograd.grad(yr, (xr, wr), dy.float())
    tol = OP_TOLERANCE[dtype]
    check(y, yr, tol, "y")
    check(dx, dxr, tol, "dx")
    # dw sums thousands of rows in fp32 and is rounded once to `dtype`.
    check(dw, dwr, tol, "dw")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("shape", [(3, 423, 213), (8, 512, 11008)], ids=str)
def test_swiglu_on_cuda_matches_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    a = randn(*shape, dtype=dtype, scale=4).requires_grad_()
    b = randn(*shape, dtype=dtype, seed=1).requires_grad_()
    dc = randn(*shape, dtype=dtype, seed=2)
    c = swiglu(a, b)
    da, db = torch.autograd.grad(c, (a, b), dc)
    ar, br = gold(a, b)
    cr = swiglu_reference(ar, br)
    dar, dbr = torch.autograd.grad(cr, (ar, br), dc.float())
    tol = OP_TOLERANCE[dtype]
    check(c, cr, tol, "c")
    check(da, dar, tol, "da")
    check(db, dbr, tol, "db")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize(("b", "t", "hq", "hk", "d"), [(3, 423, 3, 1, 26), (2, 2048, 32, 8, 128)], ids=str)
def test_rotary_on_cuda_matches_reference(
    b: int, t: int, hq: int, hk: int, d: int, dtype: torch.dtype
) -> None:
    q = randn(b, t, hq, d, dtype=dtype).transpose(1, 2).requires_grad_()
    k = randn(b, t, hk, d, dtype=dtype, seed=1).transpose(1, 2).requires_grad_()
    cos, sin = rope_tables(t + 3, d, 500000.0, device=CUDA)
    cos, sin = cos[3:], sin[3:]
    dq, dk = randn(*q.shape, dtype=dtype, seed=2), randn(*k.shape, dtype=dtype, seed=3)
    qo, ko = rotary(q, k, cos, sin)
    gq, gk = torch.autograd.grad((qo, ko), (q, k), (dq, dk))
    qr, kr = gold(q, k)
    qor, kor = rotary_reference(qr, kr, cos, sin)
    gqr, gkr = torch.autograd.grad((qor, kor), (qr, kr), (dq.float(), dk.float()))
    tol = OP_TOLERANCE[dtype]
    for a, e, what in ((qo, qor, "q"), (ko, kor, "k"), (gq, gqr, "dq"), (gk, gkr, "dk")):
        check(a, e, tol, what)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize(("n", "d", "v"), [(3 * 423, 213, 1031), (4096, 2048, 32000)], ids=str)
def test_fused_linear_cross_entropy_on_cuda_matches_reference(
    n: int, d: int, v: int, dtype: torch.dtype
) -> None:
    h = randn(n, d, dtype=dtype).requires_grad_()
    w = randn(v, d, dtype=dtype, scale=d**-0.5, seed=1).requires_grad_()
    gen = torch.Generator(device=CUDA).manual_seed(2)
    y = torch.randint(0, v, (n,), generator=gen, device=CUDA)
    y[::11] = -100
    loss = fused_linear_cross_entropy(h, w, y)
    dh, dw = torch.autograd.grad(loss * 3.0, (h, w))
    hr, wr = gold(h, w)
    ref = linear_cross_entropy_reference(hr, wr, y)
    dhr, dwr = torch.autograd.grad(ref * 3.0, (hr, wr))
    # The kernel's logits and logit gradients are held in `dtype` (as the eager bf16 path holds
    # them), and dW sums over chunks in `dtype`: below fp32 the model-level tolerance applies.
    tol = OP_TOLERANCE[dtype] if dtype == torch.float32 else MODEL_TOLERANCE[dtype]
    check(loss, ref, tol, "loss")
    check(dh, dhr, tol, "dh")
    check(dw, dwr, tol, "dw")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize(("n", "v"), [(1269, 1031), (4096, 128256)], ids=str)
def test_cross_entropy_on_cuda_matches_reference(n: int, v: int, dtype: torch.dtype) -> None:
    z = randn(n, v, dtype=dtype, scale=3).requires_grad_()
    y = torch.randint(0, v, (n,), generator=torch.Generator(device=CUDA).manual_seed(3), device=CUDA)
    y[::9] = -100
    loss = cross_entropy(z, y)
    (dz,) = torch.autograd.grad(loss, z)
    (zr,) = gold(z)
    ref = cross_entropy_reference(zr, y)
    (dzr,) = torch.autograd.grad(ref, zr)
    check(loss, ref, OP_TOLERANCE[torch.float32], "loss")
    check(dz, dzr, OP_TOLERANCE[dtype], "dz")


def test_fused_linear_cross_entropy_needs_far_less_memory_than_eager() -> None:
    n, d, v = 8192, 4096, 128256
    h = randn(n, d, dtype=torch.bfloat16).requires_grad_()
    w = randn(v, d, dtype=torch.bfloat16, scale=d**-0.5, seed=1).requires_grad_()
    y = torch.randint(0, v, (n,), generator=torch.Generator(device=CUDA).manual_seed(4), device=CUDA)

    def peak(fn) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        torch.autograd.grad(fn(h, w, y), (h, w))
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start

    eager, fused = peak(linear_cross_entropy_reference), peak(fused_linear_cross_entropy)
    # Eager holds (N, V) bf16 logits, their fp32 copy and an fp32 gradient (~10 GB here); the
    # fused path holds one chunk of logits plus the gradients of h and W.
    assert fused < eager / 3, f"fused peak {fused / 2**30:.2f} GiB vs eager {eager / 2**30:.2f} GiB"


def assert_patched_matches(
    base: torch.nn.Module, fused: torch.nn.Module, *, vocab: int, precision: str
) -> None:
    """The patched model's logits, loss and every gradient against the unpatched one's, on one
    seeded batch (bf16 under autocast), within the dtype's model tolerance."""
    gen = torch.Generator(device=CUDA).manual_seed(1)
    x = torch.randint(0, vocab, (4, 256), generator=gen, device=CUDA)
    y = torch.randint(0, vocab, (4, 256), generator=gen, device=CUDA)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    results = []
    for model in (base, fused):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(x)
            loss = model.loss(x, y)
        loss.backward()
        results.append((logits, loss, {n: p.grad for n, p in model.named_parameters()}))
    (l0, s0, g0), (l1, s1, g1) = results
    tol = MODEL_TOLERANCE[dtype]
    check(l1, l0, tol, "logits")
    check(s1, s0, tol, "loss")
    assert g1.keys() == g0.keys()
    for name in g0:
        check(g1[name], g0[name], tol, f"grad {name}")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_patched_model_on_cuda_matches_unpatched(precision: str) -> None:
    torch.manual_seed(0)
    base = build_model("small-lm").to(CUDA)
    fused = copy.deepcopy(base)
    report = patch_model(fused, "triton")
    assert report.counts()["rms_norm"] == {"triton": 17}
    assert_patched_matches(base, fused, vocab=256, precision=precision)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["triton", "liger"])
def test_a_hf_llama_patched_on_cuda_matches_unpatched(kind: str, precision: str) -> None:
    """Every patch site of a Hugging Face Llama (RMSNorm, SwiGLU MLP, rotary, loss) swapped for
    optrun's kernels or Liger-Kernel's: the logits, loss and every gradient of the unpatched
    model. Liger's RMSNorm and SwiGLU kernels do not run in Triton's CPU interpreter, so this is
    where they are executed."""
    import transformers

    from optrun.runtime.lm import hf
    from optrun.runtime.lm.example import config_for, train_tokenizer
    from optrun.runtime.lm.tokenizers import HFTokenizer

    if kind == "liger":
        pytest.importorskip("liger_kernel")
    torch.manual_seed(0)
    config = config_for("llama", 2048, hidden=256, layers=2)
    base = hf.HFCausalLM(transformers.LlamaForCausalLM(config), HFTokenizer(train_tokenizer())).to(CUDA)
    fused = copy.deepcopy(base)
    report = patch_model(fused, kind)
    assert report.counts() == {
        "swiglu": {kind: 2},
        "rms_norm": {kind: 5},
        "cross_entropy": {kind: 1},
        "rope": {kind: 1},
    }
    assert_patched_matches(base, fused, vocab=2048, precision=precision)


def test_selection_on_cuda_measures_triton_against_eager(tmp_path) -> None:
    # torch.compile is left out (compile_timeout_s=0) to keep this file short: Inductor takes
    # seconds per operation; benchmarks/kernels.py and the CPU tests exercise the compile path.
    torch.manual_seed(0)
    model = build_model("small-lm").to(CUDA)
    x = torch.randint(0, 256, (8, 512), device=CUDA)
    sel = select_kernels(
        model,
        lambda: model.loss(x, x),
        device=CUDA,
        device_name=torch.cuda.get_device_name(),
        cache_path=tmp_path / "c.json",
        compile_timeout_s=0,
    )
    for s in sel.values():
        assert set(s.times) == {"eager", "triton"}, s.skipped
        assert s.choice == min(s.times, key=s.times.__getitem__)


class OffsetNorm(nn.Module):
    """Gemma's RMSNorm, y = x * r * (1 + w): declared (wrongly) as a plain rms_norm below."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(0.5 * torch.randn(dim))
        self.eps = 1e-6

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)).to(x.dtype)


def test_selection_rejects_a_candidate_that_computes_something_else(tmp_path) -> None:
    model = nn.Sequential(OffsetNorm(1024)).to(CUDA)
    x = torch.randn(64, 1024, device=CUDA)
    sel = select_kernels(
        model,
        lambda: model(x),
        device=CUDA,
        device_name=torch.cuda.get_device_name(),
        cache_path=None,
        mapping={OffsetNorm: Binding("rms_norm", {"weight": "weight", "eps": "eps"})},
        compile_timeout_s=0,
    )
    s = sel["rms_norm"]
    assert s.skipped["triton"].startswith("parity: output 0:"), s.skipped
    assert s.choice == "eager"
