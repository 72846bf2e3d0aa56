"""The user's own acceptance tests and the overrides of built-in ones (`spec.acceptance.tests`).

An entry whose name has no dot is a test of the user's own: the number at its `metric` path in
report.json (`optrun.api.paths.resolve`) against `min`/`max`; category tuning and critical false
unless the entry says otherwise. A metric the run's report does not have is a failed test
whose reason lists the numbers that are there (a path into `details` can only be checked
here: see `optrun.api.paths`).

An entry whose name has a dot overrides the built-in test of that name:

- `critical` replaces the test's flag;
- `min` / `max` replace that end of the test's range (the other end stays), and the test is
  judged again on its measured value (the median, for a timed test); a test whose
  measurement is not a number cannot be judged against a range, and fails saying so;
- an override of a test that did not run in this run (one that does not apply to its
  optimizations) changes nothing. Whether the name exists at all is checked against the
  runtime's registry when the run starts (`policy_problems`); the judge cannot know it.

Pure functions over `TestResult`s and the report.json document.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from optrun.api.paths import MetricPathError, resolve
from optrun.api.result import Category, Expected, TestResult
from optrun.api.v1alpha1 import Acceptance, AcceptanceTestSpec

# Tests the judge makes itself; an override may name them like any built-in test.
BASELINE_TEST: Final = "baseline.no-regression"
JUDGE_TESTS: Final = (BASELINE_TEST,)


def user_tests(specs: Sequence[AcceptanceTestSpec], doc: Mapping[str, Any]) -> list[TestResult]:
    """Each of the user's own tests, judged on the report.json document `doc`."""
    return [_user_test(s, doc) for s in specs if not s.is_override]


def _user_test(spec: AcceptanceTestSpec, doc: Mapping[str, Any]) -> TestResult:
    assert spec.metric is not None  # the API model requires it without a dot
    expected = Expected(min=spec.min, max=spec.max)
    common: dict[str, Any] = {
        "name": spec.name,
        "category": spec.category or Category.TUNING,
        "critical": bool(spec.critical),
        "expected": expected,
        "origin": "user",
    }
    try:
        value = resolve(doc, spec.metric)
    except MetricPathError as exc:
        return TestResult(passed=False, reason=f"metric {exc}", **common)
    spread, repeats = _timing_of(doc, spec.metric)
    reason = f"{spec.metric}: measured {value:.4g} against {expected.describe()}"
    if repeats:
        reason += f" (median of {repeats}, spread {spread:.1%})"
    return TestResult(
        passed=_within(value, expected),
        measured=value,
        reason=reason,
        spread=spread,
        repeats=repeats,
        **common,
    )


def _timing_of(doc: Mapping[str, Any], path: str) -> tuple[float | None, int | None]:
    """A `.median` whose section also holds min, max and repeats is a timed figure: its spread."""
    parent, _, leaf = path.rpartition(".")
    if leaf != "median" or not parent:
        return None, None
    try:
        median, lo, hi = (resolve(doc, f"{parent}.{k}") for k in ("median", "min", "max"))
        repeats = int(resolve(doc, f"{parent}.repeats"))
    except MetricPathError:
        return None, None
    return ((hi - lo) / median if median else 0.0), repeats


def _within(value: float, expected: Expected) -> bool:
    return (expected.min is None or value >= expected.min) and (expected.max is None or value <= expected.max)


def apply_overrides(tests: Sequence[TestResult], specs: Sequence[AcceptanceTestSpec]) -> list[TestResult]:
    """`tests` with each override applied to the test it names (see the module docstring);
    the input is not modified."""
    overrides = {s.name: s for s in specs if s.is_override}
    return [_override(t, overrides[t.name]) if t.name in overrides else t for t in tests]


def _override(test: TestResult, spec: AcceptanceTestSpec) -> TestResult:
    update: dict[str, Any] = {"overridden": True}
    notes: list[str] = []
    if spec.critical is not None and spec.critical != test.critical:
        update["critical"] = spec.critical
        notes.append(f"critical {str(test.critical).lower()} -> {str(spec.critical).lower()}")
    if spec.min is not None or spec.max is not None:
        old = test.expected
        keep = old if old is not None and old.equals is None else Expected()
        new = Expected(
            min=spec.min if spec.min is not None else keep.min,
            max=spec.max if spec.max is not None else keep.max,
        )
        update["expected"] = new
        was = old.describe() if old is not None else "no range"
        measured = test.measured
        if isinstance(measured, bool) or not isinstance(measured, int | float) or not math.isfinite(measured):
            update["passed"] = False
            notes.append(
                f"range {was} -> {new.describe()}, which a measurement of {measured!r} cannot be judged on"
            )
        else:
            update["passed"] = _within(float(measured), new)
            notes.append(f"range {was} -> {new.describe()}: measured {float(measured):.4g}{test.unit}")
    note = "; ".join(notes) or "no change"
    update["reason"] = (
        f"{test.reason} [overridden by acceptance.tests: {note}]" if test.reason else f"[overridden: {note}]"
    )
    return test.model_copy(update=update)


def policy_problems(policy: Acceptance, known: Iterable[str]) -> list[str]:
    """Field-named problems of `policy` that need the runtime's registry: overrides of tests that
    do not exist. `known`: the registry's names (the judge's own are added here)."""
    names = sorted({*known, *JUDGE_TESTS})
    problems = []
    for i, spec in enumerate(policy.tests):
        if spec.is_override and spec.name not in names:
            problems.append(
                f"spec.acceptance.tests.{i}.name: {spec.name!r} is no built-in test; allowed: {', '.join(names)} "
                "(or a name without a dot, with a metric, for a test of your own)"
            )
    return problems
