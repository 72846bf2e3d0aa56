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
"""

from __future__ import annotations

import math
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Final, Literal

from optrun.api.result import TestResult

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
