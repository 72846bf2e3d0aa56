"""Tensor codecs: one interface to encode a tensor into a compact payload and decode it back.

Every codec turns a floating-point tensor into a `Payload` (the tensors that would be stored or
sent, with their exact byte size `nbytes`) and back into a tensor of the original shape and
dtype. The shape and dtype travel beside the payload (both ends know them: a module knows its
weight's shape, a DDP bucket its gradients' layout), so they are not counted in `nbytes`.

Codecs (names are those of `Compression.codec` in optrun/api/v1alpha1.py):

- ``int8``: symmetric absmax, one fp32 scale per output channel (row of the tensor viewed as
  (shape[0], -1)); q = round(x / s), s = max|x_row| / 127 (the LLM.int8()/torchao weight-only
  recipe, without outlier handling).
- ``int8-block``: the same per block of ``group_size`` consecutive elements of a row.
- ``fp8``: float8 e4m3 with one fp32 scale per row, s = max|x_row| / 448 (448 is e4m3's largest
  finite value); needs ``torch.float8_e4m3fn``.
- ``int4``: symmetric absmax per group of ``group_size`` elements of a row, q in [-7, 7] stored
  as q + 8 in a nibble, two per byte. Rows are padded to a whole number of groups; byte j of a
  row holds element j in its low nibble and element j + K/2 in its high nibble ("split-half"
  packing, which lets the dequant-matmul kernel unpack a tile with two shifts and no shuffle).
- ``topk``: the ``ceil(topk_ratio * n)`` largest-magnitude elements with their int32 indices.
  Biased: use with `ErrorFeedback` (Stich et al., 2018) so what is dropped is sent later.
- ``lowrank``: M ~ P Q^T with P (n, r) orthonormal and Q (m, r), from subspace (power)
  iteration started at a seeded random Q, as in PowerSGD (Vogels et al., 2019). A tensor whose
  rank-r factors are not smaller than itself is sent dense.

Inputs must be finite fp32, fp16 or bf16 tensors: NaN/Inf are rejected with a ValueError
(non-finite values are the safety gates' business, and a codec must not turn them into
plausible numbers). Very small magnitudes (a row whose largest |x| is below ~1e-36) may flush
to zero; the reconstruction-error gate catches that as a large error.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

# The dtypes a codec accepts; float64 is left out on purpose: its range exceeds the fp32 scales.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP8_MAX = 448.0  # largest finite float8 e4m3fn value


class NonFiniteTensorError(ValueError):
    """A codec was given a tensor holding NaN or Inf."""


@dataclass(frozen=True)
class Payload:
    """What a codec stores or sends for one tensor: named tensors plus the original shape/dtype.

    `nbytes` counts the tensors only: the bytes that cross the wire or sit in memory."""

    codec: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    tensors: dict[str, Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def original_nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()

    @property
    def ratio(self) -> float:
        """Original bytes over payload bytes (inf for an empty payload of a non-empty tensor)."""
        return self.original_nbytes / self.nbytes if self.nbytes else math.inf

    def layout(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """Names, dtypes and shapes of the tensors: what a receiver needs to unpack the bytes."""
        return [(k, t.dtype, tuple(t.shape)) for k, t in self.tensors.items()]

    def to_bytes(self) -> Tensor:
        """All tensors as one flat uint8 tensor (one collective per payload)."""
        parts = [t.contiguous().reshape(-1).view(torch.uint8) for t in self.tensors.values()]
        if not parts:
            return torch.empty(0, dtype=torch.uint8)
        return torch.cat(parts)

    @classmethod
    def from_bytes(
        cls,
        codec: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
        buf: Tensor,
    ) -> Payload:
        """Inverse of `to_bytes` given the sender's `layout`."""
        tensors, offset = {}, 0
        for name, tdtype, tshape in layout:
            size = torch.empty((), dtype=tdtype).element_size()
            n = math.prod(tshape) * size
            chunk = buf[offset : offset + n]
            if (chunk.storage_offset() * buf.element_size()) % size:
                chunk = chunk.clone()  # a view must start on the element size; a copy does
            tensors[name] = chunk.view(tdtype).reshape(tshape)
            offset += n
        if offset != buf.numel():
            raise ValueError(f"buf: {buf.numel()} bytes do not match the layout's {offset} bytes")
        return cls(codec=codec, shape=shape, dtype=dtype, tensors=tensors)


def check_tensor(t: object, what: str = "tensor") -> Tensor:
    """The input contract of every codec: a finite fp32/fp16/bf16 tensor, else a clear error."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in FLOAT_DTYPES)
        raise ValueError(
            f"{what}: dtype {str(t.dtype).removeprefix('torch.')} is not supported; allowed: {allowed}"
        )
    if t.numel():
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise NonFiniteTensorError(
                f"{what}: {bad} of {t.numel()} values are NaN or Inf; codecs accept finite tensors only"
            )
    return t


def as_rows(t: Tensor) -> Tensor:
    """The tensor as a 2-D (rows, columns) view: rows are dim 0 (a weight's output channels)."""
    if t.dim() == 0:
        return t.reshape(1, 1)
    if t.dim() == 1:
        return t.reshape(1, -1)
    return t.reshape(t.shape[0], -1)


def _finite(x: Tensor, dtype: torch.dtype) -> Tensor:
    # q * s may round one ulp past the largest finite value of the output dtype (an input near
    # fp16's 65504 can come back as 65536, which fp16 turns into inf).
    big = torch.finfo(dtype).max
    return x.clamp(-big, big)


def _safe_scale(absmax: Tensor, qmax: float) -> Tensor:
    # An all-zero row (or one that underflows) gets scale 1: it encodes to zeros, exactly.
    s = absmax / qmax
    return torch.where(s > 0, s, torch.ones_like(s))


def absmax_quantize(x: Tensor, scale: Tensor, qmax: float, code_dtype: torch.dtype) -> Tensor:
    """Symmetric codes of `x` for `scale` (broadcast against x): x / scale clamped to [-qmax, qmax]
    in `code_dtype`, rounded to the nearest integer for an integer dtype (a float8 cast rounds to
    nearest by itself). No NaN check: callers that must reject them (the codecs) do it first."""
    y = x / scale
    if not code_dtype.is_floating_point:
        y = y.round_()
    return y.clamp_(-qmax, qmax).to(code_dtype)


def absmax_dequantize(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of `absmax_quantize`: codes times their scale, both in `dtype`."""
    return q.to(dtype) * scale.to(dtype)


def _quantize_along(x: Tensor, dim: int, qmax: float, code_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Codes of `x` with one scale per slice along `dim` (absmax / qmax, kept as a size-1 dim)."""
    scale = _safe_scale(x.abs().amax(dim=dim, keepdim=True), qmax)
    return absmax_quantize(x, scale, qmax, code_dtype), scale


def _split_groups(x: Tensor, group_size: int) -> Tensor:
    """(R, C) -> (R, ceil(C / group_size), group_size): rows zero-padded to whole groups."""
    r, c = x.shape
    ng = -(-c // group_size)
    return torch.nn.functional.pad(x, (0, ng * group_size - c)).view(r, ng, group_size)


class Codec(ABC):
    """encode(t) -> Payload (knows its nbytes); decode(payload) -> tensor of t's shape and dtype."""

    name: ClassVar[str]
    # Biased codecs (top-k, low-rank) need error feedback when they compress gradients.
    error_feedback: ClassVar[bool] = False
    # Payload bits per element, ignoring scales; None where it depends on the tensor.
    bits: ClassVar[int | None] = None

    def bits_per_element(self) -> float | None:
        """Payload bits per element on large tensors, per-group scales included (None: depends on shape)."""
        return self.bits

    def encode(self, t: Tensor) -> Payload:
        check_tensor(t)
        if t.numel() == 0:
            return Payload(self.name, tuple(t.shape), t.dtype)
        with torch.no_grad():
            return Payload(self.name, tuple(t.shape), t.dtype, self._encode(t.detach()))

    def decode(self, p: Payload) -> Tensor:
        if p.codec != self.name:
            raise ValueError(f"payload: encoded by {p.codec!r}, cannot be decoded by {self.name!r}")
        if math.prod(p.shape) == 0:
            return torch.empty(p.shape, dtype=p.dtype)
        with torch.no_grad():
            return _finite(self._decode(p), p.dtype).to(p.dtype).reshape(p.shape)

    def roundtrip(self, t: Tensor) -> tuple[Tensor, Payload]:
        """decode(encode(t)) and the payload."""
        p = self.encode(t)
        return self.decode(p), p

    def describe(self) -> dict[str, object]:
        return {"codec": self.name}

    @abstractmethod
    def _encode(self, t: Tensor) -> dict[str, Tensor]: ...

    @abstractmethod
    def _decode(self, p: Payload) -> Tensor:
        """The reconstruction (any float dtype, any shape with p.shape's numel)."""


class Int8Codec(Codec):
    """Symmetric int8, one scale per row: x ~ q * s, s = max|x_row| / 127."""

    name = "int8"
    bits = 8

    def _encode(self, t: Tensor) -> dict[str, Tensor]:
        q, scale = _quantize_along(as_rows(t).float(), 1, 127.0, torch.int8)  # scale (R, 1)
        return {"q": q, "scale": scale.reshape(-1)}

    def _decode(self, p: Payload) -> Tensor:
        return absmax_dequantize(p.tensors["q"], p.tensors["scale"][:, None])


class _GroupCodec(Codec):
    """A codec with one fp32 scale per group of `group_size` consecutive elements of a row."""

    bits: ClassVar[int]

    def __init__(self, group_size: int = 128) -> None:
        if group_size < 1:
            raise ValueError(f"group_size: must be >= 1, got {group_size}")
        self.group_size = group_size

    def bits_per_element(self) -> float:
        return self.bits + 32 / self.group_size  # one fp32 scale per group

    def describe(self) -> dict[str, object]:
        return {"codec": self.name, "groupSize": self.group_size}


class Int8BlockCodec(_GroupCodec):
    """Symmetric int8 with one scale per block of `group_size` consecutive elements of a row."""

    name = "int8-block"
    bits = 8

    def _encode(self, t: Tensor) -> dict[str, Tensor]:
        x = as_rows(t).float()
        r, c = x.shape
        xg = _split_groups(x, self.group_size)  # (R, nb, group_size)
        q, scale = _quantize_along(xg, 2, 127.0, torch.int8)  # scale (R, nb, 1)
        # Only the real elements are stored; the padding is recreated at decode.
        return {"q": q.view(r, -1)[:, :c].contiguous(), "scale": scale.reshape(r, -1)}

    def _decode(self, p: Payload) -> Tensor:
        q, scale = p.tensors["q"], p.tensors["scale"]
        r, c = q.shape
        qp = _split_groups(q.float(), self.group_size)
        return absmax_dequantize(qp, scale[:, :, None]).view(r, -1)[:, :c]


class Fp8Codec(Codec):
    """float8 e4m3 with one scale per row: x ~ fp8(x / s) * s, s = max|x_row| / 448."""

    name = "fp8"
    bits = 8

    def __init__(self) -> None:
        if not hasattr(torch, "float8_e4m3fn"):
            raise ValueError(f"codec: fp8 needs torch.float8_e4m3fn, which torch {torch.__version__} lacks")

    def _encode(self, t: Tensor) -> dict[str, Tensor]:
        q, scale = _quantize_along(as_rows(t).float(), 1, FP8_MAX, torch.float8_e4m3fn)
        return {"q": q, "scale": scale.reshape(-1)}

    def _decode(self, p: Payload) -> Tensor:
        return absmax_dequantize(p.tensors["q"], p.tensors["scale"][:, None])


def pack_int4(q: Tensor) -> Tensor:
    """(R, K) values in 0..15 (K even) -> (R, K/2) uint8, split-half: byte j = q[j] | q[j + K/2] << 4."""
    half = q.shape[1] // 2
    q = q.to(torch.uint8)
    return q[:, :half] | (q[:, half:] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of `pack_int4`: (R, K/2) uint8 -> (R, K) uint8 in 0..15."""
    return torch.cat((packed & 0xF, packed >> 4), dim=1)


class Int4Codec(_GroupCodec):
    """Symmetric int4 per group of `group_size` row elements, packed two per byte (see module doc)."""

    name = "int4"
    bits = 4

    def __init__(self, group_size: int = 128) -> None:
        if group_size < 2 or group_size % 2:
            raise ValueError(
                f"group_size: int4 needs an even group size >= 2 (two values per byte), got {group_size}"
            )
        super().__init__(group_size)

    def _encode(self, t: Tensor) -> dict[str, Tensor]:
        x = as_rows(t).float()
        r = x.shape[0]
        xg = _split_groups(x, self.group_size)  # (R, ng, group_size)
        q, scale = _quantize_along(xg, 2, 7.0, torch.int8)  # scale (R, ng, 1)
        q = q.add_(8).view(r, -1)  # (R, Kp) in 1..15
        return {"packed": pack_int4(q), "scale": scale.reshape(r, -1)}

    def _decode(self, p: Payload) -> Tensor:
        packed, scale = p.tensors["packed"], p.tensors["scale"]
        r, ng = scale.shape
        q = unpack_int4(packed).float().sub_(8).view(r, ng, self.group_size)
        w = absmax_dequantize(q, scale[:, :, None]).view(r, -1)
        return w[:, : math.prod(p.shape) // r]


class TopKCodec(Codec):
    """Keeps the ceil(topk_ratio * n) largest |x| (values in the input dtype, int32 indices)."""

    name = "topk"
    error_feedback = True

    def __init__(self, topk_ratio: float = 0.01) -> None:
        if not 0.0 < topk_ratio <= 1.0:
            raise ValueError(f"topk_ratio: must be in (0, 1], got {topk_ratio}")
        self.topk_ratio = topk_ratio

    def describe(self) -> dict[str, object]:
        return {"codec": self.name, "topkRatio": self.topk_ratio}

    def _encode(self, t: Tensor) -> dict[str, Tensor]:
        flat = t.reshape(-1)
        n = flat.numel()
        k = min(n, max(1, math.ceil(self.topk_ratio * n)))
        idx = torch.topk(flat.abs(), k, sorted=False).indices
        itype = torch.int32 if n < 2**31 else torch.int64
        return {"values": flat[idx].contiguous(), "indices": idx.to(itype)}

    def _decode(self, p: Payload) -> Tensor:
        values, idx = p.tensors["values"], p.tensors["indices"]
        out = torch.zeros(math.prod(p.shape), dtype=torch.float32, device=values.device)
        return out.index_copy_(0, idx.long(), values.float())


def orthonormalize(m: Tensor) -> Tensor:
    """Orthonormal columns spanning m's column space (Householder QR: safe when m is rank-deficient)."""
    return torch.linalg.qr(m, mode="reduced").Q


class LowRankCodec(Codec):
    """M (viewed as (n, m)) ~ s * P Q^T with P (n, r) orthonormal, Q (m, r), r = min(rank, n, m).

    Subspace iteration: Q0 ~ N(0, 1) from `seed`, then `iterations` times P = orth(M Q),
    Q = M^T P (PowerSGD runs one iteration per step with a warm start). M is divided by its
    largest |x| first (s), so the products stay in range for any finite input. A matrix whose
    factors would not be smaller than itself is stored dense."""

    name = "lowrank"
    error_feedback = True

    def __init__(self, rank: int = 4, iterations: int = 2, seed: int = 0) -> None:
        if rank < 1:
            raise ValueError(f"rank: must be >= 1, got {rank}")
        if iterations < 1:
            raise ValueError(f"iterations: must be >= 1, got {iterations}")
        self.rank, self.iterations, self.seed = rank, iterations, seed

    def describe(self) -> dict[str, object]:
        return {"codec": self.name, "rank": self.rank, "iterations": self.iterations}

    def compresses(self, shape: tuple[int, ...]) -> bool:
        """Whether a tensor of `shape` is sent as factors (else dense)."""
        if len(shape) < 2:
            return False
        n = shape[0]
        m = math.prod(shape[1:])
        r = min(self.rank, n, m)
        return (n + m) * r + 1 < n * m

    def _encode(self, t: Tensor) -> dict[str, Tensor]:
        if not self.compresses(tuple(t.shape)):
            return {"dense": t.contiguous()}
        x = as_rows(t).float()
        n, m = x.shape
        r = min(self.rank, n, m)
        s = _safe_scale(x.abs().amax(), 1.0)
        x = x / s
        gen = torch.Generator().manual_seed(self.seed)
        q = torch.randn(m, r, generator=gen).to(x.device)
        for _ in range(self.iterations):
            p = orthonormalize(x @ q)  # (n, r)
            q = x.t() @ p  # (m, r)
        return {"p": p.contiguous(), "q": q.contiguous(), "scale": s.reshape(1)}

    def _decode(self, p: Payload) -> Tensor:
        if "dense" in p.tensors:
            return p.tensors["dense"]
        return (p.tensors["p"] @ p.tensors["q"].t()) * p.tensors["scale"]


CODECS: dict[str, type[Codec]] = {
    c.name: c for c in (Int8Codec, Int8BlockCodec, Fp8Codec, Int4Codec, TopKCodec, LowRankCodec)
}


def get_codec(
    name: str, *, group_size: int = 128, rank: int = 4, topk_ratio: float = 0.01, seed: int = 0
) -> Codec:
    """A codec by name; parameters a codec does not use are ignored (one call site for all)."""
    if name == "int8":
        return Int8Codec()
    if name == "int8-block":
        return Int8BlockCodec(group_size)
    if name == "fp8":
        return Fp8Codec()
    if name == "int4":
        return Int4Codec(group_size)
    if name == "topk":
        return TopKCodec(topk_ratio)
    if name == "lowrank":
        return LowRankCodec(rank, seed=seed)
    raise ValueError(f"codec: unknown codec {name!r}; allowed: {', '.join(CODECS)}")


class ErrorFeedback:
    """Error feedback for biased codecs: what a step's encoding dropped is added to the next step.

    target_t = x_t + e_t; send C(target_t); e_{t+1} = target_t - D(C(target_t)). The sum of what
    was sent then differs from the sum of the inputs by exactly the last residual (Stich et al.,
    2018; Karimireddy et al., 2019), so nothing is lost, only delayed. Residuals are kept per key
    (a parameter), and reset when that key's shape changes."""

    def __init__(self) -> None:
        self.residuals: dict[object, Tensor] = {}

    def compensate(self, key: object, x: Tensor) -> Tensor:
        e = self.residuals.get(key)
        if e is None or e.shape != x.shape:
            return x
        return x + e.to(x.dtype)

    def update(self, key: object, target: Tensor, decoded: Tensor) -> None:
        self.residuals[key] = (target - decoded).detach()

    def forget(self, key: object) -> None:
        self.residuals.pop(key, None)


def reconstruction_error(x: Tensor, y: Tensor) -> float:
    """Relative L2 error ||x - y|| / ||x|| (computed in float64; 0 for two zero tensors)."""
    xd, yd = x.detach().double().reshape(-1), y.detach().double().reshape(-1)
    if xd.shape != yd.shape:
        raise ValueError(f"y: shape {tuple(y.shape)} does not match x's {tuple(x.shape)}")
    diff = float(torch.linalg.vector_norm(xd - yd))
    ref = float(torch.linalg.vector_norm(xd))
    if ref == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / ref


def sqnr_db(x: Tensor, y: Tensor) -> float:
    """Signal-to-quantization-noise ratio 10 log10(||x||^2 / ||x - y||^2) in dB (inf when exact)."""
    err = reconstruction_error(x, y)
    if err == 0.0:
        return math.inf
    if math.isinf(err):
        return -math.inf
    return -20.0 * math.log10(err)


def compression_ratio(x: Tensor, p: Payload) -> float:
    """Bytes of x over bytes of its payload."""
    return (x.numel() * x.element_size()) / p.nbytes if p.nbytes else math.inf
