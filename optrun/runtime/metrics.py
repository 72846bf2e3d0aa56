"""Every Prometheus metric the runtime exports, defined in one place.

Names follow the Prometheus conventions: prefix `optrun_`, base units with plural suffixes,
`_total` on counters, `_ratio` for 0..1, metadata as `_info`. Labels are bounded (stage, gate,
optimization, dtype, outcome): never a step number or a pod UID. Each run gets its own
registry, so two runs in one process (tests) never share counters. Every update is also
appended to a JSONL log beside the report, so a run without Prometheus keeps the same figures.

The operator scrapes `optrun_progress_timestamp_seconds`, `optrun_step`, `optrun_epoch`,
`optrun_loss`, `optrun_tokens_per_second`, `optrun_recoveries_total` and `optrun_stage` from the
pod for `status.progress` and its live gates; keep those names stable.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, Info, start_http_server

# The runtime's stages in lineage order (the orchestrator runs them in this order).
PIPELINE = (
    "detect",
    "baseline",
    "kernels",
    "train",
    "rlvr",
    "compression",
    "kvcache",
    "speedups",
    "artifact",
    "acceptance",
    "report",
)
STAGES = ["starting", *PIPELINE, "done"]


class Metrics:
    def __init__(self, jsonl: Path | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.run_info = Info("optrun_run", "The run: name, model, device.", registry=r)
        self.stage = Enum("optrun_stage", "Current runtime stage.", states=STAGES, registry=r)
        self.epoch = Gauge("optrun_epoch", "Current training epoch (0-based).", registry=r)
        self.step = Gauge("optrun_step", "Global optimizer step.", registry=r)
        self.loss = Gauge("optrun_loss", "Latest training loss (nats per token).", registry=r)
        self.eval_loss = Gauge("optrun_eval_loss", "Held-out loss at the last evaluation.", registry=r)
        self.accuracy = Gauge("optrun_accuracy_ratio", "Held-out next-token accuracy, 0..1.", registry=r)
        self.learning_rate = Gauge("optrun_learning_rate", "Current learning rate.", registry=r)
        self.tokens_per_second = Gauge("optrun_tokens_per_second", "Training throughput.", registry=r)
        self.step_seconds = Histogram(
            "optrun_step_duration_seconds",
            "Wall time of one optimizer step.",
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.progress_ts = Gauge(
            "optrun_progress_timestamp_seconds",
            "Unix time of the last progress (a step or a stage change).",
            registry=r,
        )
        self.gate_trips = Counter("optrun_gate_trips_total", "Safety gate trips.", ["gate"], registry=r)
        self.recoveries = Counter(
            "optrun_recoveries_total",
            "Recoveries performed (rollback to a checkpoint, skipped batch).",
            registry=r,
        )
        self.oom_backoffs = Counter(
            "optrun_oom_backoffs_total",
            "Out-of-memory back-offs (the micro-batch halved); no recovery.",
            registry=r,
        )
        self.stage_seconds = Gauge(
            "optrun_stage_duration_seconds", "Wall time of each finished stage.", ["stage"], registry=r
        )
        self.speedup = Gauge(
            "optrun_speedup_ratio", "Median speedup over the baseline.", ["optimization"], registry=r
        )
        self.kernel_choice = Info("optrun_kernel", "Kernel chosen per operation.", registry=r)
        self.kv_bytes_per_token = Gauge(
            "optrun_kvcache_bytes_per_token", "KV-cache bytes per token.", ["dtype"], registry=r
        )
        self.kv_max_batch = Gauge(
            "optrun_kvcache_max_batch", "Largest batch fitting the memory budget.", ["dtype"], registry=r
        )
        self.compression_ratio = Gauge(
            "optrun_compression_ratio", "Full-precision bytes over compressed bytes.", ["target"], registry=r
        )
        self.rlvr_reward = Gauge("optrun_rlvr_reward_mean", "Mean reward of the last GRPO step.", registry=r)
        self.rlvr_pass = Gauge(
            "optrun_rlvr_pass_ratio", "Held-out exact-match accuracy (pass@1), 0..1.", ["phase"], registry=r
        )
        self.rlvr_kl = Gauge("optrun_rlvr_kl", "KL divergence to the reference policy.", registry=r)
        self.acceptance_pass = Gauge(
            "optrun_acceptance_pass_ratio", "Acceptance pass rate, 0..1.", registry=r
        )
        self.acceptance_tests = Counter(
            "optrun_acceptance_tests_total", "Acceptance tests run.", ["outcome"], registry=r
        )
        self.score = Gauge("optrun_score_ratio", "Weighted acceptance score, 0..1.", registry=r)
        self.decision = Info("optrun_decision", "The run's decision.", registry=r)
        self._jsonl = jsonl
        self._lock = threading.Lock()
        self.last_progress = time.time()
        self.last_step = 0

    # -- writers used by the stages -------------------------------------------------------

    def record(self, event: str, **fields: Any) -> None:
        """Append one event to the JSONL log."""
        if self._jsonl is None:
            return
        line = json.dumps({"ts": round(time.time(), 3), "event": event, **fields}, default=str)
        with self._lock, self._jsonl.open("a") as f:
            f.write(line + "\n")

    def progress(self) -> None:
        self.last_progress = time.time()
        self.progress_ts.set(self.last_progress)

    def set_stage(self, stage: str) -> None:
        self.stage.state(stage)
        self.progress()
        self.record("stage", stage=stage)

    def train_step(
        self, *, epoch: int, step: int, loss: float, lr: float, seconds: float, tokens: int
    ) -> None:
        self.epoch.set(epoch)
        self.step.set(step)
        self.last_step = step
        self.loss.set(loss)
        self.learning_rate.set(lr)
        self.step_seconds.observe(seconds)
        tps = tokens / seconds if seconds > 0 else 0.0
        self.tokens_per_second.set(tps)
        self.progress()
        self.record("step", epoch=epoch, step=step, loss=loss, lr=lr, seconds=seconds, tokens_per_second=tps)

    def evaluation(self, *, epoch: int, step: int, loss: float, accuracy: float) -> None:
        self.eval_loss.set(loss)
        self.accuracy.set(accuracy)
        self.progress()
        self.record("eval", epoch=epoch, step=step, loss=loss, accuracy=accuracy)

    def gate_trip(self, gate: str, *, step: int, action: str, detail: str = "") -> None:
        self.gate_trips.labels(gate=gate).inc()
        self.record("gate", gate=gate, step=step, action=action, detail=detail)

    def recovery(self, *, step: int, action: str) -> None:
        self.recoveries.inc()
        self.record("recovery", step=step, action=action)

    def oom_backoff(self, *, step: int, micro_batches: int) -> None:
        self.oom_backoffs.inc()
        self.record("oom-backoff", step=step, micro_batches=micro_batches)

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve /metrics on `port` (0 picks a free one) for the rest of the process; returns the port."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        self._server = server
        return int(server.server_address[1])

    def close(self) -> None:
        server = getattr(self, "_server", None)
        if server is not None:
            server.shutdown()
            server.server_close()
            self._server = None  # an endpoint opened again later (a scrape of its own) closes on its own
