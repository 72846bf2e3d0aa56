"""The user's own tests and the overrides of built-in tests, judged by build_result on exact
examples: a critical test of the user's that is not met makes the run NO_GO and names it, a
metric the report lacks fails listing what it has, an override re-judges the measurement."""

from __future__ import annotations

from typing import Any

import pytest

from optrun.api.result import Category, Decision, Expected, TestResult, Timing, TrainingSummary
from optrun.api.v1alpha1 import Acceptance
from optrun.judge import BASELINE_TEST, build_result, policy_problems, user_tests


def suite() -> list[TestResult]:
    return [
        TestResult(
            name="infra.hardware-detected",
            category=Category.CRITICAL_INFRASTRUCTURE,
            critical=True,
            passed=True,
            measured="cpu",
        ),
        TestResult(
            name="e2e.target-accuracy",
            category=Category.END_TO_END,
            critical=True,
            passed=True,
            measured=0.47,
            expected=Expected(min=0.35),
            reason="held-out accuracy: measured 0.47 against >= 0.35",
        ),
        TestResult(
            name="speedup.kernels",
            category=Category.TUNING,
            passed=True,
            measured=1.02,
            expected=Expected(min=0.7, max=2.0),
            spread=0.1,
            repeats=5,
            unit="x",
        ),
    ]


def policy(*tests: dict[str, Any], **rest: Any) -> Acceptance:
    return Acceptance.model_validate({"tests": list(tests), **rest})


def result(p: Acceptance, tests: list[TestResult] | None = None) -> Any:
    return build_result(
        suite() if tests is None else tests,
        p,
        training=TrainingSummary(epochs=3, steps=30, final_accuracy=0.47, final_loss=1.9),
        speedups={"all": Timing(median=1.4, min=1.2, max=1.6, repeats=5)},
        details={"kvcache": {"capacity": {"int8": {"bytes_per_token": 264.0}}}},
    )


def by_name(r: Any) -> dict[str, TestResult]:
    return {t.name: t for t in r.tests}


def test_the_issue_s_user_tests_are_judged_on_the_report() -> None:
    r = result(
        policy(
            {"name": "my-accuracy", "metric": "training.finalAccuracy", "min": 0.42, "critical": True},
            {"name": "decode-speed", "metric": "speedups.all.median", "min": 1.5, "category": "tuning"},
        )
    )
    tests = by_name(r)
    mine, speed = tests["my-accuracy"], tests["decode-speed"]
    assert (mine.passed, mine.critical, mine.category, mine.origin) == (True, True, Category.TUNING, "user")
    assert mine.measured == 0.47 and mine.expected == Expected(min=0.42)
    assert (speed.passed, speed.critical, speed.measured) == (False, False, 1.4)
    # A timed figure carries its repeats: the median of 5, spread (1.6 - 1.2) / 1.4.
    assert speed.repeats == 5 and speed.spread == pytest.approx(0.4 / 1.4)
    assert speed.reason == "speedups.all.median: measured 1.4 against >= 1.5 (median of 5, spread 28.6%)"
    assert (r.acceptance.collected, r.acceptance.failed, r.acceptance.critical_failed) == (5, 1, 0)
    assert r.decision == Decision.NO_GO  # 4/5 is below the minimum 85 %
    # The failed tuning test's way out: below every repeat (1.4 * (1 - 0.286) = 1.0, rounded down).
    (s,) = r.suggestions
    assert (s.test, s.measured, s.suggested, s.repeats) == ("decode-speed", 1.4, Expected(min=0.99), 5)
    assert s.manifest == (
        "spec:\n  acceptance:\n    tests:\n"
        "    - {name: decode-speed, metric: speedups.all.median, min: 0.99, category: tuning}\n"
    )


def test_a_critical_user_test_not_met_is_no_go_and_named() -> None:
    r = result(
        policy({"name": "my-accuracy", "metric": "training.finalAccuracy", "min": 0.6, "critical": True})
    )
    assert r.decision == Decision.NO_GO
    assert r.decision_reason.startswith("NO_GO: 1 critical test(s) failed: my-accuracy")
    assert r.risk_level == "high"


def test_a_metric_the_report_lacks_fails_and_lists_the_numbers_that_are_there() -> None:
    r = result(policy({"name": "kv", "metric": "details.kvcache.capacity.int8.bytes_per_tokn", "max": 300}))
    kv = by_name(r)["kv"]
    assert not kv.passed and kv.measured is None
    assert kv.reason == (
        "metric details.kvcache.capacity.int8.bytes_per_tokn: not in this run's report.json; numbers under "
        "details.kvcache.capacity.int8: details.kvcache.capacity.int8.bytes_per_token"
    )
    ok = by_name(
        result(policy({"name": "kv", "metric": "details.kvcache.capacity.int8.bytes_per_token", "max": 300}))
    )
    assert ok["kv"].passed and ok["kv"].measured == 264.0
    # A speedup that this run did not measure: statically a good path, absent from this report.
    missing = by_name(result(policy({"name": "kv", "metric": "speedups.kvcache.median", "min": 1})))["kv"]
    assert not missing.passed and "numbers under speedups: speedups.all.median" in missing.reason


def test_an_override_changes_the_critical_flag_and_re_judges_the_range() -> None:
    r = result(
        policy(
            {"name": "e2e.target-accuracy", "min": 0.5},  # 0.47 no longer passes; still critical
            {"name": "infra.hardware-detected", "critical": False},
            {"name": "speedup.kernels", "min": 1.1},  # the max (2.0) stays
        )
    )
    t = by_name(r)
    acc = t["e2e.target-accuracy"]
    assert (acc.passed, acc.critical, acc.overridden, acc.expected) == (False, True, True, Expected(min=0.5))
    assert acc.reason.endswith("[overridden by acceptance.tests: range >= 0.35 -> >= 0.5: measured 0.47]")
    assert (t["infra.hardware-detected"].critical, t["infra.hardware-detected"].passed) == (False, True)
    assert t["speedup.kernels"].expected == Expected(min=1.1, max=2.0) and not t["speedup.kernels"].passed
    assert r.decision == Decision.NO_GO and "e2e.target-accuracy" in r.decision_reason


def test_an_override_can_turn_a_failure_into_a_pass_and_a_critical_one_into_a_tuning_miss() -> None:
    tests = suite()
    tests[1] = tests[1].model_copy(update={"passed": False, "measured": 0.3})
    assert result(policy()).decision == Decision.GO
    assert result(policy(), tests).decision == Decision.NO_GO
    relaxed = result(policy({"name": "e2e.target-accuracy", "min": 0.25}), tests)
    assert relaxed.decision == Decision.GO and by_name(relaxed)["e2e.target-accuracy"].passed
    demoted = result(policy({"name": "e2e.target-accuracy", "critical": False}), tests)
    assert demoted.decision == Decision.NO_GO  # 3/4 passed: below the minimum, but no critical failure
    assert demoted.acceptance.critical_failed == 0


def test_a_range_override_of_a_test_without_a_number_fails_saying_why() -> None:
    r = result(policy({"name": "infra.hardware-detected", "min": 1}))
    t = by_name(r)["infra.hardware-detected"]
    assert not t.passed
    assert "which a measurement of 'cpu' cannot be judged on" in t.reason


def test_an_override_of_a_test_that_did_not_run_changes_nothing() -> None:
    r = result(policy({"name": "kvcache.parity", "critical": False}))
    assert [t.name for t in r.tests] == [t.name for t in suite()]
    assert r.decision == Decision.GO


def test_policy_problems_name_overrides_of_unknown_tests_and_list_the_registry() -> None:
    p = policy(
        {"name": "e2e.target-acuracy", "min": 0.5}, {"name": "mine", "metric": "training.steps", "min": 1}
    )
    (line,) = policy_problems(p, ["e2e.target-accuracy", "e2e.training-completed"])
    assert line == (
        "spec.acceptance.tests.0.name: 'e2e.target-acuracy' is no built-in test; allowed: "
        f"{BASELINE_TEST}, e2e.target-accuracy, e2e.training-completed "
        "(or a name without a dot, with a metric, for a test of your own)"
    )
    assert policy_problems(policy({"name": BASELINE_TEST, "critical": True}), []) == []


def test_user_tests_ignore_overrides() -> None:
    p = policy(
        {"name": "e2e.target-accuracy", "critical": False},
        {"name": "s", "metric": "training.steps", "max": 10},
    )
    (only,) = user_tests(p.tests, {"training": {"steps": 30}})
    assert (only.name, only.passed, only.measured) == ("s", False, 30.0)
