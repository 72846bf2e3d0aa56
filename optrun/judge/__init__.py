"""The judge: acceptance policy + test results -> scorecard -> decision.

Pure Python over `optrun.api` (no torch, no kubernetes), used by the runtime to write its
report and by the operator to set status, so that a run is judged the same way on both sides.

    verdict = judge(tests, spec.acceptance, safety=safety)
    result = build_result(tests, spec.acceptance, safety=safety, speedups=..., hardware=...)
"""

from optrun.judge.decision import (
    Verdict,
    build_result,
    decide,
    decision_rank,
    judge,
    risk_level,
    summarize,
)
from optrun.judge.recommend import recommend
from optrun.judge.score import PARTS, scorecard, weighted_score

__all__ = [
    "PARTS",
    "Verdict",
    "build_result",
    "decide",
    "decision_rank",
    "judge",
    "recommend",
    "risk_level",
    "scorecard",
    "summarize",
    "weighted_score",
]
