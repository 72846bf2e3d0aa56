"""The acceptance policy through `optrun run` and `optrun validate`, as a user meets it.

- validate: an unknown metric path, an override of a test that does not exist and a baseline
  file that is not there are errors (exit 2) that list what is allowed, before anything runs;
- end to end (slow, two short runs of the tiny model, compression on, kv cache and RLVR off):
  the first run, objective speed, is the second's baseline; the second, objective memory and
  fewer steps, has a critical test of the user's that it does not meet and a regression: it is
  NO_GO naming the test, report.json has the `baseline` key, report.md the comparison table.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest

from optrun.api.result import Result
from tests.unit.cli.test_cli_run import EXIT_FOR, ROOT, child_env, optrun

MANIFEST = """\
apiVersion: optrun.io/v1alpha1
kind: OptimizationRun
metadata: {{name: {name}}}
spec:
  workload: {{model: tiny-lm, sequenceLength: 32, batchSize: 8}}
  optimizations:
    kernels: {{enabled: false}}
    compression: {{enabled: true, codec: int8, target: weights}}
    kvCache: {{enabled: false}}
  training:
    epochs: 1
    stepsPerEpoch: {steps}
    warmupSteps: 5
    learningRate: 3.0e-3
    evalBatches: 2
    targetAccuracy: 0.2
    checkpoint: {{everySteps: 1000}}
  rlvr: {{enabled: false}}
  acceptance:
    repeats: 3
{acceptance}
"""


def manifest(tmp_path: Path, name: str, steps: int, acceptance: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(MANIFEST.format(name=name, steps=steps, acceptance=textwrap.indent(acceptance, "    ")))
    return path


def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        optrun(*args), env=child_env(), cwd=ROOT, text=True, capture_output=True, timeout=timeout
    )


def test_validate_lists_the_metric_paths_the_test_names_and_refuses_a_missing_baseline(
    tmp_path: Path,
) -> None:
    bad = manifest(
        tmp_path,
        "bad",
        10,
        "tests:\n"
        "  - {name: acc, metric: training.finalAcc, min: 0.4}\n"
        "  - {name: e2e.target-acuracy, critical: false}\n"
        f"baseline: {{report: {tmp_path / 'missing.json'}}}\n",
    )
    done = run("validate", str(bad), timeout=120)
    assert done.returncode == 2, done.stderr
    assert (
        "error: spec.acceptance.tests.0.metric: 'training.finalAcc' is not valid: training.finalAcc is not in "
        "report.json; allowed: training.{epochs,steps,finalLoss,finalAccuracy,tokensPerSecond}, "
        "speedups.{kernels,compression,kernels+compression,kvcache,all}.{median,min,max,repeats}"
    ) in done.stderr
    # The registry's names need the runtime: a manifest that passes the schema is checked next.
    fixed = manifest(
        tmp_path,
        "fixed",
        10,
        "tests:\n"
        "  - {name: acc, metric: training.finalAccuracy, min: 0.4}\n"
        "  - {name: e2e.target-acuracy, critical: false}\n"
        f"baseline: {{report: {tmp_path / 'missing.json'}}}\n",
    )
    done = run("validate", str(fixed), timeout=120)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 2, done.stderr
    assert lines[0].startswith(
        "error: spec.acceptance.tests.1.name: 'e2e.target-acuracy' is no built-in test; allowed: "
    )
    assert "e2e.target-accuracy" in lines[0] and "baseline.no-regression" in lines[0]
    assert lines[1] == (
        f"error: spec.acceptance.baseline.report: '{tmp_path / 'missing.json'}': "
        f"cannot read {tmp_path / 'missing.json'}: no such file"
    )
    # `optrun run` refuses it the same way, before anything runs.
    done = run("run", str(fixed), "--output", str(tmp_path / "out"), "--quiet", timeout=120)
    assert done.returncode == 2 and "nothing was run" in done.stderr
    assert not (tmp_path / "out").exists()


def report(out: Path) -> tuple[dict[str, Any], str]:
    return json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


@pytest.mark.slow
def test_user_tests_objective_and_a_baseline_end_to_end(tmp_path: Path) -> None:
    first_out = tmp_path / "first"
    first = run(
        "run",
        str(manifest(tmp_path, "first", 40, "objective: speed\n")),
        "--output",
        str(first_out),
        "--quiet",
    )
    doc, _ = report(first_out)
    assert first.returncode == EXIT_FOR[doc["decision"]], first.stderr[-3000:]
    tests = {t["name"]: t for t in doc["tests"]}
    # speed: the compression floor is 1.0 (int8 weights decode slower on a CPU), no memory test.
    assert tests["speedup.compression"]["expected"]["min"] == 1.0
    assert "objective speed" in tests["speedup.compression"]["reason"]
    assert "memory.weights" not in tests
    assert doc["figures"]["training.finalAccuracy"] == pytest.approx(
        doc["training"]["finalAccuracy"], rel=1e-5
    )

    second_out = tmp_path / "second"
    acceptance = (
        "objective: memory\n"
        "tests:\n"
        "  - {name: my-accuracy, metric: training.finalAccuracy, min: 0.99, critical: true}\n"
        "  - {name: decode-speed, metric: speedups.compression.median, min: 100, category: tuning}\n"
        "  - {name: e2e.target-accuracy, critical: false}\n"
        f"baseline: {{report: {first_out / 'report.json'}}}\n"
    )
    # Fewer steps: the same seed trains a worse model, a regression the baseline must catch.
    second = run(
        "run", str(manifest(tmp_path, "second", 8, acceptance)), "--output", str(second_out), "--quiet"
    )
    doc, md = report(second_out)
    assert second.returncode == EXIT_FOR["NO_GO"], second.stderr[-3000:]
    Result.model_validate(doc)
    assert doc["decision"] == "NO_GO"
    assert doc["decisionReason"].startswith("NO_GO: 1 critical test(s) failed: my-accuracy")
    tests = {t["name"]: t for t in doc["tests"]}
    mine = tests["my-accuracy"]
    assert (mine["origin"], mine["critical"], mine["passed"]) == ("user", True, False)
    assert mine["measured"] == pytest.approx(doc["training"]["finalAccuracy"])
    speed = tests["decode-speed"]
    assert speed["repeats"] == doc["speedups"]["compression"]["repeats"] and not speed["passed"]
    assert tests["e2e.target-accuracy"]["overridden"] and not tests["e2e.target-accuracy"]["critical"]
    # memory: the compression floor is relaxed and the weight memory is what is tested.
    assert tests["speedup.compression"]["expected"]["min"] == 0.2
    assert tests["memory.weights"]["passed"], tests["memory.weights"]["reason"]
    assert tests["memory.weights"]["measured"] > 2.0

    baseline = doc["baseline"]
    assert baseline["source"] == f"report: {first_out / 'report.json'}" and not baseline["error"]
    rows = {c["metric"]: c for c in baseline["comparisons"]}
    accuracy = rows["training.finalAccuracy"]
    assert accuracy["measured"] < accuracy["baseline"] and not accuracy["passed"]
    assert tests["baseline.no-regression"]["passed"] is False
    assert "training.finalAccuracy" in tests["baseline.no-regression"]["reason"]
    assert f"## Baseline: report: {first_out / 'report.json'}" in md
    assert "| metric | baseline | measured | change | tolerance | better | passed |" in md
    assert "## Your tests (spec.acceptance.tests)" in md and "| my-accuracy | your own | yes | NO |" in md
    # The failed tuning test of the user's gets its own entry back with a bound it would meet.
    (suggestion,) = [s for s in doc["suggestions"] if s["test"] == "decode-speed"]
    assert "metric: speedups.compression.median" in suggestion["manifest"]
    assert suggestion["suggested"]["min"] <= speed["measured"]
    assert "```yaml" in md.split("### decode-speed", 1)[1]
