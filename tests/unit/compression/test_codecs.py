"""Property tests of every codec: shapes, dtypes, constant and extreme tensors, error bounds,
NaN/Inf rejection, payload sizes, and the metrics."""

from __future__ import annotations

import math
import typing

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from optrun.api.v1alpha1 import Compression
from optrun.runtime.compression.codecs import (
    CODECS,
    ErrorFeedback,
    NonFiniteTensorError,
    Payload,
    compression_ratio,
    get_codec,
    pack_int4,
    reconstruction_error,
    sqnr_db,
    unpack_int4,
)

NAMES = list(CODECS)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PROPS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

shapes = st.lists(st.integers(1, 24), min_size=0, max_size=3).map(tuple)


def codec(name: str):
    # Small groups so that the small generated tensors hold several of them.
    return get_codec(name, group_size=8, rank=2, topk_ratio=0.25)


def _cast(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    big = torch.finfo(dtype).max
    return t.clamp(-big, big).to(dtype)


@st.composite
def finite_tensors(draw, elements=None):
    """Any finite float tensor of a supported dtype, extremes (max, subnormal, zero) included."""
    shape = draw(shapes)
    dtype = draw(st.sampled_from(DTYPES))
    els = (
        elements
        if elements is not None
        else st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True)
    )
    a = draw(hnp.arrays(np.float32, shape, elements=els))
    return _cast(a, dtype)


@st.composite
def gaussian_matrices(draw):
    """Well-scaled tensors: Gaussian rows of 64 elements, at a magnitude from 1e-20 to 1e20."""
    rows = draw(st.integers(1, 8))
    dtype = draw(st.sampled_from(DTYPES))
    lim = 3 if dtype == torch.float16 else 20
    scale = 10.0 ** draw(st.integers(-lim, lim))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return (torch.randn(rows, 64, generator=gen) * scale).to(dtype)


# --- every codec ------------------------------------------------------------------------------


def test_codec_names_are_exactly_the_specs_choices():
    assert set(NAMES) == set(typing.get_args(Compression.model_fields["codec"].annotation))


def test_unknown_codec_names_the_allowed_ones():
    with pytest.raises(
        ValueError, match=r"codec: unknown codec 'int3'; allowed: int8, int8-block, fp8, int4"
    ):
        get_codec("int3")


@pytest.mark.parametrize("name", NAMES)
@PROPS
@given(x=finite_tensors())
def test_decode_restores_shape_and_dtype_and_stays_finite_for_any_finite_input(name, x):
    c = codec(name)
    y, _ = c.roundtrip(x)
    assert y.shape == x.shape
    assert y.dtype == x.dtype
    assert bool(torch.isfinite(y).all()), f"{name} produced non-finite values from finite input"
    # Never worse than sending zeros, whatever the magnitudes (overflow and underflow included).
    assert reconstruction_error(x, y) <= 1.0 + 1e-6


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@PROPS
@given(x=finite_tensors(), where=st.integers(0, 10_000))
def test_nan_and_inf_inputs_are_rejected_with_a_clear_error(name, bad, x, where):
    assume(x.numel() > 0)
    x = x.clone()
    x.view(-1)[where % x.numel()] = bad
    with pytest.raises(NonFiniteTensorError, match=r"tensor: 1 of \d+ values are NaN or Inf"):
        codec(name).encode(x)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.bool])
def test_unsupported_dtypes_are_rejected_naming_the_allowed_ones(name, dtype):
    with pytest.raises(ValueError, match="allowed: float32, float16, bfloat16"):
        codec(name).encode(torch.zeros(4, 4, dtype=dtype))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_zero_tensors_come_back_exactly(name, dtype):
    x = torch.zeros(5, 16, dtype=dtype)
    y, _ = codec(name).roundtrip(x)
    assert torch.equal(y, x)


@pytest.mark.parametrize("name", NAMES)
def test_empty_tensors_round_trip_with_an_empty_payload(name):
    y, p = codec(name).roundtrip(torch.empty(0, 3))
    assert y.shape == (0, 3) and p.nbytes == 0


@pytest.mark.parametrize("name", ["int8", "int8-block", "fp8", "int4", "lowrank"])
@PROPS
@given(
    value=st.floats(-(2.0**100), 2.0**100, allow_nan=False, width=32).filter(lambda v: abs(v) > 2.0**-100),
    rows=st.integers(1, 6),
    cols=st.integers(1, 40),
)
def test_constant_tensors_come_back_almost_exactly(name, value, rows, cols):
    x = torch.full((rows, cols), value, dtype=torch.float32)
    y, _ = codec(name).roundtrip(x)
    # absmax codecs map a constant onto their largest level exactly; low rank sees a rank-1 matrix.
    assert reconstruction_error(x, y) < 1e-5


@pytest.mark.parametrize("name", NAMES)
@PROPS
@given(x=finite_tensors())
def test_payload_bytes_survive_packing_into_one_buffer(name, x):
    c = codec(name)
    p = c.encode(x)
    buf = p.to_bytes()
    assert buf.numel() == p.nbytes
    back = Payload.from_bytes(p.codec, p.shape, p.dtype, p.layout(), buf)
    assert torch.equal(c.decode(back), c.decode(p))


# --- error bounds -------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "levels"), [("int8", 127), ("int8-block", 127), ("int4", 7)])
@PROPS
@given(x=finite_tensors(st.floats(-(2.0**100), 2.0**100, allow_nan=False, width=32)))
def test_absmax_codecs_err_by_at_most_half_a_step_per_element(name, levels, x):
    c = codec(name)
    y = c.roundtrip(x)[0].float()
    xf = x.float()
    rows = xf.reshape(xf.shape[0], -1) if xf.dim() > 1 else xf.reshape(1, -1)
    if name == "int8":
        step = rows.abs().amax(dim=1, keepdim=True) / levels
        step = step.expand_as(rows)
    else:  # groups of 8 along each row (padding does not change a group's absmax)
        r, n = rows.shape
        pad = torch.nn.functional.pad(rows, (0, -n % 8)).view(r, -1, 8)
        step = (pad.abs().amax(dim=2, keepdim=True) / levels).expand_as(pad).reshape(r, -1)[:, :n]
    err = (rows - y.reshape(rows.shape)).abs()
    # Half a step, plus the output dtype's own rounding of the result.
    eps = torch.finfo(x.dtype).eps
    assert bool((err <= step * (0.5 + 1e-5) + rows.abs() * eps + 1e-38).all()), (
        f"max excess {(err - step / 2).max()}"
    )


@pytest.mark.parametrize(
    ("name", "bound"), [("int8", 0.012), ("int8-block", 0.012), ("fp8", 0.035), ("int4", 0.16)]
)
@PROPS
@given(x=gaussian_matrices())
def test_gaussian_tensors_stay_within_each_codecs_typical_error(name, bound, x):
    y = codec(name).roundtrip(x)[0]
    # bf16/fp16 outputs add their own rounding (2^-9 / 2^-12 relative) on top of the codec's.
    assert reconstruction_error(x, y) <= bound + torch.finfo(x.dtype).eps


def test_int4_packing_is_split_half_and_inverts():
    q = torch.randint(0, 16, (3, 10), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (3, 5)
    assert torch.equal(packed[:, 0] & 0xF, q[:, 0]) and torch.equal(packed[:, 0] >> 4, q[:, 5])
    assert torch.equal(unpack_int4(packed), q)


def test_int4_rejects_odd_group_sizes():
    with pytest.raises(ValueError, match="group_size: int4 needs an even group size"):
        get_codec("int4", group_size=9)


# --- compression ratios -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "dtype", "floor"),
    [
        ("int8", torch.float32, 3.9),
        ("int8-block", torch.float32, 3.8),
        ("fp8", torch.float32, 3.9),
        ("int4", torch.float32, 7.3),
        ("int8", torch.bfloat16, 1.95),
        ("int4", torch.float16, 3.6),
        ("topk", torch.float32, 1 / (0.25 * 2) * 0.99),
        ("lowrank", torch.float32, 256 * 512 / ((256 + 512) * 2 + 1)),
    ],
)
def test_large_tensors_shrink_by_the_codecs_ratio(name, dtype, floor):
    x = torch.randn(256, 512).to(dtype)
    c = get_codec(name, group_size=128, rank=2, topk_ratio=0.25)
    p = c.encode(x)
    assert compression_ratio(x, p) >= floor * 0.999


def test_lowrank_sends_small_or_thin_tensors_dense():
    c = get_codec("lowrank", rank=4)
    for shape in [(100,), (3, 5), (4, 1000)]:
        p = c.encode(torch.randn(shape))
        assert list(p.tensors) == ["dense"] and p.ratio == 1.0


# --- top-k and low-rank specifics -----------------------------------------------------------------


@PROPS
@given(
    x=finite_tensors(st.floats(-(2.0**20), 2.0**20, allow_nan=False, width=32)), ratio=st.floats(0.01, 1.0)
)
def test_topk_keeps_exactly_the_largest_magnitudes(x, ratio):
    assume(x.numel() > 0)
    c = get_codec("topk", topk_ratio=ratio)
    p = c.encode(x)
    k = min(x.numel(), max(1, math.ceil(ratio * x.numel())))
    idx = p.tensors["indices"].long()
    assert idx.numel() == k and idx.unique().numel() == k
    flat = x.reshape(-1)
    assert torch.equal(p.tensors["values"], flat[idx])
    dropped = torch.ones(flat.numel(), dtype=torch.bool)
    dropped[idx] = False
    if dropped.any():
        assert flat[dropped].float().abs().max() <= flat[idx].float().abs().min()


@PROPS
@given(
    n=st.integers(6, 40),
    m=st.integers(6, 40),
    true_rank=st.integers(1, 3),
    seed=st.integers(0, 1000),
    magnitude=st.integers(-20, 20),
)
def test_lowrank_reconstructs_matrices_of_at_most_its_rank(n, m, true_rank, seed, magnitude):
    c = get_codec("lowrank", rank=3)
    assume(c.compresses((n, m)))
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, true_rank, generator=g) @ torch.randn(true_rank, m, generator=g)) * 10.0**magnitude
    assert reconstruction_error(x, c.roundtrip(x)[0]) < 1e-4


@pytest.mark.parametrize("name", ["topk", "lowrank"])
def test_error_feedback_loses_nothing_only_delays_it(name):
    c = get_codec(name, topk_ratio=0.05, rank=1)
    ef = ErrorFeedback()
    g = torch.Generator().manual_seed(0)
    sent = torch.zeros(32, 48, dtype=torch.float64)
    total = torch.zeros(32, 48, dtype=torch.float64)
    for _ in range(20):
        x = torch.randn(32, 48, generator=g)
        target = ef.compensate("w", x)
        d = c.decode(c.encode(target))
        ef.update("w", target, d)
        sent += d.double()
        total += x.double()
    # What was sent plus what is still owed is everything that came in.
    assert torch.allclose(sent + ef.residuals["w"].double(), total, atol=1e-4)
    # And the debt stays bounded instead of growing with the steps.
    assert ef.residuals["w"].norm() < total.norm()


# --- metrics ------------------------------------------------------------------------------------


def test_sqnr_is_minus_twenty_log_of_the_relative_error():
    x = torch.ones(100)
    y = x * 1.01
    assert reconstruction_error(x, y) == pytest.approx(0.01)
    assert sqnr_db(x, y) == pytest.approx(40.0)
    assert sqnr_db(x, x) == math.inf
    assert reconstruction_error(torch.zeros(3), torch.zeros(3)) == 0.0
    assert reconstruction_error(torch.zeros(3), torch.ones(3)) == math.inf


def test_metrics_do_not_overflow_on_the_largest_floats():
    x = torch.full((1000,), 3.0e38)
    assert reconstruction_error(x, x * 0.5) == pytest.approx(0.5)
