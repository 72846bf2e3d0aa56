"""The decision, its reason, the risk level and the result contract, on exact examples."""

from __future__ import annotations

import json

import pytest

from optrun.api.result import (
    AcceptanceSummary,
    Category,
    Decision,
    Expected,
    HardwareInfo,
    Result,
    SafetySummary,
    TestResult,
    Timing,
    TrainingSummary,
)
from optrun.api.v1alpha1 import Acceptance
from optrun.judge import build_result, decide, decision_rank, judge


def make(
    name: str,
    passed: bool = True,
    category: Category = Category.TUNING,
    critical: bool = False,
    **fields: object,
) -> TestResult:
    return TestResult.model_validate(
        {"name": name, "category": category, "critical": critical, "passed": passed, **fields}
    )


def suite(passed: int, failed: int) -> list[TestResult]:
    """One passing critical test plus non-critical tuning tests: `passed` in all, `failed` failing."""
    tests = [make("infra", category=Category.CRITICAL_INFRASTRUCTURE, critical=True)]
    tests += [make(f"ok{i}") for i in range(passed - 1)]
    tests += [make(f"bad{i}", passed=False) for i in range(failed)]
    return tests


@pytest.mark.parametrize(
    ("passed", "failed", "decision"),
    [
        (20, 0, Decision.GO),
        (19, 1, Decision.GO),  # 0.95 is exactly the default target: GO includes the boundary
        (18, 2, Decision.CONDITIONAL_GO),
        (17, 3, Decision.CONDITIONAL_GO),  # 0.85 is exactly the default minimum
        (16, 4, Decision.NO_GO),
    ],
)
def test_decision_follows_pass_rate_against_target_and_minimum(
    passed: int, failed: int, decision: Decision
) -> None:
    verdict = judge(suite(passed, failed), Acceptance())
    assert verdict.decision == decision
    assert verdict.acceptance.pass_rate == passed / (passed + failed)
    assert verdict.acceptance.collected == passed + failed
    assert verdict.acceptance.failed == failed


def test_one_failed_critical_test_is_no_go_whatever_the_pass_rate() -> None:
    tests = [*suite(99, 0), make("kernels.parity", passed=False, category=Category.END_TO_END, critical=True)]
    verdict = judge(tests, Acceptance(target_pass_rate=0.5, minimum_pass_rate=0.5))
    assert verdict.decision == Decision.NO_GO
    assert verdict.acceptance.critical_failed == 1
    assert "kernels.parity" in verdict.reason
    assert verdict.risk_level == "high"


def test_many_failed_critical_tests_are_named_up_to_five() -> None:
    tests = [make(f"crit{i}", passed=False, critical=True) for i in range(8)]
    verdict = judge(tests, Acceptance())
    assert "crit0, crit1, crit2, crit3, crit4 and 3 more" in verdict.reason


def test_no_tests_collected_is_no_go_even_when_the_policy_asks_for_nothing() -> None:
    verdict = judge([], Acceptance(target_pass_rate=0.0, minimum_pass_rate=0.0))
    assert verdict.decision == Decision.NO_GO
    assert "no acceptance tests were collected" in verdict.reason
    assert verdict.score == 0.0
    assert verdict.risk_level == "high"
    assert verdict.acceptance.collected == 0 and verdict.acceptance.pass_rate == 0.0


def test_reasons_name_the_rate_and_the_threshold_it_met_or_missed() -> None:
    assert judge(suite(20, 0), Acceptance()).reason.startswith(
        "GO: every critical test passed and the pass rate 100%"
    )
    conditional = judge(suite(9, 1), Acceptance()).reason
    assert "pass rate 90% (9/10)" in conditional and "below the target 95%" in conditional
    assert "minimum 85%" in conditional
    assert (
        judge(suite(1, 1), Acceptance()).reason == "NO_GO: the pass rate 50% (1/2) is below the minimum 85%"
    )


def test_decision_rank_orders_no_go_below_conditional_below_go() -> None:
    ranks = [decision_rank(d) for d in (Decision.NO_GO, Decision.CONDITIONAL_GO, Decision.GO)]
    assert ranks == sorted(ranks) and len(set(ranks)) == 3
    assert decision_rank("GO") == decision_rank(Decision.GO)  # type: ignore[arg-type]


def test_decide_rejects_a_summary_whose_counts_do_not_add_up() -> None:
    with pytest.raises(ValueError, match="passed \\+ failed == collected"):
        decide(AcceptanceSummary(collected=3, passed=3, failed=1, pass_rate=1.0))
    with pytest.raises(ValueError, match="criticalFailed <= failed"):
        decide(AcceptanceSummary(collected=3, passed=3, failed=0, pass_rate=1.0, critical_failed=1))


def test_judge_rejects_two_tests_with_one_name() -> None:
    with pytest.raises(ValueError, match="tests: names must be unique; repeated: twice"):
        judge([make("twice"), make("twice", passed=False), make("once")], Acceptance())


# --- risk ----------------------------------------------------------------------------------------


def go_suite_with(*extra: TestResult) -> list[TestResult]:
    return suite(40, 0) + list(extra)


@pytest.mark.parametrize(
    ("failing", "risk"),
    [
        (make("gate.nan", passed=False, category=Category.SAFETY), "high"),
        (make("train.e2e", passed=False, category=Category.END_TO_END), "medium"),
        (make("gpu.memory", passed=False, category=Category.STABILITY), "medium"),
        (make("kv.speedup", passed=False, category=Category.TUNING), "low"),
        (make("kv.extra", passed=True, category=Category.TUNING), "low"),
    ],
)
def test_risk_level_comes_from_the_category_of_what_failed_in_a_go_run(
    failing: TestResult, risk: str
) -> None:
    verdict = judge(go_suite_with(failing), Acceptance())
    assert verdict.decision == Decision.GO
    assert verdict.risk_level == risk


def test_conditional_go_is_at_least_medium_risk() -> None:
    verdict = judge(suite(9, 1), Acceptance())
    assert verdict.decision == Decision.CONDITIONAL_GO
    assert verdict.risk_level == "medium"


def test_a_run_without_critical_tests_is_medium_risk_even_when_all_pass() -> None:
    verdict = judge([make("a"), make("b")], Acceptance())
    assert verdict.decision == Decision.GO
    assert verdict.risk_level == "medium"


def test_a_run_that_needed_recoveries_is_medium_risk() -> None:
    tests = suite(10, 0)
    assert judge(tests, Acceptance(), safety=SafetySummary()).risk_level == "low"
    recovered = SafetySummary(trips={"nan_loss": 1}, recoveries=1)
    assert judge(tests, Acceptance(), safety=recovered).risk_level == "medium"


@pytest.mark.parametrize(
    ("safety", "risk"),
    [
        (SafetySummary(trips={"oom": 1}, oom_backoffs=1), "medium"),
        (SafetySummary(trips={"hang": 1}, hangs=1), "medium"),
        # A compression tensor kept in full precision, fp16 overflows retried: nothing to worry about.
        (SafetySummary(trips={"reconstruction_error": 4}), "low"),
        (SafetySummary(scaler_overflows=3), "low"),
    ],
)
def test_what_went_wrong_raises_the_risk_by_its_own_name(safety: SafetySummary, risk: str) -> None:
    assert judge(suite(10, 0), Acceptance(), safety=safety).risk_level == risk


# --- the result contract -------------------------------------------------------------------------


def test_build_result_carries_the_verdict_and_every_section() -> None:
    tests = [
        *suite(3, 0),
        make("kv.speedup", passed=False, measured=2.57, expected=Expected(min=2.0, max=2.5), unit="x"),
    ]
    speedups = {"kernels": Timing(median=1.4, min=1.3, max=1.5, repeats=5)}
    result = build_result(
        tests,
        Acceptance(),
        safety=SafetySummary(trips={"nan_loss": 1}, recoveries=1),
        speedups=speedups,
        training=TrainingSummary(epochs=2, final_loss=1.5),
        hardware=HardwareInfo(device="cuda", name="NVIDIA H100"),
        details={"kernels": {"rmsnorm": "triton"}},
        exit_reason="completed",
    )
    verdict = judge(tests, Acceptance())
    assert result.decision == verdict.decision == Decision.NO_GO  # 3/4 = 0.75
    assert result.decision_reason == verdict.reason
    assert result.score == verdict.score
    assert result.acceptance == verdict.acceptance
    assert result.recommendations == ["kv.speedup: measured 2.57x against 2..2.5x: widen max to 2.6x"]
    assert result.tests == tests
    assert result.safety.recoveries == 1 and result.speedups == speedups
    assert result.training.epochs == 2 and result.hardware.name == "NVIDIA H100"
    assert result.details == {"kernels": {"rmsnorm": "triton"}} and result.exit_reason == "completed"

    doc = result.to_json()
    # The field names docs/architecture.md fixes for report.json (the result contract).
    for key in (
        "decision",
        "score",
        "riskLevel",
        "acceptance",
        "tests",
        "safety",
        "speedups",
        "training",
        "hardware",
        "recommendations",
    ):
        assert key in doc
    for key in ("collected", "passed", "failed", "passRate", "target", "minimum"):
        assert key in doc["acceptance"]
    assert Result.model_validate(doc) == result


def test_decision_is_rederived_from_a_termination_message_that_dropped_the_tests() -> None:
    long_reason = "x" * 400
    tests = suite(30, 0) + [
        make(f"crit{i}", passed=False, critical=True, reason=long_reason) for i in range(20)
    ]
    result = build_result(tests, Acceptance())
    message = result.compact()
    assert len(message.encode()) <= 4096
    read = Result.model_validate(json.loads(message))
    assert len(read.tests) < result.acceptance.failed  # the failed tests did not all fit
    assert decide(read.acceptance) == result.decision == Decision.NO_GO
