"""Invariants of the judge, checked on generated suites and policies (hypothesis)."""

from __future__ import annotations

import json
import math
import random

from hypothesis import assume, given
from hypothesis import strategies as st

from optrun.api.result import Category, Decision, Expected, SafetySummary, TestResult, TrainingSummary
from optrun.api.v1alpha1 import Acceptance, Weights
from optrun.judge import BASELINE_TEST, Baseline, build_result, decision_rank, judge, recommend, suggest
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


# -- the user's tests, overrides, baselines, suggestions ---------------------------------------

user_entries = st.lists(
    st.builds(
        lambda i, lo, width, crit, side: {
            "name": f"mine-{i}",
            "metric": "training.finalAccuracy",
            **({"min": lo} if side != "max" else {}),
            **({"max": lo + width} if side != "min" else {}),
            "critical": crit,
        },
        st.integers(0, 5),
        st.floats(-1.0, 2.0),
        st.floats(0.0, 1.0),
        st.booleans(),
        st.sampled_from(["min", "max", "both"]),
    ),
    max_size=4,
    unique_by=lambda e: e["name"],
)


@given(suites(), policies(), user_entries, st.floats(0.0, 1.0))
def test_a_failed_critical_user_test_is_never_go(
    tests: list[TestResult], policy: Acceptance, entries: list[dict[str, object]], accuracy: float
) -> None:
    policy = policy.model_copy(update={"tests": Acceptance.model_validate({"tests": entries}).tests})
    result = build_result(tests, policy, training=TrainingSummary(steps=1, final_accuracy=accuracy))
    mine = [t for t in result.tests if t.origin == "user"]
    assert len(mine) == len(entries)
    for t in mine:
        lo, hi = t.expected.min if t.expected else None, t.expected.max if t.expected else None
        assert t.passed == ((lo is None or accuracy >= lo) and (hi is None or accuracy <= hi))
    if any(t.critical and not t.passed for t in mine):
        assert result.decision == Decision.NO_GO
        if result.acceptance.critical_failed <= 5:  # beyond five, the reason says "and N more"
            assert next(t.name for t in mine if t.critical and not t.passed) in result.decision_reason


@given(suites(min_size=1), policies(), st.data())
def test_overriding_a_failed_test_critical_is_never_go(
    tests: list[TestResult], policy: Acceptance, data: st.DataObject
) -> None:
    named = [t.model_copy(update={"name": f"area.t{i}"}) for i, t in enumerate(tests)]
    failed = [t.name for t in named if not t.passed]
    assume(failed)
    name = data.draw(st.sampled_from(failed))
    policy = policy.model_copy(
        update={"tests": Acceptance.model_validate({"tests": [{"name": name, "critical": True}]}).tests}
    )
    result = build_result(named, policy)
    assert result.decision == Decision.NO_GO
    assert [t.overridden for t in result.tests] == [t.name == name for t in named]


@given(suites(), policies())
def test_a_run_compared_with_itself_never_regresses(tests: list[TestResult], policy: Acceptance) -> None:
    # Test names with a dot, as the suite's are; measurements as generated (nan, text, bools...).
    named = [t.model_copy(update={"name": f"area.t{i}"}) for i, t in enumerate(tests)]
    first = build_result(
        named, policy, training=TrainingSummary(steps=10, final_accuracy=0.5, final_loss=2.0)
    )
    doc = json.loads(json.dumps(first.to_json()))
    again = build_result(
        named,
        policy,
        training=TrainingSummary(steps=10, final_accuracy=0.5, final_loss=2.0),
        baseline=Baseline(source="self", result=doc),
    )
    assert again.baseline is not None and again.baseline.comparisons
    assert all(c.passed and c.change == 0.0 for c in again.baseline.comparisons)
    assert next(t for t in again.tests if t.name == BASELINE_TEST).passed
    # ... and the compact form (what the operator keeps of a run) gives the same comparisons.
    compact = build_result(
        named,
        policy,
        training=TrainingSummary(steps=10, final_accuracy=0.5, final_loss=2.0),
        baseline=Baseline(source="self", result=json.loads(first.compact())),
    )
    assert compact.baseline is not None
    assert {c.metric for c in compact.baseline.comparisons} <= {c.metric for c in again.baseline.comparisons}
    assert all(c.passed for c in compact.baseline.comparisons)


@given(
    st.floats(1e-3, 1e3),
    st.floats(0.0, 3.0),
    st.floats(0.01, 1e3),
    st.sampled_from(["min", "max"]),
    st.one_of(st.none(), st.floats(0.0, 2.0)),
)
def test_a_suggested_range_contains_the_measurement_and_every_repeat(
    value: float, factor: float, bound: float, side: str, spread: float | None
) -> None:
    expected = Expected(min=bound) if side == "min" else Expected(max=bound)
    test = TestResult(
        name="area.t",
        category=Category.TUNING,
        passed=False,
        measured=value,
        expected=expected,
        spread=spread,
        repeats=None if spread is None else 5,
    )
    s = suggest(test)
    missed = value < bound if side == "min" else value > bound
    if not missed:
        assert s is None
        return
    assert s is not None
    reach = min(spread, 1.0) if spread is not None else 0.0
    lo, hi = (value * (1 - reach), value) if side == "min" else (value, value * (1 + reach))
    new = s.suggested
    assert (new.min is None or new.min <= lo) and (new.max is None or new.max >= hi)
    assert str(new.min if side == "min" else new.max) in s.manifest and "name: area.t" in s.manifest
    assert suggest(test.model_copy(update={"category": Category.END_TO_END})) is None
