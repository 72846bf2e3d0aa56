"""Metrics: served over HTTP for Prometheus under the names the operator scrapes, the same
figures appended to the JSONL log, and labels that stay bounded however long a run is."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from optrun.runtime.metrics import Metrics

# What the operator scrapes for status.progress and its live gates (metrics.py docstring).
OPERATOR_NAMES = {
    "optrun_progress_timestamp_seconds",
    "optrun_step",
    "optrun_epoch",
    "optrun_loss",
    "optrun_tokens_per_second",
    "optrun_recoveries_total",
    "optrun_stage",
}
# Labels a series may carry: bounded sets only (docs/architecture.md, metrics), plus the histogram's bucket bound.
BOUNDED_LABELS = {"stage", "gate", "optimization", "dtype", "outcome", "target", "phase", "le"}


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Metrics, str]]:
    metrics = Metrics(tmp_path / "metrics.jsonl")
    port = metrics.serve(0, addr="127.0.0.1")
    yield metrics, f"http://127.0.0.1:{port}/metrics"
    metrics.close()


def scrape(url: str) -> dict[str, float]:
    """Every sample of the exposition, keyed `name{label=value,...}`."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}"] = s.value
    return samples


def record_a_step(metrics: Metrics, step: int) -> None:
    metrics.train_step(epoch=1, step=step, loss=2.5 - step / 100, lr=1e-3, seconds=0.02, tokens=1024)


def test_served_metrics_carry_every_name_the_operator_scrapes(served: tuple[Metrics, str]) -> None:
    metrics, url = served
    metrics.set_stage("train")
    record_a_step(metrics, 7)
    metrics.gate_trip("nan_loss", step=7, action="rollback")
    metrics.recovery(step=7, action="rollback")
    samples = scrape(url)
    names = {key.split("{", 1)[0] for key in samples}
    for name in OPERATOR_NAMES:
        assert any(n == name or n.startswith(name + "_") for n in names), f"{name} not served"

    assert samples["optrun_step{}"] == 7
    assert samples["optrun_epoch{}"] == 1
    assert samples["optrun_loss{}"] == pytest.approx(2.43)
    assert samples["optrun_tokens_per_second{}"] == pytest.approx(1024 / 0.02)
    assert samples["optrun_recoveries_total{}"] == 1
    assert samples["optrun_gate_trips_total{gate=nan_loss}"] == 1
    assert samples["optrun_stage{optrun_stage=train}"] == 1
    assert samples["optrun_stage{optrun_stage=detect}"] == 0
    assert samples["optrun_step_duration_seconds_count{}"] == 1
    assert samples["optrun_progress_timestamp_seconds{}"] == pytest.approx(metrics.last_progress)


def test_jsonl_log_records_the_same_figures(served: tuple[Metrics, str], tmp_path: Path) -> None:
    metrics, _ = served
    metrics.set_stage("train")
    record_a_step(metrics, 3)
    metrics.evaluation(epoch=1, step=3, loss=2.0, accuracy=0.4)
    metrics.gate_trip("gradient_exploding", step=4, action="rollback", detail="layers.0: 1e9")
    metrics.recovery(step=4, action="rollback")
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    by_event = {line["event"]: line for line in lines}
    assert [line["event"] for line in lines] == ["stage", "step", "eval", "gate", "recovery"]
    assert by_event["stage"]["stage"] == "train"
    assert by_event["step"]["step"] == 3
    assert by_event["step"]["loss"] == pytest.approx(2.47)
    assert by_event["step"]["tokens_per_second"] == pytest.approx(1024 / 0.02)
    assert by_event["eval"]["accuracy"] == 0.4
    assert by_event["gate"]["gate"] == "gradient_exploding"
    assert by_event["recovery"]["action"] == "rollback"
    assert all(isinstance(line["ts"], float) for line in lines)


def test_labels_stay_bounded_as_steps_go_by(served: tuple[Metrics, str]) -> None:
    metrics, url = served
    metrics.set_stage("train")
    record_a_step(metrics, 1)
    metrics.gate_trip("nan_loss", step=1, action="rollback")
    before = scrape(url)
    for step in range(2, 60):
        record_a_step(metrics, step)
        metrics.gate_trip("nan_loss", step=step, action="rollback")
    after = scrape(url)
    # Fifty more steps change values, never the set of series.
    assert after.keys() == before.keys()
    assert after["optrun_gate_trips_total{gate=nan_loss}"] == 59
    for key in after:
        name, labels = key.split("{", 1)
        if name.endswith("_info") or name == "optrun_stage":
            continue  # _info carries metadata; the stage Enum's label is its own name
        for pair in filter(None, labels.rstrip("}").split(",")):
            assert pair.split("=", 1)[0] in BOUNDED_LABELS, f"{key}: unbounded label"


def test_each_run_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.recovery(step=1, action="skip")
    assert a.registry.get_sample_value("optrun_recoveries_total") == 1
    assert b.registry.get_sample_value("optrun_recoveries_total") == 0


def test_metrics_without_a_log_file_still_count() -> None:
    metrics = Metrics()
    record_a_step(metrics, 5)
    assert metrics.last_step == 5
    assert metrics.registry.get_sample_value("optrun_step") == 5
