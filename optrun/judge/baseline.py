"""Regression against a baseline: this run's figures against an earlier run's (`spec.acceptance.baseline`).

The figures (`figures`), by metric path, each with the direction that is better:

- ``training.finalAccuracy`` (higher), ``training.finalLoss`` (lower), ``training.tokensPerSecond``
  (higher; timed; not when 0, which means unmeasured), when the run trained;
- ``speedups.<key>.median`` (higher; timed);
- ``tests.<name>``: each built-in test whose measurement is one finite number and whose range
  has one end: a minimum says higher is better, a maximum lower. A range with both ends (or an
  exact value) has no direction to regress in, and the ``speedup.<key>`` tests measure the
  ``speedups`` figures already, so neither is a figure of its own. A test with repeats is timed,
  and so are the few timed without them (`TIMED_TESTS`); `NOT_COMPARED` lists the exceptions.

A baseline is an earlier report.json or, in the cluster, the compact result of an earlier
OptimizationRun (its termination message, which keeps `Result.figures`). A figure that one of
the two runs lacks is listed under `skipped`; so are the timed figures when the two ran on
different device classes (a speedup on a CPU says nothing about one on an H100).

Each figure present in both is a `Comparison`: ``change = (measured - baseline) / |baseline|``
(the absolute difference against a baseline of 0), and it passes while the worsening (a fall
where higher is better, a rise where lower is) stays within its tolerance. Tolerances
(relative), the longest matching path or prefix of `spec.acceptance.baseline.tolerances`
first, else by kind (`DEFAULT_TOLERANCES`, documented with their grounds in docs/acceptance.md).

The comparisons become one acceptance test, `baseline.no-regression` (end-to-end, not critical
unless overridden): it fails on any regression, on a baseline that could not be read and on a
baseline with no figure in common. One test, not one per figure: a suite with a baseline must
not earn a higher pass rate from the many figures that held.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Final, Literal

from optrun.api.result import BaselineReport, Category, Comparison, Expected, TestResult
from optrun.api.v1alpha1 import SPEEDUP_KEYS
from optrun.judge.policy import BASELINE_TEST

Better = Literal["higher", "lower"]

# Relative tolerance by kind of figure; see docs/acceptance.md for the measurements behind them.
TIMED_CPU: Final = 0.20  # two identical models timed 0.83x apart on the shared 2-core host
TIMED_GPU: Final = 0.10  # not yet measured on a GPU
DEFAULT_TOLERANCES: Final[dict[str, float]] = {
    "training.finalAccuracy": 0.02,
    "training.finalLoss": 0.02,
    "tests": 0.05,
}
# Regressions named in the test's reason before "and N more".
_NAMED: Final = 5
# Built-in tests (the runtime's names; a unit test checks them against its registry) whose
# result does not say what a baseline needs to know: timed measurements without repeats (ratios
# of throughputs and step times, as noisy as any timing), and a measurement with a one-ended
# range that is a sanity floor, not a figure with a better direction.
TIMED_TESTS: Final = ("tuning.batch-efficiency", "stability.step-time-steady", "kvcache.throughput-scaling")
NOT_COMPARED: Final = {
    "tuning.gradient-flow": "a floor against vanished gradients (1e-8), not a figure that regresses"
}


@dataclasses.dataclass(frozen=True)
class Baseline:
    """The earlier run as the runtime read it: where from, and its report.json (or compact
    result) document, or why it could not be read."""

    source: str
    result: Mapping[str, Any] | None = None
    error: str = ""


@dataclasses.dataclass(frozen=True)
class Figure:
    value: float
    better: Better
    timed: bool


def figures(doc: Mapping[str, Any]) -> dict[str, Figure]:
    """This run's figures (see the module docstring) from its report.json document."""
    out: dict[str, Figure] = {}
    training = doc.get("training") or {}
    if _number(training.get("steps")):
        for key, better, timed in (
            ("finalAccuracy", "higher", False),
            ("finalLoss", "lower", False),
            ("tokensPerSecond", "higher", True),
        ):
            value = _number(training.get(key))
            if value is not None and not (timed and value == 0.0):  # a throughput of 0: not measured
                out[f"training.{key}"] = Figure(value, better, timed)  # type: ignore[arg-type]
    for key, timing in (doc.get("speedups") or {}).items():
        value = _number((timing or {}).get("median"))
        if value is not None:
            out[f"speedups.{key}.median"] = Figure(value, "higher", True)
    skip = {f"speedup.{k}" for k in SPEEDUP_KEYS} | set(NOT_COMPARED)
    for test in doc.get("tests") or []:
        if test.get("origin", "suite") != "suite" or test.get("name") in skip:
            continue
        value = _number(test.get("measured"))
        expected = test.get("expected") or {}
        lo, hi = expected.get("min"), expected.get("max")
        if value is None or expected.get("equals") is not None or (lo is None) == (hi is None):
            continue
        timed = (test.get("repeats") or 0) > 1 or test["name"] in TIMED_TESTS
        out[f"tests.{test['name']}"] = Figure(value, "higher" if lo is not None else "lower", timed)
    return out


def baseline_values(doc: Mapping[str, Any]) -> dict[str, float]:
    """The baseline's figures: its `figures` key (a compact result keeps it), else derived from it."""
    stored = doc.get("figures")
    if isinstance(stored, Mapping) and stored:
        return {k: v for k, v in ((k, _number(v)) for k, v in stored.items()) if v is not None}
    return {k: f.value for k, f in figures(doc).items()}


def tolerance(path: str, overrides: Mapping[str, float], *, timed: bool, device: str) -> float:
    """The longest of `overrides` that is `path` or a dotted prefix of it; else the default."""
    for table in (overrides, DEFAULT_TOLERANCES):
        matches = [k for k in table if path == k or path.startswith(k + ".")]
        if matches:
            return float(table[max(matches, key=len)])
    if timed:
        return TIMED_CPU if device == "cpu" else TIMED_GPU
    return DEFAULT_TOLERANCES["tests"]


def compare(
    doc: Mapping[str, Any], baseline: Baseline, tolerances: Mapping[str, float] | None = None
) -> BaselineReport:
    """This run's report.json document against the baseline (see the module docstring)."""
    if baseline.result is None:
        return BaselineReport(source=baseline.source, error=baseline.error or "no baseline result")
    ours = figures(doc)
    theirs = baseline_values(baseline.result)
    here = _device_class(doc)
    there = _device_class(baseline.result)
    device = str((doc.get("hardware") or {}).get("device", "cpu"))
    device = "cpu" if device == "cpu" else "gpu"
    comparisons: list[Comparison] = []
    skipped: dict[str, str] = {}
    for path, fig in ours.items():
        if path not in theirs:
            skipped[path] = "not in the baseline"
            continue
        if fig.timed and here != there:
            skipped[path] = f"timed, and the baseline ran on {there}, this run on {here}"
            continue
        comparisons.append(
            _compare(
                path, fig, theirs[path], tolerance(path, tolerances or {}, timed=fig.timed, device=device)
            )
        )
    for path in theirs:
        if path not in ours:
            skipped[path] = "not measured in this run"
    return BaselineReport(source=baseline.source, comparisons=comparisons, skipped=skipped)


def _compare(path: str, fig: Figure, base: float, tol: float) -> Comparison:
    change = (fig.value - base) / abs(base) if base != 0.0 else fig.value - base
    worsening = -change if fig.better == "higher" else change
    return Comparison(
        metric=path,
        baseline=base,
        measured=fig.value,
        change=round(change, 6),
        tolerance=tol,
        passed=worsening <= tol,
        better=fig.better,
    )


def regression_test(report: BaselineReport) -> TestResult:
    """`baseline.no-regression`: fails on a regression, an unreadable baseline, or nothing in common."""
    common: dict[str, Any] = {
        "name": BASELINE_TEST,
        "category": Category.END_TO_END,
        "critical": False,
        "origin": "baseline",
        "expected": Expected(max=0),
    }
    if report.error:
        return TestResult(passed=False, reason=f"baseline {report.source}: {report.error}", **common)
    if not report.comparisons:
        return TestResult(
            passed=False,
            measured=0,
            reason=f"baseline {report.source}: no figure in common with this run, nothing was compared",
            **common,
        )
    bad = [c for c in report.comparisons if not c.passed]
    of = f"{len(bad)} of {len(report.comparisons)} figures"
    if not bad:
        return TestResult(
            passed=True,
            measured=0,
            reason=f"{of} regressed beyond tolerance against {report.source}",
            **common,
        )
    named = ", ".join(
        f"{c.metric} {c.baseline:.4g} -> {c.measured:.4g} ({c.change:+.1%}, tolerance {c.tolerance:.0%})"
        for c in bad[:_NAMED]
    )
    more = f" and {len(bad) - _NAMED} more" if len(bad) > _NAMED else ""
    return TestResult(
        passed=False,
        measured=len(bad),
        reason=f"{of} regressed beyond tolerance against {report.source}: {named}{more}",
        **common,
    )


def _device_class(doc: Mapping[str, Any]) -> str:
    return str((doc.get("hardware") or {}).get("deviceClass", "unknown"))


def _number(value: Any) -> float | None:
    """A finite number, to six significant digits: what the compact form has room for (and a
    figure read back from a baseline equals the one it was written from)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(f"{float(value):.6g}")
