"""The weighted score on exact, hand-computed examples."""

from __future__ import annotations

import pytest

from optrun.api.result import Category, TestResult
from optrun.api.v1alpha1 import Acceptance, Weights
from optrun.judge import judge
from optrun.judge.score import PARTS


def make(name: str, category: Category, critical: bool, passed: bool) -> TestResult:
    return TestResult(name=name, category=category, critical=critical, passed=passed)


C, S, E, ST, T = (
    Category.CRITICAL_INFRASTRUCTURE,
    Category.SAFETY,
    Category.END_TO_END,
    Category.STABILITY,
    Category.TUNING,
)
EVERY_PART = [
    make("infra.detect", C, True, True),
    make("infra.extra", C, False, False),
    make("gate.nan", S, True, True),
    make("gpu.memory", ST, False, True),
    make("gpu.temperature", ST, False, False),
    make("train.e2e", E, False, True),
    make("kv.speedup", T, False, True),
    make("kernels.speedup", T, False, True),
]


def test_default_weights_give_the_design_score() -> None:
    verdict = judge(EVERY_PART, Acceptance())
    parts = verdict.scorecard.parts
    assert parts == pytest.approx(
        {
            "criticalInfrastructure": 1 / 2,
            "safetyGates": 1.0,
            "passRate": 6 / 8,
            "nonCriticalFailures": 4 / 6,  # 6 non-critical tests, 2 of them failed
            "stability": 1 / 2,
        }
    )
    # 0.40 * 0.5 + 0.20 * 1 + 0.15 * 0.75 + 0.15 * 2/3 + 0.10 * 0.5
    assert verdict.score == pytest.approx(0.6625, abs=1e-12)
    assert verdict.scorecard.unmeasured == []
    assert verdict.scorecard.weights == {
        "criticalInfrastructure": 0.40,
        "safetyGates": 0.20,
        "passRate": 0.15,
        "nonCriticalFailures": 0.15,
        "stability": 0.10,
    }


def test_unmeasured_parts_share_their_weight_among_the_measured_ones() -> None:
    tests = [make("infra.detect", C, True, True), make("kv.speedup", T, False, False)]
    card = judge(tests, Acceptance()).scorecard
    assert card.unmeasured == ["safetyGates", "stability"]
    assert set(card.parts) == {"criticalInfrastructure", "passRate", "nonCriticalFailures"}
    # (0.40 * 1 + 0.15 * 0.5 + 0.15 * 0) / (0.40 + 0.15 + 0.15)
    assert judge(tests, Acceptance()).score == round(0.475 / 0.70, 4)


def test_all_tests_passing_scores_one_and_all_failing_scores_zero() -> None:
    passing = [t.model_copy(update={"passed": True}) for t in EVERY_PART]
    failing = [t.model_copy(update={"passed": False}) for t in EVERY_PART]
    assert judge(passing, Acceptance()).score == 1.0
    assert judge(failing, Acceptance()).score == 0.0


@pytest.mark.parametrize("part", PARTS)
def test_all_weight_on_one_part_makes_the_score_that_part(part: str) -> None:
    weights = Weights.model_validate({name: 1.0 if name == part else 0.0 for name in PARTS})
    verdict = judge(EVERY_PART, Acceptance(weights=weights))
    assert verdict.score == round(verdict.scorecard.parts[part], 4)


def test_zero_weight_on_every_measured_part_falls_back_to_the_pass_rate() -> None:
    tests = [
        make("kv.speedup", T, False, True),
        make("kv.memory", T, False, False),
        make("kv.x", T, False, True),
    ]
    weights = Weights(
        critical_infrastructure=0.5,
        safety_gates=0.5,
        pass_rate=0.0,
        non_critical_failures=0.0,
        stability=0.0,
    )
    verdict = judge(tests, Acceptance(weights=weights))
    assert verdict.scorecard.unmeasured == ["criticalInfrastructure", "safetyGates", "stability"]
    assert verdict.score == round(2 / 3, 4)


def test_moving_weight_onto_the_failing_category_lowers_the_score() -> None:
    tests = [make("infra.detect", C, True, True), make("gpu.memory", ST, False, False)]
    light = Weights()
    heavy = Weights(
        critical_infrastructure=0.10,
        safety_gates=0.20,
        pass_rate=0.15,
        non_critical_failures=0.15,
        stability=0.40,
    )
    assert judge(tests, Acceptance(weights=heavy)).score < judge(tests, Acceptance(weights=light)).score
