"""The acceptance policy's own parts: the user's tests and overrides (acceptance.tests), metric
paths into report.json, the objective and the baseline; each bad entry is one field-named line
that says what is allowed."""

from __future__ import annotations

from typing import Any

import pytest

from optrun.api.errors import ManifestError
from optrun.api.paths import MetricPathError, available_paths, check_path, resolve
from optrun.api.v1alpha1 import parse_manifest


def manifest(**acceptance: Any) -> dict[str, Any]:
    return {
        "apiVersion": "optrun.io/v1alpha1",
        "kind": "OptimizationRun",
        "metadata": {"name": "policy"},
        "spec": {"workload": {"model": "tiny-lm"}, "acceptance": acceptance},
    }


def problems(**acceptance: Any) -> list[str]:
    with pytest.raises(ManifestError) as err:
        parse_manifest(manifest(**acceptance))
    return err.value.problems


def test_the_issue_s_tests_validate_with_their_defaults() -> None:
    spec = parse_manifest(
        manifest(
            tests=[
                {"name": "my-accuracy", "metric": "training.finalAccuracy", "min": 0.42, "critical": True},
                {"name": "decode-speed", "metric": "speedups.all.median", "min": 1.5, "category": "tuning"},
                {"name": "e2e.target-accuracy", "critical": False},
            ]
        )
    )
    mine, speed, override = spec.acceptance.tests
    assert (mine.is_override, mine.critical, mine.category) == (False, True, None)
    assert (speed.metric, speed.min, speed.category) == ("speedups.all.median", 1.5, "tuning")
    assert (override.is_override, override.critical, override.metric) == (True, False, None)
    assert spec.acceptance.objective == "speed"  # the run must say that memory is its goal
    assert spec.acceptance.baseline is None


@pytest.mark.parametrize(
    ("entry", "line"),
    [
        (
            {"name": "acc", "metric": "training.finalAcc", "min": 0.4},
            "spec.acceptance.tests.0.metric: 'training.finalAcc' is not valid: training.finalAcc is not in "
            "report.json; allowed: training.{epochs,steps,finalLoss,finalAccuracy,tokensPerSecond}, "
            "speedups.{kernels,compression,kernels+compression,kvcache,all}.{median,min,max,repeats}",
        ),
        (
            {"name": "s", "metric": "speedups.fast.median", "min": 1.0},
            "spec.acceptance.tests.0.metric: 'speedups.fast.median' is not valid: fast is not a key of "
            "speedups; allowed: kernels, compression, kernels+compression, kvcache, all",
        ),
        (
            {"name": "s", "metric": "score", "min": 0.9},
            "spec.acceptance.tests.0.metric: 'score' is not valid: score is not a measured section "
            "(part of the verdict, not a measurement); allowed: training.",
        ),
        (
            {"name": "s", "metric": "training", "min": 0.9},
            "spec.acceptance.tests.0.metric: 'training' is not valid: names a section, not a number",
        ),
        (
            {"name": "s", "metric": "training..steps", "min": 1},
            "spec.acceptance.tests.0.metric: 'training..steps' has the wrong form",
        ),
        (
            {"name": "acc", "min": 0.4},
            "spec.acceptance.tests.0: {'name': 'acc', 'min': 0.4} is not valid: metric is required for your "
            "own test 'acc' (a name without a dot); to override a built-in test, use its name (area.test)",
        ),
        (
            {"name": "acc", "metric": "training.steps"},
            "needs min or max (a test that cannot fail tests nothing)",
        ),
        (
            {"name": "e2e.target-accuracy", "metric": "training.steps", "min": 1},
            "'e2e.target-accuracy' names a built-in test (a name with a dot), whose metric is its own",
        ),
        (
            {"name": "e2e.target-accuracy", "category": "tuning"},
            "category of the built-in test 'e2e.target-accuracy' is fixed; allowed: min, max, critical",
        ),
        ({"name": "e2e.target-accuracy"}, "the override of 'e2e.target-accuracy' changes nothing"),
        ({"name": "a", "metric": "training.steps", "min": 2, "max": 1}, "min must not exceed max"),
        (
            {"name": "My Test", "metric": "training.steps", "min": 1},
            "spec.acceptance.tests.0.name: 'My Test' has the wrong form",
        ),
        (
            {"name": "a", "metric": "training.steps", "min": 1, "category": "fun"},
            "spec.acceptance.tests.0.category: 'fun' is not allowed; allowed: critical-infrastructure, safety, "
            "end-to-end, stability, tuning",
        ),
    ],
)
def test_a_bad_test_entry_is_one_line_naming_the_field_and_what_is_allowed(
    entry: dict[str, Any], line: str
) -> None:
    found = problems(tests=[entry])
    assert len(found) == 1, found
    assert line in found[0], found[0]


def test_test_names_are_unique() -> None:
    entry = {"name": "a", "metric": "training.steps", "min": 1}
    (line,) = problems(tests=[entry, dict(entry)])
    assert line.startswith("spec.acceptance.tests:") and "test names must be unique; repeated: a" in line


def test_paths_into_details_and_open_keys_are_left_to_the_run() -> None:
    check_path("details.kvcache.capacity.int8.bytes_per_token")
    check_path("safety.trips.nan_loss")
    check_path("hardware.memoryBytes")
    with pytest.raises(MetricPathError, match=r"hardware\.name has no fields below it"):
        check_path("hardware.name.x")
    with pytest.raises(MetricPathError, match="names a section, not a number"):
        check_path("hardware.name")  # a string, not a number
    assert "details.<any path>" in available_paths()


def test_resolve_reads_a_number_and_lists_what_is_there_when_it_is_not() -> None:
    doc = {
        "training": {"finalAccuracy": 0.5, "epochs": 3},
        "details": {"rows": [{"tps": 10.0}], "flag": True},
    }
    assert resolve(doc, "training.finalAccuracy") == 0.5
    assert resolve(doc, "details.rows.0.tps") == 10.0
    with pytest.raises(
        MetricPathError, match=r"numbers under training: training.finalAccuracy, training.epochs"
    ):
        resolve(doc, "training.finalLoss")
    with pytest.raises(MetricPathError, match="has 1 entries, no index 3"):
        resolve(doc, "details.rows.3.tps")
    with pytest.raises(MetricPathError, match="is bool True, not a number"):
        resolve(doc, "details.flag")
    with pytest.raises(
        MetricPathError, match=r"is a mapping, not a number; numbers under it: details\.rows\.0\.tps"
    ):
        resolve(doc, "details")
    with pytest.raises(MetricPathError, match="is inf, not a finite number"):
        resolve({"training": {"finalLoss": float("inf")}}, "training.finalLoss")


@pytest.mark.parametrize(
    ("acceptance", "line"),
    [
        (
            {"objective": "cost"},
            "spec.acceptance.objective: 'cost' is not allowed; allowed: speed, memory, both",
        ),
        (
            {"memory": {"kv": {"min": 2}}},
            "spec.acceptance.memory: {'kv': {'min': 2}} is not valid: unknown memory key(s) kv; allowed: kvcache, weights",
        ),
        (
            {"baseline": {}},
            "spec.acceptance.baseline: {} is not valid: set exactly one of report (a report.json path) or run "
            "(an OptimizationRun name)",
        ),
        ({"baseline": {"report": "a.json", "run": "earlier"}}, "set exactly one of report"),
        (
            {"baseline": {"run": "Earlier_Run"}},
            "spec.acceptance.baseline.run: 'Earlier_Run' has the wrong form",
        ),
        (
            {"baseline": {"report": "a.json", "tolerances": {"speedups": -0.1}}},
            "spec.acceptance.baseline.tolerances.speedups: -0.1 is out of range; allowed: >= 0.0",
        ),
        (
            {"baseline": {"report": "a.json", "where": 1}},
            "spec.acceptance.baseline.where: unknown field; allowed: report, run, tolerances",
        ),
    ],
)
def test_objective_memory_and_baseline_are_checked(acceptance: dict[str, Any], line: str) -> None:
    found = problems(**acceptance)
    assert len(found) == 1, found
    assert line in found[0], found[0]


def test_a_baseline_takes_a_report_or_a_run_and_tolerances_by_path() -> None:
    spec = parse_manifest(
        manifest(objective="both", baseline={"run": "earlier", "tolerances": {"speedups": 0.3}})
    )
    assert spec.acceptance.objective == "both"
    assert spec.acceptance.baseline is not None
    assert (spec.acceptance.baseline.run, spec.acceptance.baseline.tolerances) == (
        "earlier",
        {"speedups": 0.3},
    )
