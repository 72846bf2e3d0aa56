"""`optrun run` as a user runs it: a subprocess, its exit code, its output directory.

- SIGTERM: once training has started, the run checkpoints and exits 143 within a bounded time;
  the same command again resumes from that checkpoint and finishes.
- End to end (slow): the quickstart and the fault-injection example end with an exit code that
  matches the decision in report.json, which holds every field of the result contract.

The SIGTERM children run torch on one thread (OMP_NUM_THREADS=1): the tiny model gains nothing
from a second thread, and on a busy 2-core machine two spinning OpenMP threads make a step many
times slower. The examples run as a user runs them, on torch's default threads: pytest only waits
for them, and the quickstart's larger model takes a third less time on two (112 -> 75 s).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from optrun.api.result import Result

ROOT = Path(__file__).resolve().parents[3]
EXIT_FOR = {"GO": 0, "CONDITIONAL_GO": 3, "NO_GO": 4}

SMALL = """\
apiVersion: optrun.io/v1alpha1
kind: OptimizationRun
metadata: {name: sigterm}
spec:
  workload: {model: tiny-lm, sequenceLength: 16, batchSize: 4}
  optimizations: {kernels: {enabled: false}}
  training:
    epochs: 1
    stepsPerEpoch: 150
    warmupSteps: 5
    evalBatches: 1
    checkpoint: {everySteps: 1000, keep: 2}   # only step 0 and what SIGTERM writes
"""


def child_env(*, one_thread: bool = True) -> dict[str, str]:
    # COLUMNS: the summary table of a child without a terminal is 80 wide and cuts test names.
    env = {**os.environ, "OPTRUN_TERM_GRACE": "60", "COLUMNS": "200"}
    if one_thread:
        env["OMP_NUM_THREADS"] = "1"
    else:
        env.pop("OMP_NUM_THREADS", None)
    return env


def optrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "optrun.cli", *args]


def events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    # The last line may be half-written while the child is still appending to it.
    return [json.loads(line) for line in lines if line.endswith("}")]


def wait_for_event(proc: subprocess.Popen[bytes], jsonl: Path, event: str, timeout: float, log: Path) -> None:
    """Bounded polling (every 0.1 s) for `event` in the child's JSONL log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(e["event"] == event for e in events(jsonl)):
            return
        try:
            proc.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            continue
        pytest.fail(
            f"optrun exited with {proc.returncode} before a {event!r} event:\n{log.read_text()[-3000:]}"
        )
    proc.kill()
    pytest.fail(f"no {event!r} event in {jsonl} within {timeout:.0f}s")


def test_sigterm_checkpoints_and_exits_143_and_the_rerun_resumes(tmp_path: Path) -> None:
    manifest = tmp_path / "sigterm.yaml"
    manifest.write_text(SMALL)
    out = tmp_path / "out"
    command = optrun("run", str(manifest), "--output", str(out), "--quiet")
    log = tmp_path / "stderr.log"
    # Output goes to a file, not a pipe: a pipe nobody reads while polling could fill and block the child.
    with log.open("wb") as stderr:
        proc = subprocess.Popen(command, env=child_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            wait_for_event(proc, out / "metrics.jsonl", "step", timeout=180, log=log)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 143, log.read_text()[-3000:]
    assert "Run the same command again to resume" in log.read_text()
    stopped = [e for e in events(out / "metrics.jsonl") if e["event"] == "checkpoint"][-1]["step"]
    assert 0 < stopped < 150
    assert (
        out / "checkpoints" / f"step-{stopped:09d}" / "meta.pt"
    ).exists()  # complete: meta.pt is written last
    assert not (out / "report.json").exists()

    again = subprocess.run(command, env=child_env(), cwd=ROOT, text=True, capture_output=True, timeout=300)
    assert again.returncode in EXIT_FOR.values(), again.stderr[-3000:]
    resumes = [e for e in events(out / "metrics.jsonl") if e["event"] == "resume"]
    assert [e["step"] for e in resumes] == [stopped]
    report = Result.model_validate_json((out / "report.json").read_text())
    assert again.returncode == EXIT_FOR[report.decision.value]
    assert report.training.steps == 150


# -- end to end -------------------------------------------------------------------------------------

CONTRACT = {
    "decision": None,
    "score": None,
    "riskLevel": None,
    "acceptance": {"collected", "passed", "failed", "passRate", "target", "minimum"},
    "tests": {"name", "category", "critical", "passed", "measured", "expected", "reason"},
    "safety": {"trips", "recoveries"},
    "speedups": None,
    "training": {"epochs", "finalLoss", "finalAccuracy"},
    "hardware": {"device", "name", "memoryBytes"},
    "recommendations": None,
}


def run_example(
    name: str, out: Path, timeout: float
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    done = subprocess.run(
        optrun("run", str(ROOT / "examples" / name), "--output", str(out), "--quiet"),
        env=child_env(one_thread=False),
        cwd=ROOT,
        text=True,
        capture_output=True,
        timeout=timeout,
    )
    assert (out / "report.json").exists(), f"exit {done.returncode}, no report:\n{done.stderr[-3000:]}"
    return done, json.loads((out / "report.json").read_text())


def assert_contract(doc: dict[str, Any]) -> None:
    missing = [key for key in CONTRACT if key not in doc]
    assert not missing, f"report.json lacks {missing}"
    for key, fields in CONTRACT.items():
        if fields is None:
            continue
        for item in doc[key] if isinstance(doc[key], list) else [doc[key]]:
            assert fields <= item.keys(), f"report.json {key} lacks {sorted(fields - item.keys())}"
    assert doc["decision"] in EXIT_FOR
    assert doc["riskLevel"] in {"low", "medium", "high"}
    assert doc["tests"], "no acceptance test ran"
    for timing in doc["speedups"].values():
        assert {"median", "min", "max", "repeats"} <= timing.keys()
    Result.model_validate(doc)


@pytest.mark.slow
def test_quickstart_ends_with_an_exit_code_that_matches_its_decision(tmp_path: Path) -> None:
    done, doc = run_example("quickstart.yaml", tmp_path / "quickstart", timeout=400)
    assert done.returncode == EXIT_FOR[doc["decision"]], done.stderr[-3000:]
    assert_contract(doc)
    # The summary table and the closing lines of the run.
    assert "Acceptance" in done.stdout
    for test in doc["tests"]:
        assert test["name"] in done.stdout
    assert f"Decision: {doc['decision']}" in done.stdout
    assert "report.md" in done.stdout
    assert "Metrics were served at http://127.0.0.1:" in done.stdout
    assert (
        (tmp_path / "quickstart" / "report.md").read_text().startswith(f"# optrun report: {doc['decision']}")
    )
    assert (tmp_path / "quickstart" / "training.png").exists()
    assert doc["acceptance"]["collected"] == len(doc["tests"])


@pytest.mark.slow
def test_fault_injection_example_recovers_and_still_reaches_a_decision(tmp_path: Path) -> None:
    done, doc = run_example("fault-injection.yaml", tmp_path / "faults", timeout=300)
    assert done.returncode == EXIT_FOR[doc["decision"]], done.stderr[-3000:]
    assert_contract(doc)
    assert doc["safety"]["trips"].get("nan_loss", 0) >= 1
    assert doc["safety"]["recoveries"] >= 1
    rollbacks = [e for e in doc["safety"]["events"] if e.get("gate") == "nan_loss"]
    assert rollbacks and rollbacks[0]["action"] == "rollback"
    gates = {t["name"]: t for t in doc["tests"]}
    assert gates["safety.run-gates"]["passed"], gates["safety.run-gates"]["reason"]
    assert gates["e2e.training-completed"]["passed"]
    assert "recoveries 1" in done.stdout
