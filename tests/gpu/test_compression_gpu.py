"""Compression on a CUDA device: the compiled Triton dequant-matmul kernels against the torch
paths in fp32, bf16 and fp16, and a weight-quantized model on the GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from optrun.runtime.compression import parity
from optrun.runtime.compression.codecs import get_codec
from optrun.runtime.compression.quantized_linear import QuantizedLinear, quantize_model
from optrun.runtime.data import Corpus
from optrun.runtime.model import build_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CUDA = torch.device("cuda")
# Kernel vs reference differ by summation order and, for 16-bit outputs, by one final rounding
# (bf16 keeps 8 mantissa bits, fp16 11): relative tolerances at about two ulps of the output.
RTOL = {torch.float32: 1e-4, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
SHAPES = [(1, 4096, 4096), (7, 1000, 333), (33, 256, 130), (128, 512, 1376)]


def _close(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    scale = ref.abs().max()
    err = (y.float() - ref).abs()
    i = int(err.argmax())
    assert bool((err <= RTOL[dtype] * (ref.abs() + scale * 0.05)).all()), (
        f"max |diff| {float(err.max()):.3g} at {i}: {float(y.reshape(-1)[i])} vs {float(ref.reshape(-1)[i])}"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("m", "k", "n"), SHAPES)
def test_compiled_int8_kernel_matches_the_dequantized_reference(dtype, m, k, n):
    from optrun.runtime.compression import dequant_kernels

    g = torch.Generator(device=CUDA).manual_seed(m + k + n)
    x = torch.randn(m, k, device=CUDA, generator=g).to(dtype)
    w = torch.randn(n, k, device=CUDA, generator=g) * 0.02
    b = torch.randn(n, device=CUDA, generator=g)
    p = get_codec("int8").encode(w)
    bias = b.to(dtype)
    # The kernel's maths in fp32: integer weights (exact in every dtype), the row scale applied
    # to the accumulator, then the bias; only the summation order and the output rounding differ.
    ref = F.linear(x.float(), p.tensors["q"].float()) * p.tensors["scale"] + bias.float()
    y = dequant_kernels.int8_matmul(x, p.tensors["q"], p.tensors["scale"], bias)
    assert y.dtype == dtype
    _close(y, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("m", "k", "n"), SHAPES)
@pytest.mark.parametrize("group", [32, 128])
def test_compiled_int4_kernel_matches_the_dequantized_reference(dtype, m, k, n, group):
    from optrun.runtime.compression import dequant_kernels

    g = torch.Generator(device=CUDA).manual_seed(m + k + n)
    x = torch.randn(m, k, device=CUDA, generator=g).to(dtype)
    w = torch.randn(n, k, device=CUDA, generator=g) * 0.02
    c = get_codec("int4", group_size=group)
    p = c.encode(w)
    # The exact product with the quantized weights, in fp32: with a K step inside one scale
    # group (the default tiles) the kernel runs its dot on the integer levels, exact in every
    # dtype, and scales the result, so only the summation order and the output rounding differ.
    ref = F.linear(x.float(), c.decode(p).float())
    y = dequant_kernels.int4_matmul(x, p.tensors["packed"], p.tensors["scale"], group)
    _close(y, ref, dtype)


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_quantized_linear_on_cuda_agrees_with_its_cpu_torch_path(codec):
    torch.manual_seed(0)
    lin = torch.nn.Linear(384, 200)
    q = QuantizedLinear.from_linear(lin, get_codec(codec, group_size=64))
    x = torch.randn(4, 9, 384)
    cpu = q(x)
    gpu = q.to(CUDA)(x.to(CUDA)).cpu()
    _close(gpu, cpu, torch.float32)


def test_weight_quantized_small_lm_on_gpu_keeps_perplexity():
    torch.manual_seed(0)
    model = build_model("small-lm").to(CUDA).eval()
    corpus = Corpus.build("pydoc")
    # Untrained weights: int4's ~12 % per-weight error moves perplexity by ~5 % (measured on an H200).
    for codec, tol in (("int8", 0.002), ("int4", 0.08)):
        qmodel, report = quantize_model(model, get_codec(codec, group_size=128), max_error=0.2)
        assert report.compressed == report.tensors
        res = parity.compare(model, qmodel, corpus, CUDA, new_tokens=8)
        assert abs(res["perplexityRise"]) < tol, (codec, res)
