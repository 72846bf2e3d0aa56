"""Every Prometheus metric the operator exports, defined in one place (prefix `optrun_operator_`).

Served on the operator's own port (`--metrics-port`, 8000 by default), apart from kopf's
liveness endpoint. Labels are bounded: phase, decision, reason, gate, trigger, verb, resource and
HTTP status code; never a run's name or a pod's uid (one series per run would grow without end).

`runs{phase}` is computed at scrape time from the operator's view of the runs (a collector over
a callable), so it is exact after a restart instead of drifting like an up/down counter.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)

PHASES = ("None", "Pending", "Running", "Recovering", "Succeeded", "Failed", "Suspended")

DECISIONS = Counter(
    "optrun_operator_decisions_total",
    "Runs judged, by decision (GO, CONDITIONAL_GO, NO_GO).",
    ["decision"],
    registry=REGISTRY,
)
ATTEMPTS = Counter(
    "optrun_operator_attempts_total",
    "Runtime pods started (attempts), first ones and retries.",
    registry=REGISTRY,
)
ATTEMPT_FAILURES = Counter(
    "optrun_operator_attempt_failures_total",
    "Attempts that failed, by reason (OOMKilled, Evicted, PodDeleted, RuntimeError, HangDetected, ...).",
    ["reason"],
    registry=REGISTRY,
)
ATTEMPT_DISRUPTIONS = Counter(
    "optrun_operator_attempt_disruptions_total",
    "Attempts ended by a disruption (Evicted, Preempted, NodeShutdown, NodeLost, ...), not counted as failures.",
    ["reason"],
    registry=REGISTRY,
)
RUN_FAILURES = Counter(
    "optrun_operator_run_failures_total",
    "Runs that reached phase Failed, by reason.",
    ["reason"],
    registry=REGISTRY,
)
GATE_ENFORCEMENTS = Counter(
    "optrun_operator_gate_enforcements_total",
    "Attempts the operator ended on a live gate, by gate (hang, recovery_budget, deadline).",
    ["gate"],
    registry=REGISTRY,
)
RECONCILE_SECONDS = Histogram(
    "optrun_operator_reconcile_duration_seconds",
    "Wall time of one reconcile (observe, decide, apply), by what triggered it.",
    ["trigger"],
    registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
API_REQUESTS = Counter(
    "optrun_operator_api_requests_total",
    "Requests the reconcile made to the API server (kopf's own watches and patches not included).",
    ["verb", "resource"],
    registry=REGISTRY,
)
API_ERRORS = Counter(
    "optrun_operator_api_errors_total",
    "API requests that failed, by HTTP status code (0: no answer).",
    ["code"],
    registry=REGISTRY,
)
SCRAPE_ERRORS = Counter(
    "optrun_operator_scrape_errors_total",
    "Failed scrapes of a runtime pod's /metrics.",
    registry=REGISTRY,
)


class RunsByPhase(Collector):
    """`optrun_operator_runs{phase}`: the runs the operator knows, counted at scrape time."""

    def __init__(self, phases: Callable[[], Iterable[str | None]]) -> None:
        self._phases = phases

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("optrun_operator_runs", "OptimizationRuns by phase.", labels=["phase"])
        counts = Tally(str(p) if p else "None" for p in self._phases())
        for phase in PHASES:
            family.add_metric([phase], counts.get(phase, 0))
        yield family


_runs_collector: RunsByPhase | None = None


def watch_runs(phases: Callable[[], Iterable[str | None]]) -> None:
    """Register (or replace) the source of `optrun_operator_runs`."""
    global _runs_collector
    if _runs_collector is not None:
        REGISTRY.unregister(_runs_collector)
    _runs_collector = RunsByPhase(phases)
    REGISTRY.register(_runs_collector)


def serve(port: int) -> int:
    """Serve /metrics on `port` (0 picks a free one) in a daemon thread; returns the port."""
    server, _thread = start_http_server(port, registry=REGISTRY)
    return int(server.server_address[1])
