"""Recommendations for out-of-range measurements, on exact examples."""

from __future__ import annotations

import math

import pytest

from optrun.api.result import Category, Expected, Scalar, TestResult
from optrun.judge import recommend
from optrun.judge.recommend import widen


def ranged(
    measured: Scalar | list[Scalar],
    lo: float | None = 2.0,
    hi: float | None = 2.5,
    *,
    passed: bool = False,
    spread: float | None = None,
    repeats: int | None = None,
) -> TestResult:
    return TestResult(
        name="kernels+compression.speedup",
        category=Category.TUNING,
        passed=passed,
        measured=measured,
        expected=Expected(min=lo, max=hi),
        unit="x",
        spread=spread,
        repeats=repeats,
    )


def test_design_example_widens_max_to_two_significant_digits() -> None:
    assert (
        recommend(ranged(2.57))
        == "kernels+compression.speedup: measured 2.57x against 2..2.5x: widen max to 2.6x"
    )


def test_a_measurement_just_below_min_widens_min_downward() -> None:
    assert (
        recommend(ranged(1.87))
        == "kernels+compression.speedup: measured 1.87x against 2..2.5x: widen min to 1.8x"
    )


def test_a_one_sided_range_is_widened_on_its_side() -> None:
    assert recommend(ranged(0.93, 1.0, None)) == (
        "kernels+compression.speedup: measured 0.93x against >= 1x: widen min to 0.93x"
    )


def test_far_outside_the_range_asks_for_investigation_not_a_wider_range() -> None:
    text = recommend(ranged(4.1))
    assert text == (
        "kernels+compression.speedup: measured 4.1x against 2..2.5x, 64% above max: "
        "investigate before changing the range"
    )


def test_a_miss_within_the_spread_of_the_repeats_asks_for_a_remeasure() -> None:
    text = recommend(ranged(2.6, spread=0.10, repeats=5))
    assert text is not None
    assert "(median of 5, spread 10.0%)" in text
    assert "re-measure with more repeats before you widen max to 2.6x" in text
    # Outside the noise the same miss is a plain widening.
    assert recommend(ranged(2.6, spread=0.01, repeats=5)) == (
        "kernels+compression.speedup: measured 2.6x (median of 5, spread 1.0%) against 2..2.5x: "
        "widen max to 2.6x"
    )


def test_a_bound_of_zero_or_a_non_finite_measurement_asks_for_investigation() -> None:
    zero = recommend(ranged(0.01, None, 0.0))
    assert zero is not None and zero.endswith("investigate")
    nan = recommend(ranged(math.nan))
    assert nan is not None and "not a finite number: investigate" in nan


@pytest.mark.parametrize(
    "test",
    [
        ranged(2.49, passed=True),  # near the edge but passing
        ranged(2.2),  # failed for another reason, inside the range
        ranged(True),  # a flag
        ranged("fast"),
        ranged([2.6, 2.7]),
        ranged(2.6, None, None),
        TestResult(
            name="eq", category=Category.TUNING, passed=False, measured=3, expected=Expected(equals=2)
        ),
        TestResult(name="none", category=Category.TUNING, passed=False, measured=3.0),
    ],
)
def test_no_recommendation_without_a_failed_out_of_range_number(test: TestResult) -> None:
    assert recommend(test) is None


@pytest.mark.parametrize(
    ("value", "side", "widened"),
    [
        (2.57, "max", 2.6),
        (2.57, "min", 2.5),
        (0.0012, "max", 0.0012),
        (0.00123, "max", 0.0013),
        (1234.5, "max", 1300.0),
        (1234.5, "min", 1200.0),
        (-2.57, "max", -2.5),
        (-2.57, "min", -2.6),
        (0.0, "min", 0.0),
    ],
)
def test_widen_rounds_outward_to_two_significant_digits(value: float, side: str, widened: float) -> None:
    assert widen(value, side) == widened  # type: ignore[arg-type]
