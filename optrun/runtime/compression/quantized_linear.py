"""Weight-only quantized linear layers for inference, and the patcher that puts them in a model.

`QuantizedLinear` keeps a linear layer's weight as a codec payload (int8 per channel, int4
group-wise, or any other codec) and computes y = x @ W'^T + b with W' the dequantized weight.
Activations stay in their dtype. Paths:

- int8 / int4 on CUDA: the Triton dequant-matmul kernels of `dequant_kernels` (weights are
  dequantized tile by tile in registers, never materialised).
- int8 on a CPU, decoding (one or two fp32 rows) against a large weight: torch's
  `_weight_int8pack_mm` (the CPU kernel torchao uses for int8 weight-only).
- every other case: dequantize the weight, then F.linear (the reference all paths match).

`quantize_model(model, codec, max_error)` copies a model and swaps each nn.Linear whose weight
passes the reconstruction-error gate; a layer that trips the gate stays nn.Linear in full
precision. Embeddings are not linear layers and are left alone; a linear layer whose weight is
shared with another module (tied embeddings) is skipped, since quantizing it would untie them.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optrun.runtime.compression.codecs import Codec, Int4Codec, Payload, get_codec
from optrun.runtime.compression.gate import GateReport, ReconstructionGate

log = logging.getLogger(__name__)

# Codecs with a fused dequant-matmul; the others dequantize the whole weight per call.
FUSED_CODECS = ("int8", "int4")


def _triton_ok(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        from optrun.runtime.compression import dequant_kernels  # noqa: F401
    except ImportError:  # a CUDA build without triton: the torch path still serves
        return False
    return True


class QuantizedLinear(nn.Module):
    """y = x @ dequant(payload)^T + bias, with the weight stored as the codec's payload."""

    def __init__(
        self, in_features: int, out_features: int, codec: Codec, payload: Payload, bias: Tensor | None = None
    ) -> None:
        super().__init__()
        if payload.shape != (out_features, in_features):
            raise ValueError(
                f"payload: shape {payload.shape} is not (out_features, in_features) = "
                f"{(out_features, in_features)}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.codec = codec
        self.weight_dtype = payload.dtype
        self._names = list(payload.tensors)
        for name, t in payload.tensors.items():
            # Buffers: they follow .to(device) and land in state_dict, and carry no gradient.
            self.register_buffer(f"w_{name}", t)
        if bias is not None:
            self.bias: Tensor | None = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.bias = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, codec: Codec, payload: Payload | None = None) -> QuantizedLinear:
        p = payload if payload is not None else codec.encode(linear.weight.detach())
        return cls(linear.in_features, linear.out_features, codec, p, linear.bias)

    def payload(self) -> Payload:
        tensors = {name: getattr(self, f"w_{name}") for name in self._names}
        return Payload(self.codec.name, (self.out_features, self.in_features), self.weight_dtype, tensors)

    @property
    def weight(self) -> Tensor:
        """The dequantized weight (out, in): for code that reads `.weight` (a tied loss head)."""
        return self.codec.decode(self.payload())

    @property
    def nbytes(self) -> int:
        """Bytes the layer's weight occupies (the payload), bias excluded."""
        return self.payload().nbytes

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, codec={self.codec.name}, "
            f"bias={self.bias is not None}"
        )

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        y = self._matmul(x2, bias)
        return y.reshape(*lead, self.out_features)

    def _matmul(self, x: Tensor, bias: Tensor | None) -> Tensor:
        name = self.codec.name
        if name in FUSED_CODECS and x.is_cuda and _triton_ok(x.device):
            from optrun.runtime.compression import dequant_kernels

            if name == "int8":
                return dequant_kernels.int8_matmul(x, self.w_q, self.w_scale, bias)
            return dequant_kernels.int4_matmul(x, self.w_packed, self.w_scale, self._group_size(), bias)
        if name == "int8":
            return int8_linear_torch(x, self.w_q, self.w_scale, bias)
        return F.linear(x, self.codec.decode(self.payload()).to(x.dtype), bias)

    def _group_size(self) -> int:
        assert isinstance(self.codec, Int4Codec)
        return self.codec.group_size


# torch's CPU int8 kernel loops over rows: it beats dequantizing only for a row or two against a
# large weight (decoding), and loses badly beyond (measured on a 2-core EPYC: 4096 x 4096, one
# row: 4x faster than dequantize + linear; 16 rows, or any 128-wide layer: many times slower).
INT8PACK_MAX_ROWS = 2
INT8PACK_MIN_WEIGHTS = 1 << 20


def int8_linear_torch(x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """x @ (q * scale[:, None])^T (+ bias) without a GPU kernel.

    For one or two fp32 rows on a CPU against a large weight, torch's `_weight_int8pack_mm`
    multiplies by the int8 weight directly, with no dequantized copy. Only fp32: in torch 2.13
    its bf16 kernel crashes (SIGSEGV) when K is not a multiple of 32. Everywhere else the
    dequantize-then-linear reference serves."""
    if (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.shape[0] <= INT8PACK_MAX_ROWS
        and q.numel() >= INT8PACK_MIN_WEIGHTS
    ):
        try:
            y = torch._weight_int8pack_mm(x.contiguous(), q, scale)
        except (RuntimeError, NotImplementedError):  # a build without the op
            y = None
        if y is not None:
            return y + bias if bias is not None else y
    return F.linear(x, (q.float() * scale[:, None]).to(x.dtype), bias)


def linear_weights(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The model's nn.Linear layers whose weight is owned by them alone (tied weights excluded)."""
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and owners.get(id(m.weight), 0) == 1
    ]


def quantize_model(model: nn.Module, codec: Codec | str, max_error: float) -> tuple[nn.Module, GateReport]:
    """A copy of `model` with every gated nn.Linear replaced by a QuantizedLinear.

    Each linear weight goes through the reconstruction-error gate: within `max_error` it is
    quantized, above it the layer stays in full precision (a gate trip). The input model is not
    modified. Returns the copy and the gate's report."""
    c = get_codec(codec) if isinstance(codec, str) else codec
    gate = ReconstructionGate(c, max_error)
    qmodel = copy.deepcopy(model)
    for name, linear in linear_weights(qmodel):
        payload, record = gate.check(name + ".weight", linear.weight.detach())
        if payload is None:
            if record.tripped:
                log.info(
                    "compression gate: %s kept in full precision (error %.4g > %.4g)",
                    name,
                    record.error,
                    max_error,
                )
            continue
        _set_submodule(qmodel, name, QuantizedLinear.from_linear(linear, c, payload))
    report = gate.report
    log.info(
        "quantized %d of %d linear layers with %s (%.2fx on their weights), %d gate trips",
        report.compressed,
        report.tensors,
        c.name,
        report.compressed_ratio,
        report.trips,
    )
    return qmodel, report


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (quantized payloads included): the model's memory."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
