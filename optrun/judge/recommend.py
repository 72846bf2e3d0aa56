"""Recommendations for out-of-range measurements: sentences for a person, never applied.

Only a failed test whose expectation is a range (``min`` and/or ``max``) and whose measurement
is one finite number gets a recommendation; a passing test gets none, however near the edge.
The rule, with ``bound`` the end of the range that was missed and
``outside = |measured - bound| / |bound|`` how far beyond it the measurement lies:

- ``outside <= WIDEN_LIMIT`` (25 %): widen that end to the measurement rounded outward to two
  significant digits: "kernels+compression.speedup: measured 2.57x against 2..2.5x: widen max
  to 2.6x". The new end always contains the measurement.
- the test was timed (``repeats`` > 1) and its relative spread ``(max - min) / median`` is at
  least ``outside``: the miss is within the noise of the repeats, so re-measure first.
- ``outside > WIDEN_LIMIT``, a bound of 0 (nothing to scale against) or a measurement that is
  not finite: investigate. A range is a claim about the system; moving it far to fit one run
  would hide a regression.

Beside the sentences, each failed *tuning* test gets a `Suggestion` (`suggest`): the measured
value, the range, a suggested range from the spread of its repeats, and the YAML that would
set it in the manifest (an entry of spec.acceptance.tests). Tuning tests only: the range of a
critical, safety, end-to-end or stability test is a claim to investigate, not to tune.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any, Final, Literal

import yaml

from optrun.api.result import Category, Suggestion, TestResult
from optrun.api.v1alpha1 import AcceptanceTestSpec

# Beyond this share of the missed bound a measurement is a finding, not a range to widen.
WIDEN_LIMIT: Final = 0.25
# The widened bound keeps this many significant digits (2.57 -> 2.6, 1234 -> 1300).
SIGNIFICANT_DIGITS: Final = 2


def recommend(test: TestResult) -> str | None:
    """One sentence for a failed, out-of-range, single-number measurement; None otherwise."""
    expected = test.expected
    if test.passed or expected is None or expected.equals is not None:
        return None
    if expected.min is None and expected.max is None:
        return None
    measured = test.measured
    # bool is an int, but a flag has no range to widen.
    if isinstance(measured, bool) or not isinstance(measured, int | float):
        return None
    value = float(measured)
    unit = test.unit
    against = f"against {expected.describe()}{unit}"
    if not math.isfinite(value):
        return f"{test.name}: measured {value}{unit} {against}: not a finite number: investigate"

    side: Literal["min", "max"]
    if expected.min is not None and value < expected.min:
        side, bound = "min", expected.min
    elif expected.max is not None and value > expected.max:
        side, bound = "max", expected.max
    else:
        return None  # inside the range: the test failed for another reason, nothing to widen

    timed = f" (median of {test.repeats}, spread {test.spread:.1%})" if _timed(test) else ""
    head = f"{test.name}: measured {value:.4g}{unit}{timed} {against}"
    if bound == 0.0:
        return f"{head}: no scale to size the miss against a bound of 0: investigate"
    outside = abs(value - bound) / abs(bound)
    direction = "below" if side == "min" else "above"
    if outside > WIDEN_LIMIT:
        return f"{head}, {outside:.0%} {direction} {side}: investigate before changing the range"
    widened = f"widen {side} to {widen(value, side):g}{unit}"
    if _timed(test) and test.spread is not None and test.spread >= outside:
        noise = "the miss is within the spread of the repeats: re-measure with more repeats"
        return f"{head}: {noise} before you {widened}"
    return f"{head}: {widened}"


def widen(value: float, side: Literal["min", "max"]) -> float:
    """`value` rounded outward (down for a min, up for a max) to SIGNIFICANT_DIGITS digits.

    Decimal arithmetic on the shortest repr keeps 2.6 from turning into 2.6000000000000001
    and keeps 0.0012 at 0.0012, so the result contains `value` and prints short."""
    if value == 0.0:
        return 0.0
    exponent = math.floor(math.log10(abs(value))) - (SIGNIFICANT_DIGITS - 1)
    step = Decimal(1).scaleb(exponent)
    rounding = ROUND_FLOOR if side == "min" else ROUND_CEILING
    result = float(Decimal(repr(value)).quantize(step, rounding=rounding))
    # float() of the decimal may land one ulp inside the measurement: step out again.
    if side == "max" and result < value:
        result = math.nextafter(result, math.inf)
    if side == "min" and result > value:
        result = math.nextafter(result, -math.inf)
    return result


def _timed(test: TestResult) -> bool:
    return test.repeats is not None and test.repeats > 1 and test.spread is not None


def suggest(test: TestResult, entries: Sequence[AcceptanceTestSpec] = ()) -> Suggestion | None:
    """For a failed tuning test with a range and one finite measurement: the range that contains
    what was measured and the manifest change that would set it (never applied by optrun).

    The missed end moves to the measurement, rounded outward to two significant digits
    (`widen`); for a timed test, to the edge of its repeats instead: every repeat lies within
    median * (1 -/+ spread), so a range with that end would have passed each one of them.
    `entries`: spec.acceptance.tests, so that a test of the user's own, or one overridden
    already, is changed in its own entry."""
    expected = test.expected
    measured = test.measured
    if test.passed or test.category != Category.TUNING or expected is None or expected.equals is not None:
        return None
    if isinstance(measured, bool) or not isinstance(measured, int | float) or not math.isfinite(measured):
        return None
    value = float(measured)
    spread = test.spread if _timed(test) else None
    reach = min(spread, 1.0) if spread is not None else 0.0
    side: Literal["min", "max"]
    if expected.min is not None and value < expected.min:
        side, bound, edge = "min", expected.min, value * (1.0 - reach) if value > 0 else value * (1.0 + reach)
    elif expected.max is not None and value > expected.max:
        side, bound, edge = "max", expected.max, value * (1.0 + reach) if value > 0 else value * (1.0 - reach)
    else:
        return None
    new_end = widen(edge, side)
    suggested = expected.model_copy(update={side: new_end})
    notes = []
    outside = abs(value - bound) / abs(bound) if bound else math.inf
    if outside > WIDEN_LIMIT:
        where = "below" if side == "min" else "above"
        how_far = f"{outside:.0%} {where} {side}" if math.isfinite(outside) else f"{where} a {side} of 0"
        notes.append(f"the measurement is {how_far}: investigate before you move the range that far")
    if spread is not None and spread >= 1.0:
        notes.append(f"the repeats spread over {spread:.0%} of the median: re-measure with more repeats")
    entry = _entry(test.name, entries, side, new_end)
    return Suggestion(
        test=test.name,
        measured=value,
        expected=expected,
        suggested=suggested,
        repeats=test.repeats if spread is not None else None,
        spread=spread,
        unit=test.unit,
        manifest=yaml.safe_dump(
            {"spec": {"acceptance": {"tests": [entry]}}}, default_flow_style=None, sort_keys=False
        ),
        note="; ".join(notes),
    )


def _entry(name: str, entries: Sequence[AcceptanceTestSpec], side: str, value: float) -> dict[str, Any]:
    """The spec.acceptance.tests entry for `name` with `side` set to `value`: the user's own entry
    (or an override already there) changed, or a new override."""
    own = next((e for e in entries if e.name == name), None)
    entry: dict[str, Any] = {"name": name}
    if own is not None:
        entry = own.model_dump(mode="json", by_alias=True, exclude_none=True)
    entry[side] = value
    return entry
