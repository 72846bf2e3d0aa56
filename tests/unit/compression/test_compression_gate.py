"""The reconstruction-error gate: compress within the bound, keep full precision above it, fail
when everything trips."""

from __future__ import annotations

import math

import pytest
import torch

from optrun.runtime.compression.codecs import get_codec
from optrun.runtime.compression.gate import ReconstructionGate


def _gauss(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_tensors_within_the_bound_are_compressed_and_their_error_recorded():
    gate = ReconstructionGate(get_codec("int8"), max_error=0.02)
    payload, rec = gate.check("w", _gauss(64, 128))
    assert payload is not None and rec.compressed and not rec.tripped
    assert 0 < rec.error <= 0.02
    assert rec.sqnr_db == pytest.approx(-20 * math.log10(rec.error))
    assert rec.stored_bytes == payload.nbytes and rec.ratio > 3.8
    assert gate.report.summary() == {"trips": 0, "tensors": 1, "failed": False}


def test_a_tensor_over_the_bound_stays_full_precision_and_counts_a_trip():
    gate = ReconstructionGate(get_codec("int4", group_size=32), max_error=0.05)  # int4 errs ~0.1 on Gaussians
    ok, _ = gate.check("easy", torch.ones(8, 32))  # constant rows: exact in int4
    payload, rec = gate.check("hard", _gauss(64, 128))
    assert ok is not None
    assert payload is None and rec.tripped and not rec.compressed
    assert rec.error > 0.05 and rec.stored_bytes == rec.original_bytes
    report = gate.report
    assert (report.trips, report.tensors, report.failed) == (1, 2, False)
    assert report.max_observed_error <= 0.05  # the bound holds for what was compressed


def test_a_gate_that_trips_on_every_tensor_fails():
    gate = ReconstructionGate(get_codec("topk", topk_ratio=0.01), max_error=0.02)
    for i in range(3):
        gate.check(f"w{i}", _gauss(32, 32, seed=i))
    assert gate.report.failed
    assert gate.report.summary() == {"trips": 3, "tensors": 3, "failed": True}
    assert gate.report.ratio == 1.0  # nothing was compressed


def test_a_tensor_that_would_not_shrink_is_kept_without_a_trip():
    gate = ReconstructionGate(get_codec("int4", group_size=128), max_error=0.5)
    payload, rec = gate.check("tiny", torch.randn(3))  # padded to a whole group: larger than itself
    assert payload is None and not rec.tripped and not rec.compressed
    assert not gate.report.failed


def test_the_report_totals_bytes_over_every_tensor():
    gate = ReconstructionGate(get_codec("int8"), max_error=0.02)
    gate.check("a", _gauss(64, 64))
    gate.check("b", _gauss(32, 16, seed=1))
    d = gate.report.to_dict()
    assert d["originalBytes"] == (64 * 64 + 32 * 16) * 4
    assert d["storedBytes"] == (64 * 64 + 64 * 4) + (32 * 16 + 32 * 4)
    assert d["ratio"] == pytest.approx(d["originalBytes"] / d["storedBytes"], rel=1e-5)
    assert [t["name"] for t in d["tensors"]] == ["a", "b"]


@pytest.mark.parametrize("bad", [0.0, -0.1, math.nan, math.inf])
def test_the_bound_must_be_a_positive_finite_number(bad):
    with pytest.raises(ValueError, match="max_error: must be a finite number > 0"):
        ReconstructionGate(get_codec("int8"), bad)
