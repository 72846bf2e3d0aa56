"""The judge: acceptance policy + test results -> scorecard -> decision.

Pure Python over `optrun.api` (no torch, no kubernetes), used by the runtime to write its
report and by the operator to set status, so that a run is judged the same way on both sides.

    verdict = judge(tests, spec.acceptance, safety=safety)
    result = build_result(tests, spec.acceptance, safety=safety, speedups=..., hardware=...,
                          baseline=Baseline(source="report: runs/a/report.json", result=doc))

`build_result` also applies the rest of the policy (`optrun.judge.policy`: the user's own tests
and the overrides; `optrun.judge.baseline`: the comparison with an earlier run) and adds the
suggestions for failed tuning tests (`optrun.judge.recommend.suggest`).
"""

from optrun.judge.baseline import Baseline, compare, figures
from optrun.judge.decision import (
    Verdict,
    build_result,
    decide,
    decision_rank,
    judge,
    risk_level,
    summarize,
)
from optrun.judge.policy import BASELINE_TEST, JUDGE_TESTS, apply_overrides, policy_problems, user_tests
from optrun.judge.recommend import recommend, suggest
from optrun.judge.score import PARTS, scorecard, weighted_score

__all__ = [
    "BASELINE_TEST",
    "JUDGE_TESTS",
    "PARTS",
    "Baseline",
    "Verdict",
    "apply_overrides",
    "build_result",
    "compare",
    "decide",
    "decision_rank",
    "figures",
    "judge",
    "policy_problems",
    "recommend",
    "risk_level",
    "scorecard",
    "suggest",
    "summarize",
    "user_tests",
    "weighted_score",
]
