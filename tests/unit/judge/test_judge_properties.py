"""Invariants of the judge, checked on generated suites and policies (hypothesis)."""

from __future__ import annotations

import math
import random

from hypothesis import assume, given
from hypothesis import strategies as st

from optrun.api.result import Category, Decision, Expected, SafetySummary, TestResult
from optrun.api.v1alpha1 import Acceptance, Weights
from optrun.judge import build_result, decision_rank, judge, recommend
from optrun.judge.recommend import WIDEN_LIMIT, widen
from optrun.judge.score import PARTS

ranges = st.one_of(
    st.none(),
    st.builds(
        lambda lo, width, one_sided: Expected(
            min=None if one_sided == "max" else lo, max=None if one_sided == "min" else lo + width
        ),
        st.floats(0.0, 100.0),
        st.floats(0.0, 100.0),
        st.sampled_from(["min", "max", "both"]),
    ),
)
measurements = st.one_of(
    st.none(), st.booleans(), st.floats(-1e3, 1e3), st.floats(allow_nan=True), st.text(max_size=3)
)


@st.composite
def suites(draw: st.DrawFn, min_size: int = 0, max_size: int = 30) -> list[TestResult]:
    rows = draw(
        st.lists(
            st.tuples(
                st.sampled_from(list(Category)),
                st.booleans(),
                st.booleans(),
                measurements,
                ranges,
                st.one_of(st.none(), st.floats(0.0, 1.0)),
            ),
            min_size=min_size,
            max_size=max_size,
        )
    )
    return [
        TestResult(
            name=f"t{i}",
            category=cat,
            critical=crit,
            passed=ok,
            measured=m,
            expected=exp,
            unit="x",
            spread=spread,
            repeats=None if spread is None else 5,
        )
        for i, (cat, crit, ok, m, exp, spread) in enumerate(rows)
    ]


@st.composite
def weights(draw: st.DrawFn) -> Weights:
    raw = draw(st.lists(st.integers(0, 10), min_size=len(PARTS), max_size=len(PARTS)).filter(any))
    return Weights.model_validate({part: n / sum(raw) for part, n in zip(PARTS, raw, strict=True)})


@st.composite
def policies(draw: st.DrawFn) -> Acceptance:
    # Round thresholds too, so that pass rates land exactly on them (19/20 against 0.95).
    target = draw(st.sampled_from([0.0, 0.5, 0.75, 0.85, 0.95, 1.0]) | st.floats(0.0, 1.0))
    minimum = draw(st.sampled_from([0.0, target / 2, target]) | st.floats(0.0, target))
    return Acceptance(target_pass_rate=target, minimum_pass_rate=minimum, weights=draw(weights()))


@given(suites(), policies())
def test_a_failed_critical_test_is_never_go_nor_conditional_go(
    tests: list[TestResult], policy: Acceptance
) -> None:
    verdict = judge(tests, policy)
    if any(t.critical and not t.passed for t in tests):
        assert verdict.decision == Decision.NO_GO
        assert verdict.risk_level == "high"


@given(suites(min_size=1), policies(), st.data())
def test_turning_a_failed_test_into_a_passed_one_never_lowers_decision_or_score(
    tests: list[TestResult], policy: Acceptance, data: st.DataObject
) -> None:
    failed = [i for i, t in enumerate(tests) if not t.passed]
    assume(failed)
    i = data.draw(st.sampled_from(failed))
    better = [*tests[:i], tests[i].model_copy(update={"passed": True}), *tests[i + 1 :]]
    before, after = judge(tests, policy), judge(better, policy)
    assert after.acceptance.pass_rate > before.acceptance.pass_rate
    assert decision_rank(after.decision) >= decision_rank(before.decision)
    assert after.score >= before.score


@given(suites(), policies())
def test_the_decision_meets_its_thresholds_and_the_score_stays_in_range(
    tests: list[TestResult], policy: Acceptance
) -> None:
    verdict = judge(tests, policy)
    summary = verdict.acceptance
    assert 0.0 <= verdict.score <= 1.0
    assert all(0.0 <= p <= 1.0 for p in verdict.scorecard.parts.values())
    assert summary.passed + summary.failed == summary.collected == len(tests)
    if verdict.decision == Decision.GO:
        assert summary.pass_rate >= policy.target_pass_rate
    if verdict.decision != Decision.NO_GO:
        assert summary.collected > 0 and summary.critical_failed == 0
        assert summary.pass_rate >= policy.minimum_pass_rate
    if verdict.decision == Decision.NO_GO:
        assert verdict.risk_level == "high"
    if verdict.decision == Decision.CONDITIONAL_GO:
        assert verdict.risk_level != "low"


@given(policies(), st.one_of(st.none(), st.builds(SafetySummary, recoveries=st.integers(0, 3))))
def test_zero_tests_are_never_go(policy: Acceptance, safety: SafetySummary | None) -> None:
    verdict = judge([], policy, safety=safety)
    assert verdict.decision == Decision.NO_GO
    assert verdict.score == 0.0
    assert verdict.recommendations == ()


@given(suites(), policies(), st.randoms(use_true_random=False))
def test_the_verdict_does_not_depend_on_test_order(
    tests: list[TestResult], policy: Acceptance, rnd: random.Random
) -> None:
    shuffled = list(tests)
    rnd.shuffle(shuffled)
    a, b = judge(tests, policy), judge(shuffled, policy)
    assert (a.decision, a.score, a.risk_level, a.acceptance, a.scorecard, a.reason.split(":")[0]) == (
        b.decision,
        b.score,
        b.risk_level,
        b.acceptance,
        b.scorecard,
        b.reason.split(":")[0],
    )
    assert sorted(a.recommendations) == sorted(b.recommendations)


@given(suites(), policies())
def test_judging_never_changes_the_tests(tests: list[TestResult], policy: Acceptance) -> None:
    before = [t.model_dump() for t in tests]
    result = build_result(tests, policy)
    after = [t.model_dump() for t in tests]
    # nan != nan, so compare the reprs, which spell nan the same way every time.
    assert repr(before) == repr(after)
    assert repr([t.model_dump() for t in result.tests]) == repr(before)
    assert len(result.recommendations) <= result.acceptance.failed


@given(suites(min_size=1), policies())
def test_all_weight_on_one_part_gives_that_part_as_the_score(
    tests: list[TestResult], policy: Acceptance
) -> None:
    base = judge(tests, policy)
    for part in PARTS:
        only = Weights.model_validate({p: 1.0 if p == part else 0.0 for p in PARTS})
        verdict = judge(tests, policy.model_copy(update={"weights": only}))
        expected = base.scorecard.parts.get(part, base.acceptance.pass_rate)
        assert verdict.score == round(expected, 4)
        assert verdict.decision == base.decision  # weights move the score, never the decision


@given(suites(min_size=1), policies())
def test_shifting_weight_from_a_weaker_part_to_a_stronger_one_raises_the_score(
    tests: list[TestResult], policy: Acceptance
) -> None:
    base = judge(tests, policy)
    parts, w = base.scorecard.parts, dict(base.scorecard.weights)
    strong, weak = max(parts, key=parts.__getitem__), min(parts, key=parts.__getitem__)
    assume(parts[strong] > parts[weak] and w[weak] > 0)
    gain = w[weak] * (parts[strong] - parts[weak]) / sum(w[p] for p in parts)
    w[strong], w[weak] = w[strong] + w[weak], 0.0
    shifted = judge(tests, policy.model_copy(update={"weights": Weights.model_validate(w)}))
    assert shifted.score >= base.score
    if gain > 2e-4:  # beyond what rounding to 4 decimals can swallow
        assert shifted.score > base.score


finite = st.floats(1e-300, 1e300) | st.floats(-1e300, -1e-300)


@given(finite, st.sampled_from(["min", "max"]))
def test_a_widened_bound_contains_the_measurement_with_two_significant_digits(
    value: float, side: str
) -> None:
    bound = widen(value, side)  # type: ignore[arg-type]
    assert bound >= value if side == "max" else bound <= value
    assert abs(bound - value) <= abs(value) / 10
    assert float(f"{bound:.2g}") == bound


@given(st.floats(0.01, 1e6), st.floats(1.0001, 1.0 + WIDEN_LIMIT), st.sampled_from(["min", "max"]))
def test_a_near_miss_is_widened_to_a_range_that_would_have_passed(
    hi: float, factor: float, side: str
) -> None:
    value = hi * factor if side == "max" else hi / factor
    assume(math.isfinite(value) and value != hi)
    expected = Expected(max=hi) if side == "max" else Expected(min=hi)
    outside = abs(value - hi) / hi
    assume(outside <= WIDEN_LIMIT)
    test = TestResult(name="m", category=Category.TUNING, passed=False, measured=value, expected=expected)
    text = recommend(test)
    assert text is not None
    new = float(text.rsplit(" to ", 1)[1])
    assert new >= value if side == "max" else new <= value
