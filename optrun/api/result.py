"""The result contract: what the runtime writes (report.json, and compacted as the pod's
termination message) and what the operator and `optrun run` read. Field names are fixed by
docs/architecture.md (the result contract); fields may be added, never renamed. Pure pydantic: no torch, no kubernetes.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

# Where the runtime pod finds the result of spec.acceptance.baseline.run: the operator mounts
# the earlier run's stored result (its compact form) and names the file in this variable.
BASELINE_ENV = "OPTRUN_BASELINE_RESULT"


class _Model(BaseModel):
    # Results are read back from pods that may run a newer runtime: tolerate added fields.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class Decision(StrEnum):
    GO = "GO"
    CONDITIONAL_GO = "CONDITIONAL_GO"
    NO_GO = "NO_GO"


class Category(StrEnum):
    CRITICAL_INFRASTRUCTURE = "critical-infrastructure"
    SAFETY = "safety"
    END_TO_END = "end-to-end"
    STABILITY = "stability"
    TUNING = "tuning"


RiskLevel = Literal["low", "medium", "high"]
Scalar = float | int | str | bool | None


class Expected(_Model):
    """What a measurement is compared against: a range (either end optional) or an exact value."""

    min: float | None = None
    max: float | None = None
    equals: Scalar | list[Scalar] = None

    def describe(self) -> str:
        if self.equals is not None:
            return f"== {self.equals}"
        if self.min is not None and self.max is not None:
            return f"{self.min:g}..{self.max:g}"
        if self.min is not None:
            return f">= {self.min:g}"
        if self.max is not None:
            return f"<= {self.max:g}"
        return "any"


class TestResult(_Model):
    """One acceptance test, as measured."""

    __test__ = False  # not a pytest test class

    name: str
    category: Category
    critical: bool = False
    passed: bool
    measured: Scalar | list[Scalar] | dict[str, Any] = None
    expected: Expected | None = None
    reason: str = ""
    # Timed measurements are repeated: the check uses the median, the spread is reported.
    spread: float | None = None
    repeats: int | None = None
    unit: str = ""
    # suite: a built-in test of the runtime; user: one of spec.acceptance.tests; baseline: the
    # judge's comparison with an earlier run. `overridden`: spec.acceptance.tests changed its
    # threshold or critical flag (the reason says from what).
    origin: Literal["suite", "user", "baseline"] = "suite"
    overridden: bool = False


class Suggestion(_Model):
    """A failed tuning test's way out, for a person to apply (optrun never does): the range
    that would contain what was measured, and the manifest change that sets it."""

    test: str
    measured: float
    expected: Expected
    suggested: Expected
    # Timed tests: the suggested end covers every repeat, read from the median and the spread.
    repeats: int | None = None
    spread: float | None = None
    unit: str = ""
    # A YAML snippet of the OptimizationRun spec (merge it into spec.acceptance).
    manifest: str = ""
    note: str = ""


class Comparison(_Model):
    """One figure of this run against the same figure of the baseline run."""

    metric: str
    baseline: float
    measured: float
    # (measured - baseline) / |baseline|: signed, relative.
    change: float
    # The largest relative worsening allowed (a worsening is a fall where higher is better).
    tolerance: float
    passed: bool
    better: Literal["higher", "lower"] = "higher"


class BaselineReport(_Model):
    """The comparison with an earlier run (spec.acceptance.baseline)."""

    source: str
    comparisons: list[Comparison] = Field(default_factory=list)
    # Figures of one run that the other lacks, or that cannot be compared, and why.
    skipped: dict[str, str] = Field(default_factory=dict)
    # Why the baseline could not be read (then there are no comparisons).
    error: str = ""


class AcceptanceSummary(_Model):
    """Counts of the acceptance tests and the policy they were judged by (see optrun.judge)."""

    collected: int = Field(0, ge=0, description="Acceptance tests that ran.")
    passed: int = Field(0, ge=0, description="Tests that passed.")
    failed: int = Field(0, ge=0, description="Tests that failed.")
    pass_rate: float = Field(
        0.0, ge=0.0, le=1.0, description="passed / collected; 0 when nothing was collected."
    )
    target: float = Field(0.95, ge=0.0, le=1.0, description="Pass rate needed for GO.")
    minimum: float = Field(0.85, ge=0.0, le=1.0, description="Pass rate needed for CONDITIONAL_GO.")
    # Kept in the summary so that the decision can be re-derived from it alone (optrun.judge.decide),
    # even from a termination message that had to drop the failed tests to fit in 4 KiB.
    critical_failed: int = Field(0, ge=0, description="Critical tests that failed (any one means NO_GO).")


class SafetySummary(_Model):
    """What went wrong and what was done about it, each under its own name: gate trips (per
    gate), recoveries (rollbacks and skipped batches, against maxRecoveries), out-of-memory
    back-offs (micro-batch halvings), hangs the watchdog reported, and fp16 loss-scale overflows
    (retried at a lower scale, the GradScaler's ordinary business)."""

    trips: dict[str, int] = Field(default_factory=dict)
    recoveries: int = 0
    oom_backoffs: int = 0
    hangs: int = 0
    scaler_overflows: int = 0
    events: list[dict[str, Any]] = Field(default_factory=list)
    # The gate that ended training (nan_loss, gradient_flow, recovery_budget, ...), if one did:
    # what the operator's SafetyGatesPassed condition names, read as data rather than from text.
    failed_gate: str | None = None


class Timing(_Model):
    """A repeated measurement: median, extremes and how many repeats."""

    median: float = 0.0
    min: float = 0.0
    max: float = 0.0
    repeats: int = 0

    @property
    def spread(self) -> float:
        """(max - min) / median: the relative spread of the repeats."""
        return (self.max - self.min) / self.median if self.median else 0.0


class TrainingSummary(_Model):
    epochs: int = 0
    steps: int = 0
    final_loss: float = 0.0
    final_accuracy: float = 0.0
    tokens_per_second: float = 0.0


class HardwareInfo(_Model):
    device: str = "cpu"
    name: str = ""
    memory_bytes: int = 0
    capability: str | None = None
    device_class: str = "cpu"
    dtypes: dict[str, bool] = Field(default_factory=dict)
    triton_native: bool = False
    cpu_count: int = 0
    torch_version: str = ""


class Scorecard(_Model):
    """The weighted score's parts, each in 0..1, and their weights (see optrun.judge.score).

    A part whose tests were not collected is listed in `unmeasured` and missing from `parts`;
    its weight is shared out among the measured parts."""

    parts: dict[str, float] = Field(default_factory=dict)
    weights: dict[str, float] = Field(default_factory=dict)
    unmeasured: list[str] = Field(default_factory=list)


class ArtifactInfo(_Model):
    """The model the run judged, as written to the output directory (see optrun.runtime.artifact)."""

    path: str = Field(description="Directory of the artifact.")
    format: str = Field(description="hf-safetensors (from_pretrained loads it) or optrun-safetensors.")
    size_bytes: int = Field(0, ge=0, description="Bytes of the files a standard loader reads.")
    quantized_bytes: int | None = Field(
        None, ge=0, description="Bytes of the quantized weights (quantized.safetensors), when compressed."
    )
    held_out_loss: float | None = Field(None, description="Held-out loss of the artifact as written.")
    reloaded_held_out_loss: float | None = Field(
        None, description="Held-out loss of the artifact reloaded the standard way (float weights)."
    )
    quantization: str | None = Field(
        None, description="The quantized form in quantized.safetensors (codec, layers), when compressed."
    )
    optimizations: list[str] = Field(default_factory=list, description="Every optimization applied to it.")


class DistributedInfo(_Model):
    """How the train stage ran on torch.distributed (absent for one process)."""

    world_size: int = Field(1, ge=1, description="Ranks in all.")
    nodes: int = Field(1, ge=1, description="Pods (one per node).")
    processes_per_node: int = Field(1, ge=1, description="Ranks per pod.")
    strategy: str = Field("ddp", description="ddp or fsdp.")
    backend: str = Field("gloo", description="gloo or nccl.")


class Result(_Model):
    decision: Decision
    score: float
    risk_level: RiskLevel
    acceptance: AcceptanceSummary
    tests: list[TestResult] = Field(default_factory=list)
    safety: SafetySummary = Field(default_factory=SafetySummary)
    speedups: dict[str, Timing] = Field(default_factory=dict)
    training: TrainingSummary = Field(default_factory=TrainingSummary)
    hardware: HardwareInfo = Field(default_factory=HardwareInfo)
    recommendations: list[str] = Field(default_factory=list)
    scorecard: Scorecard = Field(default_factory=Scorecard)
    artifact: ArtifactInfo | None = None
    distributed: DistributedInfo | None = None
    # Anything a stage adds (kernel choices, kv-cache sweep, rlvr curve...): free-form.
    details: dict[str, Any] = Field(default_factory=dict)
    exit_reason: str = ""
    # Why the judge decided as it did, in one sentence (the operator's condition message).
    decision_reason: str = ""
    # Every figure a later run can be compared with (see optrun.judge.baseline.figures), by
    # metric path: training.*, speedups.<key>.median, tests.<name>. Kept in the compact form,
    # so an OptimizationRun's termination message can serve as another run's baseline.
    figures: dict[str, float] = Field(default_factory=dict)
    baseline: BaselineReport | None = None
    suggestions: list[Suggestion] = Field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def compact(self, limit: int = 4096) -> str:
        """The termination-message form: at most `limit` bytes of JSON.

        Drops, in order, what the operator can live without: details, passed tests, safety
        events, suggestions and the baseline comparison (report.json has them), recommendations
        beyond the first few, the figures (what a later run's baseline compares with; without
        them it compares what is left), failed tests beyond the first few."""
        doc = self.to_json()
        for key in ("details", "suggestions", "baseline"):
            doc.pop(key, None)
        doc["safety"].pop("events", None)
        doc["tests"] = [_short_test(t) for t in doc["tests"] if not t["passed"]]
        for key, keep in (
            ("recommendations", 3),
            ("figures", 0),
            ("tests", 8),
            ("tests", 3),
            ("recommendations", 1),
        ):
            text = json.dumps(doc, separators=(",", ":"))
            if len(text.encode()) <= limit:
                return text
            doc[key] = doc[key][:keep] if isinstance(doc[key], list) else {}
        doc["tests"], doc["recommendations"] = [], []
        doc.pop("scorecard", None)
        text = json.dumps(doc, separators=(",", ":"))
        if len(text.encode()) > limit:
            doc.pop("speedups", None)
            text = json.dumps(doc, separators=(",", ":"))
        return text


def _short_test(t: dict[str, Any]) -> dict[str, Any]:
    keep = {k: t[k] for k in ("name", "category", "critical", "passed", "measured", "expected", "reason")}
    if t.get("origin", "suite") != "suite":
        keep["origin"] = t["origin"]
    if isinstance(keep["measured"], dict | list) and len(json.dumps(keep["measured"])) > 120:
        keep["measured"] = None
    keep["reason"] = keep["reason"][:160]
    return keep
