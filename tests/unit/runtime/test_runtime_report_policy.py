"""The report's policy sections: the user's own tests, the comparison with a baseline (report.md's
table and report.json's `baseline` key) and the suggestions with the manifest change; and
`load_baseline`, which reads what spec.acceptance.baseline names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from optrun import judge
from optrun.api.result import Category, Expected, Result, TestResult, Timing, TrainingSummary
from optrun.api.v1alpha1 import Acceptance
from optrun.runtime import report
from optrun.runtime.context import RunContext
from optrun.runtime.hardware import detect
from tests.unit.runtime.runtime_support import pydoc_corpus, seeded_model, small_spec


def suite(accuracy: float, speedup: float) -> list[TestResult]:
    return [
        TestResult(name="infra.ok", category=Category.CRITICAL_INFRASTRUCTURE, critical=True, passed=True),
        TestResult(
            name="e2e.target-accuracy",
            category=Category.END_TO_END,
            critical=True,
            passed=accuracy >= 0.35,
            measured=accuracy,
            expected=Expected(min=0.35),
            reason=f"accuracy {accuracy}",
        ),
        TestResult(
            name="speedup.kvcache",
            category=Category.TUNING,
            passed=speedup >= 1.0,
            measured=speedup,
            expected=Expected(min=1.0),
            spread=0.1,
            repeats=5,
            unit="x",
        ),
    ]


def judged(
    accuracy: float, speedup: float, policy: dict[str, object], baseline: judge.Baseline | None = None
) -> Result:
    _, hardware = detect("cpu")
    return judge.build_result(
        suite(accuracy, speedup),
        Acceptance.model_validate(policy),
        speedups={"kvcache": Timing(median=speedup, min=speedup * 0.95, max=speedup * 1.05, repeats=5)},
        training=TrainingSummary(epochs=1, steps=10, final_accuracy=accuracy, final_loss=2.0),
        hardware=hardware,
        baseline=baseline,
    )


def write(tmp_path: Path, result: Result, objective: str = "speed") -> tuple[dict[str, object], str]:
    spec = small_spec(acceptance={"objective": objective})
    device, hardware = detect("cpu")
    ctx = RunContext(
        spec=spec,
        device=device,
        hardware=hardware,
        corpus=pydoc_corpus(),
        model_factory=lambda: seeded_model(spec),
        output_dir=tmp_path,
    )
    paths = report.write(tmp_path, result, ctx)
    return json.loads(Path(paths["json"]).read_text()), Path(paths["markdown"]).read_text()


def test_report_shows_the_user_s_tests_and_overrides(tmp_path: Path) -> None:
    policy = {
        "tests": [
            {"name": "my-accuracy", "metric": "training.finalAccuracy", "min": 0.42, "critical": True},
            {"name": "speedup.kvcache", "critical": True},
        ]
    }
    doc, md = write(tmp_path, judged(0.40, 0.6, policy), objective="memory")
    assert "Objective: memory." in md
    assert "NO_GO: 2 critical test(s) failed: speedup.kvcache, my-accuracy" in md
    own = md.split("## Your tests (spec.acceptance.tests)", 1)[1].split("\n## ", 1)[0]
    assert (
        "| my-accuracy | your own | yes | NO | 0.4 | >= 0.42 | training.finalAccuracy: measured 0.4 against >= 0.42 |"
        in own
    )
    assert "| speedup.kvcache | built-in, overridden | yes | NO | 0.6 | >= 1 |" in own
    assert "e2e.target-accuracy" not in own
    tests = {t["name"]: t for t in doc["tests"]}
    assert tests["my-accuracy"]["origin"] == "user" and tests["speedup.kvcache"]["overridden"] is True


def test_report_with_a_baseline_has_the_comparison_table_and_the_baseline_key(tmp_path: Path) -> None:
    earlier = judged(0.47, 1.6, {})
    source = tmp_path / "earlier.json"
    source.write_text(json.dumps(earlier.to_json()))
    policy = Acceptance.model_validate({"baseline": {"report": str(source)}})
    baseline = report.load_baseline(policy)
    assert baseline is not None and baseline.error == "" and baseline.source == f"report: {source}"
    doc, md = write(
        tmp_path, judged(0.40, 1.6, policy.model_dump(by_alias=True, exclude_none=True), baseline)
    )
    b = doc["baseline"]
    assert b["source"] == f"report: {source}"
    rows = {c["metric"]: c for c in b["comparisons"]}
    assert set(rows["training.finalAccuracy"]) == {
        "metric",
        "baseline",
        "measured",
        "change",
        "tolerance",
        "passed",
        "better",
    }
    assert (rows["training.finalAccuracy"]["baseline"], rows["training.finalAccuracy"]["measured"]) == (
        0.47,
        0.4,
    )
    assert (
        rows["training.finalAccuracy"]["passed"] is False
        and rows["speedups.kvcache.median"]["passed"] is True
    )
    section = md.split(f"## Baseline: report: {source}", 1)[1].split("\n## ", 1)[0]
    assert "4 figures compared, 2 regressed beyond tolerance" in section
    assert "| metric | baseline | measured | change | tolerance | better | passed |" in section
    assert "| training.finalAccuracy | 0.47 | 0.4 | -14.9% | 2% | higher | NO |" in section
    assert "| speedups.kvcache.median | 1.6 | 1.6 | +0.0% | 20% | higher | yes |" in section
    failures = md.split("## Failures", 1)[1].split("\n## ", 1)[0]
    assert "| baseline.no-regression | end-to-end | no | 2 | <= 0 |" in failures


def test_each_failed_tuning_test_gets_its_manifest_change(tmp_path: Path) -> None:
    result = judged(
        0.47, 0.8, {"tests": [{"name": "decode", "metric": "speedups.kvcache.median", "min": 1.2}]}
    )
    assert [s.test for s in result.suggestions] == ["speedup.kvcache", "decode"]
    _, md = write(tmp_path, result)
    recommendations = md.split("## Recommendations (reported, never applied)", 1)[1]
    block = recommendations.split("### speedup.kvcache", 1)[1].split("###", 1)[0]
    # Every repeat lies within 0.8 * (1 -/+ 0.1): a min of 0.72 would have passed them all.
    assert (
        "Measured 0.8x (median of 5, spread 10.0%) against >= 1x; a range that would contain it and every repeat: >= 0.72x."
        in block
    )
    assert "```yaml\nspec:\n  acceptance:\n    tests:\n    - {name: speedup.kvcache, min: 0.72}\n```" in block
    mine = recommendations.split("### decode", 1)[1]
    assert (
        "- {name: decode, metric: speedups.kvcache.median, min: 0.72}" in mine
    )  # the spread of speedups.kvcache: (0.84 - 0.76) / 0.8


@pytest.mark.parametrize(
    ("write_text", "error"),
    [
        (None, "cannot read {path}: no such file"),
        ("{not json", "{path} is not JSON: Expecting property name enclosed in double quotes at line 1"),
        ("[1, 2]", "{path} is not a report.json (no figures, no tests)"),
    ],
)
def test_an_unreadable_baseline_report_is_an_error_before_the_run_and_a_failed_test_after(
    tmp_path: Path, write_text: str | None, error: str
) -> None:
    path = tmp_path / "report.json"
    if write_text is not None:
        path.write_text(write_text)
    policy = Acceptance.model_validate({"baseline": {"report": str(path)}})
    baseline = report.load_baseline(policy)
    assert baseline is not None and baseline.result is None
    assert baseline.error == error.format(path=path)
    assert report.baseline_problems(policy) == [
        f"spec.acceptance.baseline.report: {str(path)!r}: {baseline.error}"
    ]
    result = judged(0.47, 1.6, {}, baseline)
    (test,) = [t for t in result.tests if t.name == judge.BASELINE_TEST]
    assert not test.passed and test.reason == f"baseline report: {path}: {baseline.error}"


def test_a_baseline_run_is_read_from_what_the_operator_mounts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = Acceptance.model_validate({"baseline": {"run": "earlier"}})
    monkeypatch.delenv(report.BASELINE_ENV, raising=False)
    (line,) = report.baseline_problems(policy)
    assert line.startswith("spec.acceptance.baseline.run: 'earlier': baseline.run names an OptimizationRun")
    mounted = tmp_path / "baseline" / "result.json"
    monkeypatch.setenv(report.BASELINE_ENV, str(mounted))
    assert report.baseline_problems(policy) == []  # in the pod: a missing result fails the test instead
    missing = report.load_baseline(policy)
    assert missing is not None
    assert (
        missing.error == "earlier has no stored result: it has not succeeded, or is no run of this namespace"
    )
    mounted.parent.mkdir()
    mounted.write_text(judged(0.47, 1.6, {}).compact())
    found = report.load_baseline(policy)
    assert found is not None and found.source == "run: earlier" and found.result is not None
    assert found.result["figures"]["training.finalAccuracy"] == 0.47


def test_the_judge_s_exceptions_name_registered_tests() -> None:
    from optrun.judge.baseline import NOT_COMPARED, TIMED_TESTS
    from optrun.runtime.acceptance import SUITE
    from optrun.runtime.orchestrator import load_suite

    load_suite()
    assert {*TIMED_TESTS, *NOT_COMPARED} <= set(SUITE.names())
