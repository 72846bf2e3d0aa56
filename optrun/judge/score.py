"""The weighted score: five parts, each a share of passing tests in 0..1, averaged with the
policy's weights (`Acceptance.weights`).

The parts, by their wire names (the keys of `Scorecard.parts` and `Scorecard.weights`):

- ``criticalInfrastructure``: passed / collected among tests of category critical-infrastructure;
- ``safetyGates``: passed / collected among tests of category safety;
- ``passRate``: passed / collected over all tests;
- ``nonCriticalFailures``: 1 - failed / collected among tests whose critical flag is false
  (that is, the share of non-critical tests that passed);
- ``stability``: passed / collected among tests of category stability (on any device: a CPU
  run's stability is the run's, not a GPU's).

A part with no tests behind it is *unmeasured*: it neither earns nor loses score, and its
weight is shared out among the measured parts in proportion to their weights::

    score = sum(w[p] * part[p] for p in measured) / sum(w[p] for p in measured)

Counting an empty category as 1.0 would reward a run for the checks it skipped; counting it as
0.0 would punish a run for a category it has no tests in (a run with no stability tests).
Edge cases, so that the score stays in [0, 1] and never rewards an empty suite:

- no tests collected: every part is unmeasured and the score is 0.0 (the decision is NO_GO);
- tests collected but every measured part has weight 0: the score is the pass rate.

Each part, and so the score, is non-decreasing when a failed test turns into a passed one.
The score is rounded to 4 decimals (rounding is monotone too).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

from optrun.api.result import Category, Scorecard, TestResult
from optrun.api.v1alpha1 import Weights

CRITICAL_INFRASTRUCTURE: Final = "criticalInfrastructure"
SAFETY_GATES: Final = "safetyGates"
PASS_RATE: Final = "passRate"
NON_CRITICAL_FAILURES: Final = "nonCriticalFailures"
STABILITY: Final = "stability"

# Which tests each part counts, in the order the parts are reported.
_SELECTORS: Final[dict[str, Callable[[TestResult], bool]]] = {
    CRITICAL_INFRASTRUCTURE: lambda t: t.category == Category.CRITICAL_INFRASTRUCTURE,
    SAFETY_GATES: lambda t: t.category == Category.SAFETY,
    PASS_RATE: lambda t: True,
    NON_CRITICAL_FAILURES: lambda t: not t.critical,
    STABILITY: lambda t: t.category == Category.STABILITY,
}
PARTS: Final = tuple(_SELECTORS)

DIGITS: Final = 4


def weight_map(weights: Weights) -> dict[str, float]:
    """The policy's weights keyed by part (wire names)."""
    return {name: float(value) for name, value in weights.model_dump(by_alias=True).items()}


def scorecard(tests: Sequence[TestResult], weights: Weights) -> Scorecard:
    """Each measured part's share of passing tests, the configured weights, the unmeasured parts."""
    parts: dict[str, float] = {}
    unmeasured: list[str] = []
    for name, selects in _SELECTORS.items():
        chosen = [t for t in tests if selects(t)]
        if chosen:
            parts[name] = sum(t.passed for t in chosen) / len(chosen)
        else:
            unmeasured.append(name)
    return Scorecard(parts=parts, weights=weight_map(weights), unmeasured=unmeasured)


def weighted_score(card: Scorecard) -> float:
    """The weighted mean of the measured parts, in [0, 1] (see the module docstring)."""
    if not card.parts:
        return 0.0
    total = sum(card.weights.get(name, 0.0) for name in card.parts)
    if total > 0.0:
        value = sum(card.weights.get(name, 0.0) * part for name, part in card.parts.items()) / total
    else:
        value = card.parts[PASS_RATE]
    # A weighted mean cannot leave [0, 1]; clamp the last ulp of float rounding all the same.
    return round(min(1.0, max(0.0, value)), DIGITS)
