"""Reading the runtime's /metrics: the names the runtime really exports, over real HTTP."""

from __future__ import annotations

import socket
import time

import pytest
from prometheus_client import generate_latest

from optrun.operator import scrape
from optrun.runtime.metrics import Metrics


def runtime_metrics() -> Metrics:
    """The runtime's own metrics object, in the state of a run at step 42 of epoch 1."""
    m = Metrics()
    m.set_stage("train")
    m.train_step(epoch=1, step=42, loss=2.5, lr=1e-3, seconds=0.5, tokens=1000)
    m.gate_trip("nan_loss", step=40, action="rollback")
    m.recovery(step=40, action="rollback")
    return m


def test_parse_reads_the_runtimes_progress_metrics() -> None:
    sample = scrape.parse(generate_latest(runtime_metrics().registry).decode())
    assert sample.stage == "train"
    assert (sample.epoch, sample.step, sample.loss) == (1, 42, 2.5)
    assert sample.tokens_per_second == pytest.approx(2000.0)
    assert sample.recoveries == 1
    assert sample.trips == {"nan_loss": 1}
    assert sample.progress_timestamp == pytest.approx(time.time(), abs=60)
    progress = sample.progress()
    assert (progress.stage, progress.step, progress.epoch) == ("train", 42, 1)
    assert progress.updated_at is not None and progress.updated_at.endswith("Z")


def test_a_non_finite_loss_is_reported_as_unknown_not_as_a_number() -> None:
    m = runtime_metrics()
    m.loss.set(float("nan"))
    assert scrape.parse(generate_latest(m.registry).decode()).loss is None


def test_metrics_the_runtime_has_not_set_yet_stay_unknown() -> None:
    sample = scrape.parse(generate_latest(Metrics().registry).decode())
    assert sample.stage == "starting"
    assert sample.recoveries == 0 and sample.trips == {}


def test_text_that_is_not_prometheus_is_a_scrape_error() -> None:
    with pytest.raises(scrape.ScrapeError, match="not Prometheus text"):
        scrape.parse("<html>502 Bad Gateway</html>\n{oops")


def test_scrape_reads_a_live_runtime_endpoint() -> None:
    m = runtime_metrics()
    port = m.serve(0, addr="127.0.0.1")
    try:
        sample = scrape.scrape("127.0.0.1", port, timeout=2)
    finally:
        m.close()
    assert (sample.stage, sample.step) == ("train", 42)


def test_an_endpoint_nobody_listens_on_is_a_scrape_error_naming_the_url() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(scrape.ScrapeError, match=f"127.0.0.1:{port}/metrics"):
        scrape.fetch("127.0.0.1", port, timeout=1)
