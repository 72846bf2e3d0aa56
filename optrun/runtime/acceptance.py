"""The acceptance suite: a registry of tests that each stage and optimization adds to.

A test is a function of the run's context that returns a `Check` (passed, measured, expected,
reason). The registry turns checks into the result contract's `TestResult`s; the judge (pure
Python, shared with the operator) turns those into a decision. Each optimization package
registers its own tests in its `acceptance.py`, imported by `optrun.runtime.suite`.

    @SUITE.test("kernels.parity", Category.END_TO_END, critical=True, applies=kernels_enabled)
    def kernel_parity(ctx: RunContext) -> Check: ...

`applies` decides from the spec (an optimization that is off has no tests); `when` from the run
itself, for a test that has nothing to measure in some runs (a KV cache in the model's own dtype
has no quantization error): such a run does not collect it, rather than pass it as a constant.
"""

from __future__ import annotations

import logging
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from optrun.api.result import Category, Expected, Scalar, TestResult

if TYPE_CHECKING:
    from optrun.api.v1alpha1 import OptimizationRunSpec
    from optrun.runtime.context import RunContext

log = logging.getLogger(__name__)


@dataclass
class Check:
    """What a test function returns."""

    passed: bool
    measured: Scalar | list[Scalar] | dict[str, Any] = None
    expected: Expected | None = None
    reason: str = ""
    spread: float | None = None
    repeats: int | None = None
    unit: str = ""


def in_range(
    value: float,
    lo: float | None = None,
    hi: float | None = None,
    *,
    what: str,
    unit: str = "",
    samples: Sequence[float] | None = None,
) -> Check:
    """A range check; with `samples` the median is judged and the spread reported."""
    spread = None
    repeats = None
    if samples:
        value = statistics.median(samples)
        spread = (max(samples) - min(samples)) / value if value else 0.0
        repeats = len(samples)
    ok = (lo is None or value >= lo) and (hi is None or value <= hi)
    exp = Expected(min=lo, max=hi)
    u = unit or ""
    reason = f"{what}: measured {value:.4g}{u} against {exp.describe()}{u}"
    if spread is not None:
        reason += f" (median of {repeats}, spread {spread:.1%})"
    return Check(
        passed=ok,
        measured=round(value, 6),
        expected=exp,
        reason=reason,
        spread=spread,
        repeats=repeats,
        unit=u,
    )


def always(spec: OptimizationRunSpec) -> bool:
    return True


def in_every_run(ctx: RunContext) -> bool:
    return True


@dataclass(frozen=True)
class AcceptanceTest:
    name: str
    category: Category
    critical: bool
    applies: Callable[[OptimizationRunSpec], bool]
    fn: Callable[[RunContext], Check]
    when: Callable[[RunContext], bool] = in_every_run


class Registry:
    """Ordered, name-unique collection of acceptance tests."""

    def __init__(self) -> None:
        self._tests: dict[str, AcceptanceTest] = {}

    def test(
        self,
        name: str,
        category: Category,
        *,
        critical: bool = False,
        applies: Callable[[OptimizationRunSpec], bool] = always,
        when: Callable[[RunContext], bool] = in_every_run,
    ) -> Callable[[Callable[[RunContext], Check]], Callable[[RunContext], Check]]:
        def register(fn: Callable[[RunContext], Check]) -> Callable[[RunContext], Check]:
            if "." not in name:  # a name without a dot is a test of the user's (spec.acceptance.tests)
                raise ValueError(f"acceptance test {name!r}: a built-in test's name is area.test")
            if name in self._tests and self._tests[name].fn is not fn:
                raise ValueError(f"acceptance test {name!r} is registered twice")
            self._tests[name] = AcceptanceTest(name, category, critical, applies, fn, when)
            return fn

        return register

    def applicable(self, spec: OptimizationRunSpec) -> list[AcceptanceTest]:
        """The tests a run of `spec` may collect (its `when` decides at the run)."""
        return [t for t in self._tests.values() if t.applies(spec)]

    def names(self) -> list[str]:
        return list(self._tests)

    def collects(self, name: str, ctx: RunContext) -> bool:
        """Whether a run with this context runs the test."""
        t = self._tests[name]
        return t.applies(ctx.spec) and t.when(ctx)

    def check(self, name: str, ctx: RunContext) -> Check:
        """Run one test; a test that raises is a failed check that names the error."""
        try:
            return self._tests[name].fn(ctx)
        except Exception as exc:  # a broken check must fail itself, not the whole suite
            log.warning("acceptance test %s raised: %s", name, traceback.format_exc())
            return Check(passed=False, reason=f"error: {type(exc).__name__}: {exc}")

    def run(self, ctx: RunContext, on_result: Callable[[TestResult], None] | None = None) -> list[TestResult]:
        """Run every applicable test; a test that raises is a failed test, never a crashed suite."""
        results = []
        for t in self.applicable(ctx.spec):
            if not t.when(ctx):
                log.info("acceptance %s: not collected (nothing to measure in this run)", t.name)
                continue
            started = time.monotonic()
            check = self.check(t.name, ctx)
            result = TestResult(
                name=t.name,
                category=t.category,
                critical=t.critical,
                passed=bool(check.passed),
                measured=check.measured,
                expected=check.expected,
                reason=check.reason,
                spread=check.spread,
                repeats=check.repeats,
                unit=check.unit,
            )
            log.info(
                "acceptance %s: %s (%.2fs) %s",
                t.name,
                "pass" if result.passed else "FAIL",
                time.monotonic() - started,
                check.reason,
            )
            results.append(result)
            if on_result is not None:
                on_result(result)
        return results


SUITE = Registry()
