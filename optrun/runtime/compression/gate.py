"""The reconstruction-error gate: per tensor, compress it or keep it in full precision.

A tensor is compressed only when its codec's relative reconstruction error
||x - D(C(x))|| / ||x|| is within `max_error`. Above the bound the tensor is kept in full
precision: that is a gate trip, answered by keeping the original (the run goes on with a correct
tensor). A tensor whose payload would not be smaller than itself is kept as well, but
that is not a trip (nothing was wrong with the codec, compression just does not pay). If every
tensor the gate saw tripped, the gate has failed: the codec does not suit this model at this
bound, and the run reports it as a safety failure rather than pretending it compressed anything.

`GateReport.summary()` is the form the orchestrator adds to the run's safety trips:
``{"trips": n, "tensors": m, "failed": bool}``: a trip keeps a correct tensor, so it is no
recovery of the run's (those are the training's rollbacks, against maxRecoveries).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor

from optrun.runtime.compression.codecs import Codec, Payload, reconstruction_error, sqnr_db


@dataclass
class TensorRecord:
    """What the gate measured for one tensor, and what it decided."""

    name: str
    shape: tuple[int, ...]
    original_bytes: int
    stored_bytes: int  # payload bytes if compressed, else the original bytes
    error: float  # relative L2 error of the codec on this tensor
    sqnr_db: float
    compressed: bool
    tripped: bool  # error above the bound: kept in full precision

    @property
    def ratio(self) -> float:
        return self.original_bytes / self.stored_bytes if self.stored_bytes else math.inf

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["ratio"] = _finite(self.ratio)
        d["error"] = _finite(self.error)
        d["sqnr_db"] = _finite(self.sqnr_db)
        return d


def _finite(v: float) -> float | None:
    # JSON has no inf: an exact reconstruction reports SQNR None ("no noise").
    return round(v, 6) if math.isfinite(v) else None


@dataclass
class GateReport:
    """Every tensor the gate decided on, with the totals a report needs."""

    codec: str
    max_error: float
    records: list[TensorRecord] = field(default_factory=list)

    @property
    def tensors(self) -> int:
        return len(self.records)

    @property
    def trips(self) -> int:
        return sum(r.tripped for r in self.records)

    @property
    def compressed(self) -> int:
        return sum(r.compressed for r in self.records)

    @property
    def failed(self) -> bool:
        """Every tensor tripped the gate: the codec compressed nothing within the bound."""
        return self.tensors > 0 and self.trips == self.tensors

    @property
    def original_bytes(self) -> int:
        return sum(r.original_bytes for r in self.records)

    @property
    def stored_bytes(self) -> int:
        return sum(r.stored_bytes for r in self.records)

    @property
    def ratio(self) -> float:
        """Original bytes over stored bytes, over every tensor the gate saw."""
        return self.original_bytes / self.stored_bytes if self.stored_bytes else 1.0

    @property
    def compressed_ratio(self) -> float:
        """Original over payload bytes of the compressed tensors only (1.0 when none was)."""
        done = [r for r in self.records if r.compressed]
        stored = sum(r.stored_bytes for r in done)
        return sum(r.original_bytes for r in done) / stored if stored else 1.0

    @property
    def max_observed_error(self) -> float:
        """Largest error among the compressed tensors (what the bound guarantees)."""
        return max((r.error for r in self.records if r.compressed), default=0.0)

    def summary(self) -> dict[str, Any]:
        return {
            "trips": self.trips,
            "tensors": self.tensors,
            "failed": self.failed,
        }

    def to_dict(self) -> dict[str, Any]:
        errors = [r.error for r in self.records if r.compressed]
        return {
            "codec": self.codec,
            "maxReconstructionError": self.max_error,
            "gate": self.summary(),
            "compressedTensors": self.compressed,
            "originalBytes": self.original_bytes,
            "storedBytes": self.stored_bytes,
            "ratio": round(self.ratio, 6),
            "compressedRatio": round(self.compressed_ratio, 6),
            "maxError": round(self.max_observed_error, 6),
            "meanError": round(sum(errors) / len(errors), 6) if errors else None,
            "minSqnrDb": _finite(min((r.sqnr_db for r in self.records if r.compressed), default=math.inf)),
            "tensors": [r.to_dict() for r in self.records],
        }


class ReconstructionGate:
    """Decides per tensor; every decision is recorded in `report`."""

    def __init__(self, codec: Codec, max_error: float) -> None:
        if not (isinstance(max_error, int | float) and max_error > 0 and math.isfinite(max_error)):
            raise ValueError(f"max_error: must be a finite number > 0, got {max_error!r}")
        self.codec = codec
        self.max_error = float(max_error)
        self.report = GateReport(codec=codec.name, max_error=self.max_error)

    def check(self, name: str, x: Tensor) -> tuple[Payload | None, TensorRecord]:
        """The payload to use for `x` (None: keep `x` in full precision) and the record."""
        y, payload = self.codec.roundtrip(x)
        err = reconstruction_error(x, y)
        original = x.numel() * x.element_size()
        tripped = err > self.max_error
        worth = payload.nbytes < original
        compressed = worth and not tripped
        record = TensorRecord(
            name=name,
            shape=tuple(x.shape),
            original_bytes=original,
            stored_bytes=payload.nbytes if compressed else original,
            error=err,
            sqnr_db=sqnr_db(x, y),
            compressed=compressed,
            tripped=tripped,
        )
        self.report.records.append(record)
        return (payload if compressed else None), record
