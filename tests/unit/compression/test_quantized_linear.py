"""Weight-only quantized linear layers: the torch paths, the Triton dequant-matmul kernels (in
Triton's interpreter), the model patcher, and the quantized TinyLM against the float one."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from optrun.runtime.compression import parity
from optrun.runtime.compression.codecs import get_codec, reconstruction_error
from optrun.runtime.compression.quantized_linear import (
    QuantizedLinear,
    int8_linear_torch,
    model_weight_bytes,
    quantize_model,
)
from optrun.runtime.data import Corpus
from optrun.runtime.model import build_model

CPU = torch.device("cpu")


def _linear(k: int, n: int, bias: bool, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias)


def _where(a: torch.Tensor, b: torch.Tensor) -> str:
    i = int((a - b).abs().argmax())
    return f"max |diff| {float((a - b).abs().max()):.3g} at flat index {i}: {float(a.reshape(-1)[i])} vs {float(b.reshape(-1)[i])}"


# --- torch paths ------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["int8", "int4", "fp8", "int8-block"])
@pytest.mark.parametrize("bias", [True, False])
def test_quantized_linear_equals_a_float_linear_with_the_dequantized_weight(codec, bias):
    lin = _linear(48, 70, bias)
    c = get_codec(codec, group_size=16)
    q = QuantizedLinear.from_linear(lin, c)
    x = torch.randn(3, 5, 48)  # leading dims are kept
    ref = F.linear(x, c.decode(c.encode(lin.weight.detach())), lin.bias)
    y = q(x)
    assert y.shape == (3, 5, 70)
    # fp32: only summation order differs between the paths.
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5), _where(y, ref)


@pytest.mark.parametrize(("codec", "bound"), [("int8", 0.01), ("int4", 0.15), ("fp8", 0.04)])
def test_quantized_linear_output_is_close_to_the_float_layer(codec, bound):
    lin = _linear(256, 128, True)
    x = torch.randn(16, 256)
    with torch.no_grad():
        ref = lin(x)
    y = QuantizedLinear.from_linear(lin, get_codec(codec, group_size=64))(x)
    assert reconstruction_error(ref, y) < bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("m", "n", "k"), [(7, 33, 40), (1, 1024, 1024), (2, 1024, 1030)])
def test_int8_torch_path_matches_the_dequantize_reference_for_each_dtype(dtype, m, n, k):
    # (1, 1024, 1024) and (2, 1024, 1030) take torch's int8 kernel in fp32; the rest dequantize.
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g)
    p = get_codec("int8").encode(w)
    x = torch.randn(m, k, generator=g).to(dtype)
    y = int8_linear_torch(x, p.tensors["q"], p.tensors["scale"], None)
    ref = F.linear(x.float(), p.tensors["q"].float() * p.tensors["scale"][:, None])
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    assert y.dtype == dtype
    assert torch.allclose(y.float(), ref, rtol=tol, atol=tol * ref.abs().max()), _where(y.float(), ref)


def test_the_weight_property_dequantizes_for_code_that_reads_it():
    lin = _linear(32, 16, False)
    q = QuantizedLinear.from_linear(lin, get_codec("int8"))
    assert q.weight.shape == (16, 32)
    assert reconstruction_error(lin.weight.detach(), q.weight) < 0.01
    assert q.nbytes == 16 * 32 + 16 * 4


def test_payload_buffers_follow_the_module_into_its_state_dict():
    q = QuantizedLinear.from_linear(_linear(32, 16, True), get_codec("int4", group_size=16))
    sd = q.state_dict()
    assert set(sd) == {"w_packed", "w_scale", "bias"}
    assert sd["w_packed"].dtype == torch.uint8 and sd["w_packed"].shape == (16, 16)


# --- Triton kernels under the interpreter ---------------------------------------------------------


@pytest.fixture
def interpreted(monkeypatch):
    """The kernels decide per launch; on a CPU tensor they need TRITON_INTERPRET=1."""
    if torch.cuda.is_available():
        yield torch.device("cuda")
        return
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield CPU


@pytest.mark.parametrize(("m", "k", "n"), [(1, 64, 64), (5, 100, 70), (17, 48, 130)])
@pytest.mark.parametrize("bias", [True, False])
def test_triton_int8_kernel_matches_the_torch_path(interpreted, m, k, n, bias):
    from optrun.runtime.compression import dequant_kernels

    g = torch.Generator().manual_seed(m * k + n)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    p = get_codec("int8").encode(w)
    ref = F.linear(x, p.tensors["q"].float() * p.tensors["scale"][:, None], b)
    dev = interpreted
    y = dequant_kernels.int8_matmul(
        x.to(dev), p.tensors["q"].to(dev), p.tensors["scale"].to(dev), b.to(dev) if b is not None else None
    ).cpu()
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-4), _where(y, ref)


@pytest.mark.parametrize(("m", "k", "n", "group"), [(1, 64, 64, 32), (5, 100, 70, 16), (17, 48, 130, 8)])
@pytest.mark.parametrize("bias", [True, False])
def test_triton_int4_kernel_matches_the_torch_path(interpreted, m, k, n, group, bias):
    from optrun.runtime.compression import dequant_kernels

    g = torch.Generator().manual_seed(m * k + n)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    c = get_codec("int4", group_size=group)
    p = c.encode(w)  # k=100, group 16: rows padded to 112, the kernel must ignore the padding
    ref = F.linear(x, c.decode(p), b)
    dev = interpreted
    y = dequant_kernels.int4_matmul(
        x.to(dev),
        p.tensors["packed"].to(dev),
        p.tensors["scale"].to(dev),
        group,
        b.to(dev) if b is not None else None,
    ).cpu()
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-4), _where(y, ref)


def test_triton_kernels_refuse_a_cpu_tensor_without_the_interpreter(monkeypatch):
    from optrun.runtime.compression import dequant_kernels

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    p = get_codec("int8").encode(torch.randn(16, 16))
    with pytest.raises(RuntimeError, match=r"needs a CUDA device.*TRITON_INTERPRET=1"):
        dequant_kernels.int8_matmul(torch.randn(2, 16), p.tensors["q"], p.tensors["scale"])


# --- the patcher --------------------------------------------------------------------------------


def test_quantize_model_swaps_every_linear_and_leaves_the_original_alone():
    torch.manual_seed(0)
    model = build_model("tiny-lm")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qmodel, report = quantize_model(model, "int8", max_error=0.02)
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert report.tensors == n_linear == report.compressed
    assert not any(type(m) is nn.Linear for m in qmodel.modules())
    assert isinstance(qmodel.tok_embeddings, nn.Embedding)  # embeddings are not linear layers
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # Linear weights are most of tiny-lm: the whole model shrinks well over 2x.
    assert model_weight_bytes(model) / model_weight_bytes(qmodel) > 2.5


def test_layers_that_trip_the_gate_stay_full_precision_linear():
    torch.manual_seed(0)
    model = build_model("tiny-lm")
    with torch.no_grad():
        # One large value per int4 group of 32, the rest just under half a step (1/7 / 2): they
        # all round to zero, a third of the head's norm is lost, far over the bound.
        w = model.output.weight
        w.copy_(torch.sign(torch.randn_like(w)) * 0.07)
        w[:, ::32] = 1.0
    qmodel, report = quantize_model(model, get_codec("int4", group_size=32), max_error=0.15)
    assert type(qmodel.output) is nn.Linear
    assert torch.equal(qmodel.output.weight, model.output.weight)
    tripped = [r.name for r in report.records if r.tripped]
    assert tripped == ["output.weight"] and report.trips == 1 and not report.failed
    assert isinstance(qmodel.layers[0].attn.wq, QuantizedLinear)


def test_a_tied_output_head_is_not_quantized():
    torch.manual_seed(0)
    model = build_model("tiny-lm")
    model.output.weight = model.tok_embeddings.weight  # tied, as many LMs do
    qmodel, report = quantize_model(model, "int8", max_error=0.02)
    assert type(qmodel.output) is nn.Linear
    assert qmodel.output.weight is qmodel.tok_embeddings.weight
    assert "output.weight" not in [r.name for r in report.records]


# --- the quantized TinyLM against the float one ----------------------------------------------------


@pytest.fixture(scope="module")
def trained():
    """tiny-lm after a short training, so its predictions are peaked enough to compare greedily."""
    torch.manual_seed(1234)
    model = build_model("tiny-lm")
    corpus = Corpus.build("pydoc")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        x, y = corpus.batch("train", 64, 8, gen)
        loss = model.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), corpus


@pytest.mark.parametrize(("codec", "ppl_tol", "min_agree"), [("int8", 0.005, 0.9), ("int4", 0.05, 0.5)])
def test_quantized_tinylm_keeps_perplexity_and_greedy_outputs(trained, codec, ppl_tol, min_agree):
    model, corpus = trained
    qmodel, report = quantize_model(model, get_codec(codec, group_size=32), max_error=0.2)
    assert report.compressed == report.tensors
    res = parity.compare(model, qmodel, corpus, CPU, new_tokens=16)
    assert res["referencePerplexity"] < 20  # trained: far below the 260 of a uniform guess
    assert abs(res["perplexityRise"]) < ppl_tol, res
    assert res["greedyAgreement"] >= min_agree, res
    assert math.isclose(res["quantizedPerplexity"], math.exp(res["quantizedLoss"]))


def test_triton_int4_kernel_agrees_whether_scales_apply_per_tile_or_per_element(interpreted):
    from optrun.runtime.compression import dequant_kernels

    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(4, 96, generator=g), torch.randn(40, 96, generator=g)
    c = get_codec("int4", group_size=32)
    p = c.encode(w)
    ref = F.linear(x, c.decode(p))
    dev = interpreted
    args = (x.to(dev), p.tensors["packed"].to(dev), p.tensors["scale"].to(dev), 32, None)
    # K step 32: each half-tile (16 bytes) lies inside a group of 32, the scales multiply the dot;
    # K step 128: half-tiles span groups, every element is scaled before the dot.
    in_group = dequant_kernels.int4_matmul(*args, config=dequant_kernels.Config(16, 32, 32)).cpu()
    per_element = dequant_kernels.int4_matmul(*args, config=dequant_kernels.Config(16, 32, 128)).cpu()
    for y in (in_group, per_element):
        assert torch.allclose(y, ref, rtol=1e-5, atol=1e-4), _where(y, ref)
