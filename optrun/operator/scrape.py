"""The live channel: the operator scrapes each running runtime pod's /metrics.

Why scrape rather than have the runtime push to the operator:
- The runtime already serves Prometheus metrics for Grafana; scraping reads the same numbers,
  so status.progress and the dashboards never disagree, and there is no second protocol.
- The runtime pod needs no credentials, no API access and no address of the operator: it runs
  with `automountServiceAccountToken: false` and a push channel would need all three.
- It survives operator restarts and failovers: nothing is lost while no operator listens, the
  next active replica simply scrapes again. A push to a dead or standby replica is lost.
- The load is the operator's choice (one request per running pod per interval, bounded by
  `scrapeIntervalSeconds`), not the pods' (a thousand pods pushing every step would be a storm).
The cost: the operator must reach pod IPs on the metrics port (a NetworkPolicy must allow it),
and progress is at most one interval old.

`parse` is pure (text in, `Sample` out); `fetch` is the one HTTP GET.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from optrun.api.v1alpha1 import Progress


class ScrapeError(Exception):
    """The pod's /metrics could not be read or parsed; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """The runtime's progress metrics at one scrape (see optrun/runtime/metrics.py for the names)."""

    stage: str = ""
    epoch: int | None = None
    step: int | None = None
    loss: float | None = None
    tokens_per_second: float | None = None
    recoveries: int = 0
    trips: dict[str, int] = dataclasses.field(default_factory=dict)
    # Unix time of the runtime's last progress (a step or a stage change); None: not exported yet.
    progress_timestamp: float | None = None

    def progress(self) -> Progress:
        """As `status.progress` (updatedAt: when the runtime last made progress)."""
        updated = (
            dt.datetime.fromtimestamp(self.progress_timestamp, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            if self.progress_timestamp
            else None
        )
        return Progress(
            stage=self.stage,
            epoch=self.epoch,
            step=self.step,
            loss=self.loss,
            tokens_per_second=self.tokens_per_second,
            updated_at=updated,
        )


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def parse(text: str) -> Sample:
    """Read the runtime's progress out of Prometheus text exposition format.

    Unknown metrics are ignored; a metric the runtime has not set yet stays None. A non-finite
    loss (the nan-loss gate's very subject) is reported as None rather than as an invalid number."""
    values: dict[str, float] = {}
    stage = ""
    trips: dict[str, int] = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "optrun_stage" and s.value == 1.0:
                    stage = s.labels.get("optrun_stage", "")
                elif s.name == "optrun_gate_trips_total":
                    gate = s.labels.get("gate", "")
                    if gate:
                        trips[gate] = int(s.value)
                elif not s.labels:
                    values[s.name] = s.value
    except ValueError as exc:
        raise ScrapeError(f"not Prometheus text: {exc}") from None
    epoch = values.get("optrun_epoch")
    step = values.get("optrun_step")
    loss = values.get("optrun_loss")
    tps = values.get("optrun_tokens_per_second")
    ts = values.get("optrun_progress_timestamp_seconds")
    return Sample(
        stage=stage,
        epoch=int(epoch) if epoch is not None and math.isfinite(epoch) else None,
        step=int(step) if step is not None and math.isfinite(step) else None,
        loss=_finite(loss) if loss is not None else None,
        tokens_per_second=_finite(tps) if tps is not None else None,
        recoveries=int(values.get("optrun_recoveries_total", 0.0)),
        trips=trips,
        progress_timestamp=ts if ts else None,
    )


def fetch(address: str, port: int, *, timeout: float) -> str:
    """GET http://address:port/metrics; ScrapeError on any failure (the caller keeps going)."""
    host = f"[{address}]" if ":" in address else address
    url = f"http://{host}:{port}/metrics"
    # No proxies: the pod network is reached directly, whatever HTTP_PROXY the operator has.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return str(response.read().decode("utf-8", errors="replace"))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ScrapeError(f"{url}: {exc}") from None


def scrape(address: str, port: int, *, timeout: float) -> Sample:
    return parse(fetch(address, port, timeout=timeout))
