"""Acceptance tests + policy -> the verdict: decision, score, risk level, recommendations.

Pure Python over the result contract (`optrun.api.result`), shared by the runtime (which writes
the verdict into report.json) and the operator (which turns it into status and conditions), so
both judge a run the same way.

The decision (docs/architecture.md, "The result contract"), with passRate = passed / collected:

- ``NO_GO`` when no test was collected. 0/0 is no pass rate at all: nothing was verified, and a
  policy with ``minimumPassRate: 0`` must not turn an acceptance stage that never ran into a GO.
- ``NO_GO`` when any critical test failed, whatever the pass rate.
- ``GO`` when passRate >= ``targetPassRate``.
- ``CONDITIONAL_GO`` when passRate >= ``minimumPassRate``.
- ``NO_GO`` otherwise.

`decide` needs only the `AcceptanceSummary` (counts and the critical failures), so the decision
can be re-derived from a termination message that dropped the tests to fit in 4 KiB.

The risk level, from what failed:

- ``high``: the decision is NO_GO (no tests, a critical failure or a pass rate under the
  minimum), or any test of category safety failed (a gate that did not hold).
- ``medium``: the decision is CONDITIONAL_GO, or an end-to-end or stability test failed, or no
  critical test was collected (the GO rests on nothing critical), or the run needed recoveries
  (`SafetySummary.recoveries` > 0: its gates held, but it reached its result by rolling back),
  out-of-memory back-offs (`oom_backoffs` > 0: it fit only in smaller micro-batches) or had a
  hang reported (`hangs` > 0). Gate trips that needed no recovery (a compression tensor kept in
  full precision) and fp16 loss-scale overflows do not raise the risk.
- ``low``: otherwise; at most tuning or critical-infrastructure tests with no critical flag
  failed, within a pass rate that meets the target.

The score is described in `optrun.judge.score`, the recommendations in `optrun.judge.recommend`.
Neither changes the tests nor the decision.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from optrun.api.result import (
    AcceptanceSummary,
    Category,
    Decision,
    HardwareInfo,
    Result,
    RiskLevel,
    SafetySummary,
    Scorecard,
    TestResult,
    Timing,
    TrainingSummary,
)
from optrun.api.v1alpha1 import Acceptance
from optrun.judge.baseline import Baseline, compare, figures, regression_test
from optrun.judge.policy import apply_overrides, user_tests
from optrun.judge.recommend import recommend, suggest
from optrun.judge.score import scorecard, weighted_score

_RANK: Final = {Decision.NO_GO: 0, Decision.CONDITIONAL_GO: 1, Decision.GO: 2}
# Failed critical tests named in the decision's reason before "and N more".
_NAMED: Final = 5


@dataclass(frozen=True)
class Verdict:
    """What the judge makes of a run's acceptance tests."""

    decision: Decision
    # One sentence: why this decision (the operator's condition message).
    reason: str
    # Weighted score in [0, 1] and its parts.
    score: float
    scorecard: Scorecard
    risk_level: RiskLevel
    acceptance: AcceptanceSummary
    # Suggested changes to the policy for out-of-range measurements; reported, never applied.
    recommendations: tuple[str, ...]
    # The failed tests, in the order they ran.
    failed: tuple[TestResult, ...]


def decision_rank(decision: Decision) -> int:
    """NO_GO 0 < CONDITIONAL_GO 1 < GO 2: compare decisions by rank, never by their strings."""
    return _RANK[Decision(decision)]


def summarize(tests: Sequence[TestResult], policy: Acceptance) -> AcceptanceSummary:
    """Counts, pass rate and the policy's thresholds."""
    passed = sum(t.passed for t in tests)
    return AcceptanceSummary(
        collected=len(tests),
        passed=passed,
        failed=len(tests) - passed,
        pass_rate=passed / len(tests) if tests else 0.0,
        target=policy.target_pass_rate,
        minimum=policy.minimum_pass_rate,
        critical_failed=sum(t.critical and not t.passed for t in tests),
    )


def decide(summary: AcceptanceSummary) -> Decision:
    """The decision from counts alone (see the module docstring)."""
    _check_consistent(summary)
    if summary.collected == 0 or summary.critical_failed > 0:
        return Decision.NO_GO
    if summary.pass_rate >= summary.target:
        return Decision.GO
    if summary.pass_rate >= summary.minimum:
        return Decision.CONDITIONAL_GO
    return Decision.NO_GO


def risk_level(
    tests: Sequence[TestResult], decision: Decision, *, safety: SafetySummary | None = None
) -> RiskLevel:
    """Risk from what failed (see the module docstring)."""
    failed = {t.category for t in tests if not t.passed}
    if decision == Decision.NO_GO or Category.SAFETY in failed:
        return "high"
    if (
        decision == Decision.CONDITIONAL_GO
        or failed & {Category.END_TO_END, Category.STABILITY}
        or not any(t.critical for t in tests)
        or (safety is not None and (safety.recoveries > 0 or safety.oom_backoffs > 0 or safety.hangs > 0))
    ):
        return "medium"
    return "low"


def judge(tests: Sequence[TestResult], policy: Acceptance, *, safety: SafetySummary | None = None) -> Verdict:
    """Judge a run's acceptance tests against its policy.

    `tests` are not modified. Raises ValueError when two tests share a name (a test counted
    twice would skew the pass rate)."""
    duplicates = sorted(name for name, n in Counter(t.name for t in tests).items() if n > 1)
    if duplicates:
        raise ValueError(f"tests: names must be unique; repeated: {', '.join(duplicates)}")
    summary = summarize(tests, policy)
    decision = decide(summary)
    card = scorecard(tests, policy.weights)
    failed = tuple(t for t in tests if not t.passed)
    return Verdict(
        decision=decision,
        reason=_reason(decision, summary, [t.name for t in failed if t.critical]),
        score=weighted_score(card),
        scorecard=card,
        risk_level=risk_level(tests, decision, safety=safety),
        acceptance=summary,
        recommendations=tuple(r for r in map(recommend, failed) if r is not None),
        failed=failed,
    )


def build_result(
    tests: Sequence[TestResult],
    policy: Acceptance,
    *,
    safety: SafetySummary | None = None,
    speedups: Mapping[str, Timing] | None = None,
    training: TrainingSummary | None = None,
    hardware: HardwareInfo | None = None,
    details: Mapping[str, Any] | None = None,
    exit_reason: str = "",
    baseline: Baseline | None = None,
) -> Result:
    """The whole result contract (report.json) from the suite's tests, judged under the policy,
    and the other sections.

    Before the verdict, the policy adds to the suite (in this order): the user's own tests
    (`policy.tests` with a metric), judged on the report the suite and sections make; with
    `baseline`, the comparison with it (`Result.baseline`) and its test
    `baseline.no-regression`; then the overrides of built-in tests by name. Without tests of
    the user's, overrides or a baseline, `tests` are judged as given."""
    draft = Result(
        decision=Decision.NO_GO,
        score=0.0,
        risk_level="high",
        acceptance=AcceptanceSummary(),
        tests=list(tests),
        safety=safety if safety is not None else SafetySummary(),
        speedups=dict(speedups or {}),
        training=training if training is not None else TrainingSummary(),
        hardware=hardware if hardware is not None else HardwareInfo(),
        details=dict(details or {}),
        exit_reason=exit_reason,
    )
    doc = draft.to_json()
    judged = [*tests, *user_tests(policy.tests, doc)]
    comparison = None
    if baseline is not None:
        comparison = compare(doc, baseline, policy.baseline.tolerances if policy.baseline else None)
        judged.append(regression_test(comparison))
    judged = apply_overrides(judged, policy.tests)
    verdict = judge(judged, policy, safety=safety)
    suggestions = [s for s in (suggest(t, policy.tests) for t in verdict.failed) if s is not None]
    final = {**doc, "tests": [t.model_dump(mode="json", by_alias=True) for t in judged]}
    return draft.model_copy(
        update={
            "decision": verdict.decision,
            "decision_reason": verdict.reason,
            "score": verdict.score,
            "risk_level": verdict.risk_level,
            "acceptance": verdict.acceptance,
            "tests": judged,
            "recommendations": list(verdict.recommendations),
            "scorecard": verdict.scorecard,
            "figures": {k: f.value for k, f in figures(final).items()},
            "baseline": comparison,
            "suggestions": suggestions,
        }
    )


def _check_consistent(summary: AcceptanceSummary) -> None:
    s = summary
    if s.passed + s.failed != s.collected or s.critical_failed > s.failed:
        raise ValueError(
            "acceptance: inconsistent summary; allowed: passed + failed == collected and "
            f"criticalFailed <= failed (got collected={s.collected}, passed={s.passed}, "
            f"failed={s.failed}, criticalFailed={s.critical_failed})"
        )
    if s.minimum > s.target:
        raise ValueError(f"acceptance: minimum ({s.minimum:g}) must not exceed target ({s.target:g})")


def _reason(decision: Decision, s: AcceptanceSummary, critical_failures: Sequence[str]) -> str:
    if s.collected == 0:
        return "NO_GO: no acceptance tests were collected, so nothing was verified"
    rate = f"pass rate {_pct(s.pass_rate)} ({s.passed}/{s.collected})"
    if s.critical_failed:
        names = list(critical_failures[:_NAMED])
        more = s.critical_failed - len(names)
        listed = ", ".join(names) + (f" and {more} more" if more > 0 else "")
        return f"NO_GO: {s.critical_failed} critical test(s) failed: {listed or 'not named'}; {rate}"
    if decision == Decision.GO:
        return f"GO: every critical test passed and the {rate} meets the target {_pct(s.target)}"
    if decision == Decision.CONDITIONAL_GO:
        return (
            f"CONDITIONAL_GO: every critical test passed; the {rate} is below the target "
            f"{_pct(s.target)} but meets the minimum {_pct(s.minimum)}"
        )
    return f"NO_GO: the {rate} is below the minimum {_pct(s.minimum)}"


def _pct(x: float) -> str:
    return f"{x * 100:.4g}%"
