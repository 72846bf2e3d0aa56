"""What `optrun run` shows a person: the summary table with every test, the decision line, the
report paths and the metrics address; progress bars that follow the stages."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from rich.console import Console

from optrun import judge
from optrun.api.result import Category, Expected, SafetySummary, TestResult, Timing
from optrun.api.v1alpha1 import OptimizationRunSpec
from optrun.runtime.metrics import Metrics
from optrun.runtime.training.checkpoint import CheckpointStore
from optrun.runtime.training.loop import Trainer
from optrun.ui import ConsoleObserver, summary
from tests.unit.runtime.runtime_support import pydoc_corpus, seeded_model, small_spec

SPEC = OptimizationRunSpec.model_validate({"workload": {"model": "tiny-lm"}})


def console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=200, color_system=None), buffer


def test_summary_lists_every_test_and_ends_with_the_decision(tmp_path: Path) -> None:
    tests = [
        TestResult(
            name="infra.hardware-detected",
            category=Category.CRITICAL_INFRASTRUCTURE,
            critical=True,
            passed=True,
            measured="cpu: test",
        ),
        TestResult(
            name="speedup.kernels",
            category=Category.TUNING,
            passed=False,
            measured=0.71,
            expected=Expected(min=0.8, max=2.0),
        ),
    ]
    result = judge.build_result(
        tests,
        SPEC.acceptance,
        safety=SafetySummary(trips={"nan_loss": 1}, recoveries=1),
        speedups={"kernels": Timing(median=0.71, min=0.7, max=0.73, repeats=5)},
    )
    c, buffer = console()
    summary(result, tmp_path, "http://127.0.0.1:9999/metrics", console=c)
    text = buffer.getvalue()
    assert "infra.hardware-detected" in text and "speedup.kernels" in text
    assert "FAIL" in text and "pass" in text
    assert "0.8..2" in text
    assert "0.71x" in text  # the speedups table
    assert "trips {'nan_loss': 1}, recoveries 1" in text
    assert f"Decision: {result.decision.value}" in text
    assert "pass rate 50.0% (1/2)" in text
    assert f"Report: {tmp_path / 'report.md'} and {tmp_path / 'report.json'}" in text
    assert "http://127.0.0.1:9999/metrics" in text
    for line in result.recommendations:
        assert line.split(":")[0] in text


def test_progress_follows_stages_training_steps_and_tests(tmp_path: Path) -> None:
    spec = small_spec(training={"epochs": 1})
    c, buffer = console()
    observer = ConsoleObserver(spec, console=c)
    with observer:
        observer.serving("http://127.0.0.1:1234/metrics")
        observer.stage("train")
        trainer = Trainer(
            spec,
            seeded_model(spec),
            pydoc_corpus(),
            torch.device("cpu"),
            CheckpointStore(tmp_path, keep=1),
            Metrics(),
            on_step=observer.step,
        )
        trainer.fit()
        task = observer.progress.tasks[observer.tasks["train"]]
        assert (task.total, task.completed) == (6, 6)
        assert f"epoch 1/1 loss {trainer.losses[-1][1]:.3f}" in task.fields["info"]
        observer.stage_done("train", 1.0)
        assert task.finished
        observer.stage("acceptance")
        observer.test(TestResult(name="e2e.x", category=Category.END_TO_END, passed=False))
        acceptance = observer.progress.tasks[observer.tasks["acceptance"]]
        assert acceptance.completed == 1
        assert acceptance.fields["info"] == "e2e.x: FAIL"
    assert observer.metrics_address == "http://127.0.0.1:1234/metrics"
    assert "Metrics: http://127.0.0.1:1234/metrics" in buffer.getvalue()
