"""The orchestrator: one run, stage by stage.

    detect -> baseline -> optimize -> train -> rlvr -> kvcache -> acceptance -> report

The same function serves `optrun run` on a laptop and `optrun runtime` in the operator's pod;
only the observer (progress bars or log lines) and the retry policy differ. Stages share the
`RunContext`; each optimization package exposes one entry point the orchestrator calls.
Failures inside a stage are data: a failed safety gate or a crashed optional stage ends up as a
failed acceptance test and so in the decision, never as a missing report.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from optrun import judge
from optrun.api.result import Result, SafetySummary, TestResult
from optrun.api.v1alpha1 import OptimizationRunSpec
from optrun.runtime import report
from optrun.runtime.acceptance import SUITE
from optrun.runtime.context import RunContext
from optrun.runtime.data import Corpus
from optrun.runtime.hardware import detect
from optrun.runtime.metrics import Metrics
from optrun.runtime.model import TinyLM, build_model
from optrun.runtime.training.checkpoint import CheckpointStore
from optrun.runtime.training.faults import InjectedFault
from optrun.runtime.training.gates import SafetyGateFailed
from optrun.runtime.training.loop import Interrupted, Trainer, evaluate

log = logging.getLogger(__name__)

# Acceptance tests register themselves on import; this is the whole suite.
SUITE_MODULES = (
    "optrun.runtime.checks",
    "optrun.runtime.kernels.acceptance",
    "optrun.runtime.speedup",
    "optrun.runtime.compression.acceptance",
    "optrun.runtime.kvcache.acceptance",
    "optrun.runtime.rlvr.acceptance",
)


class Observer(Protocol):
    def serving(self, address: str) -> None: ...
    def stage(self, name: str) -> None: ...
    def stage_done(self, name: str, seconds: float) -> None: ...
    def step(self, trainer: Trainer) -> None: ...
    def test(self, result: TestResult) -> None: ...


class LogObserver:
    """Plain log lines: what the pod prints."""

    def serving(self, address: str) -> None:
        log.info("serving metrics at %s", address)

    def stage(self, name: str) -> None:
        log.info("stage %s", name)

    def stage_done(self, name: str, seconds: float) -> None:
        log.info("stage %s done in %.1fs", name, seconds)

    def step(self, trainer: Trainer) -> None:
        if trainer.step % 50 == 0:
            log.info(
                "epoch %d step %d loss %.4f",
                trainer.epoch,
                trainer.step,
                trainer.losses[-1][1] if trainer.losses else float("nan"),
            )

    def test(self, result: TestResult) -> None:
        pass


@dataclass
class RunOptions:
    output_dir: Path
    name: str = "run"
    metrics_port: int | None = None  # None: no HTTP endpoint; 0: any free port
    # A laptop run serves loopback only; the pod listens on every address so Prometheus
    # and the operator can scrape it at the pod IP.
    metrics_addr: str = "127.0.0.1"
    attempts: int = 1  # in-process attempts of the train stage (the local run's stand-in for pod retries)
    device: str | None = None
    keep_serving: bool = False  # the pod serves /metrics until the process exits
    stop: threading.Event = field(default_factory=threading.Event)
    # Called with the reason when the watchdog sees a hang; the pod's ends the process, since the
    # operator may not reach /metrics to see it (a laptop run only reports it).
    on_hang: Callable[[str], None] | None = None


def load_suite() -> None:
    for name in SUITE_MODULES:
        importlib.import_module(name)


def _model_factory(spec: OptimizationRunSpec, device: torch.device) -> Callable[[], nn.Module]:
    """Fresh weights from the seed, the same on every call."""
    model_name = spec.workload.model

    def build() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.training.seed)
            if ":" in model_name:
                module, attr = model_name.split(":", 1)
                model = getattr(importlib.import_module(module), attr)()
            else:
                model = build_model(model_name)
        return model.to(device)

    return build


class Watchdog(threading.Thread):
    """Reports a hang: no progress (a step or a stage change) for hangTimeoutSeconds."""

    def __init__(self, metrics: Metrics, timeout: float, on_hang: Callable[[float], None]) -> None:
        super().__init__(name="optrun-watchdog", daemon=True)
        self.metrics, self.timeout, self.on_hang = metrics, timeout, on_hang
        self.done = threading.Event()
        self._reported_at = 0.0

    def run(self) -> None:
        while not self.done.wait(min(5.0, self.timeout / 4)):
            idle = time.time() - self.metrics.last_progress
            if idle > self.timeout and self._reported_at != self.metrics.last_progress:
                self._reported_at = self.metrics.last_progress
                self.on_hang(idle)


def execute(spec: OptimizationRunSpec, opts: RunOptions, observer: Observer | None = None) -> Result:
    obs = observer or LogObserver()
    out = opts.output_dir
    out.mkdir(parents=True, exist_ok=True)
    load_suite()
    metrics = Metrics(out / "metrics.jsonl")
    port = metrics.serve(opts.metrics_port, opts.metrics_addr) if opts.metrics_port is not None else None
    if port is not None:
        obs.serving(f"http://127.0.0.1:{port}/metrics")
    hang_events: list[dict[str, Any]] = []

    def on_hang(idle: float) -> None:
        metrics.gate_trip("hang", step=metrics.last_step, action="report", detail=f"{idle:.0f}s idle")
        hang_events.append({"gate": "hang", "idle_seconds": round(idle, 1)})
        log.error("no progress for %.0fs (hangTimeoutSeconds %d)", idle, spec.safety.hang_timeout_seconds)
        if opts.on_hang is not None:
            opts.on_hang(
                f"HangDetected: no progress for {idle:.0f}s (hangTimeoutSeconds "
                f"{spec.safety.hang_timeout_seconds}); the runtime's watchdog ended the process"
            )

    watchdog = Watchdog(metrics, spec.safety.hang_timeout_seconds, on_hang)
    watchdog.start()
    timings: dict[str, float] = {}

    def stage(name: str) -> _Stage:
        return _Stage(name, obs, metrics, timings)

    try:
        with stage("detect"):
            device, hardware = detect(opts.device)
            metrics.run_info.info({"name": opts.name, "model": spec.workload.model, "device": hardware.name})
            corpus = Corpus.build(spec.workload.dataset)
            ctx = RunContext(
                spec=spec,
                device=device,
                hardware=hardware,
                corpus=corpus,
                model_factory=_model_factory(spec, device),
                output_dir=out,
            )
            ctx.results["metrics"] = metrics
            ctx.results["metrics_port"] = port
        with stage("baseline"):
            base = ctx.model_factory()
            ctx.results["baseline"] = evaluate(
                base,
                corpus.eval_batches(
                    spec.workload.sequence_length, spec.workload.batch_size, spec.training.eval_batches
                ),
                device,
            )
        with stage("optimize"):
            model = optimize(ctx)
        with stage("train"):
            train(ctx, model, opts, obs)
        if spec.rlvr.enabled:
            with stage("rlvr"):
                _optional(
                    ctx, "rlvr", lambda: importlib.import_module("optrun.runtime.rlvr").run(ctx, ctx.model)
                )
        if spec.optimizations.kv_cache.enabled:
            with stage("kvcache"):
                _optional(
                    ctx,
                    "kvcache",
                    lambda: importlib.import_module("optrun.runtime.kvcache").run(ctx, ctx.model),
                )
        with stage("acceptance"):
            tests = SUITE.run(
                ctx,
                on_result=lambda r: (
                    obs.test(r),
                    metrics.acceptance_tests.labels(outcome="passed" if r.passed else "failed").inc(),
                ),
            )
        with stage("report"):
            result = _result(ctx, tests, hang_events, timings)
            _export(metrics, result, ctx)
            ctx.results["report_paths"] = report.write(out, result, ctx)
        metrics.set_stage("done")
        return result
    finally:
        watchdog.done.set()
        # A pod keeps serving /metrics until the process exits; a local run closes its endpoint.
        if not opts.keep_serving:
            metrics.close()


class _Stage:
    def __init__(self, name: str, obs: Observer, metrics: Metrics, timings: dict[str, float]) -> None:
        self.name, self.obs, self.metrics, self.timings = name, obs, metrics, timings

    def __enter__(self) -> None:
        self.started = time.monotonic()
        self.metrics.set_stage(self.name)
        self.obs.stage(self.name)

    def __exit__(self, *exc: object) -> None:
        seconds = time.monotonic() - self.started
        self.timings[self.name] = round(seconds, 3)
        self.metrics.stage_seconds.labels(stage=self.name).set(seconds)
        self.obs.stage_done(self.name, seconds)


def _optional(ctx: RunContext, key: str, fn: Callable[[], object]) -> None:
    """An optimization stage that crashes is recorded (its acceptance tests then fail), not fatal."""
    try:
        fn()
    except Exception as exc:  # any crash (a TypeError too) must end in the report, never lose it
        log.error("stage %s failed: %s", key, traceback.format_exc())
        ctx.results.setdefault(key, {})["error"] = f"{type(exc).__name__}: {exc}"


def optimize(ctx: RunContext) -> nn.Module:
    """Apply the enabled optimizations to a fresh model and measure the speedup matrix."""
    spec = ctx.spec.optimizations
    model = ctx.model_factory()
    if spec.kernels.enabled:
        kernels = importlib.import_module("optrun.runtime.kernels")
        model = kernels.optimize(ctx, model)
    if spec.compression.enabled:
        _optional(
            ctx,
            "compression",
            lambda: importlib.import_module("optrun.runtime.compression").apply(ctx, model),
        )
    speedup = importlib.import_module("optrun.runtime.speedup")
    _optional(ctx, "speedups", lambda: speedup.run(ctx))
    return model


def train(ctx: RunContext, model: nn.Module, opts: RunOptions, obs: Observer) -> None:
    spec = ctx.spec
    store = CheckpointStore(ctx.output_dir / "checkpoints", keep=spec.training.checkpoint.keep)
    metrics: Metrics = ctx.results["metrics"]
    info: dict[str, Any] = {"attempts": 0}
    ctx.results["train"] = info
    trainer = None
    for attempt in range(1, opts.attempts + 1):
        info["attempts"] = attempt
        trainer = Trainer(
            spec, model, ctx.corpus, ctx.device, store, metrics, stop=opts.stop, on_step=obs.step
        )
        trainer.resume()
        try:
            summary = trainer.fit()
            info.update(summary.model_dump())
            break
        except SafetyGateFailed as exc:
            info.update(gate_failed=exc.gate, gate_message=str(exc))
            log.error("safety gate failed: %s", exc)
            break
        except Interrupted:
            raise
        except (InjectedFault, RuntimeError) as exc:
            log.error("attempt %d of training failed: %s", attempt, exc)
            info["error"] = f"{type(exc).__name__}: {exc}"
            if attempt == opts.attempts:
                raise
            model.load_state_dict(ctx.model_factory().state_dict())  # the checkpoint decides the weights
    assert trainer is not None
    info.setdefault("epochs", trainer.epoch)
    info.setdefault("steps", trainer.step)
    last = trainer.evals[-1] if trainer.evals else {"loss": float("inf"), "accuracy": 0.0}
    info.setdefault("final_loss", last["loss"])
    info.setdefault("final_accuracy", last["accuracy"])
    info.update(
        evals=trainer.evals,
        losses=trainer.losses,
        trips=dict(trainer.book.trips),
        recoveries=trainer.book.recoveries,
        events=trainer.book.events,
        step_seconds=trainer.step_times,
    )
    ctx.model = trainer.model


def _result(
    ctx: RunContext, tests: list[TestResult], hang_events: list[dict[str, Any]], timings: dict[str, float]
) -> Result:
    train_info = ctx.results.get("train", {})
    trips = dict(train_info.get("trips", {}))
    if hang_events:
        trips["hang"] = len(hang_events)
    gate = (
        ctx.results.get("compression", {}).get("gate")
        if isinstance(ctx.results.get("compression"), dict)
        else None
    )
    recoveries = train_info.get("recoveries", 0)
    if gate:
        trips["reconstruction_error"] = gate.get("trips", 0)
        recoveries += gate.get("trips", 0)
    failed_gate = train_info.get("gate_failed")
    safety = SafetySummary(
        trips=trips,
        recoveries=recoveries,
        events=train_info.get("events", []) + hang_events,
        failed_gate=failed_gate,
    )
    details = {
        k: v for k, v in ctx.results.items() if k not in {"metrics", "train", "speedups"} and _jsonable(v)
    }
    details["stageSeconds"] = timings
    details["train"] = {k: v for k, v in train_info.items() if k not in {"losses", "step_seconds"}}
    from optrun.api.result import Timing, TrainingSummary

    return judge.build_result(
        tests,
        ctx.spec.acceptance,
        safety=safety,
        speedups={k: Timing.model_validate(v) for k, v in ctx.results.get("speedups", {}).items()},
        training=TrainingSummary.model_validate(
            {k: train_info[k] for k in TrainingSummary.model_fields if k in train_info}
        ),
        hardware=ctx.hardware,
        details=details,
        exit_reason=f"safety gate {failed_gate} failed: {train_info.get('gate_message', '')}"
        if failed_gate
        else "completed",
    )


def _jsonable(v: object) -> bool:
    import json

    try:
        json.dumps(v)
    except (TypeError, ValueError):
        return False
    return True


def _export(metrics: Metrics, result: Result, ctx: RunContext) -> None:
    metrics.acceptance_pass.set(result.acceptance.pass_rate)
    metrics.score.set(result.score)
    metrics.decision.info({"decision": result.decision.value, "risk_level": result.risk_level})
    for key, t in result.speedups.items():
        metrics.speedup.labels(optimization=key).set(t.median)
    compression = ctx.results.get("compression")
    if isinstance(compression, dict):
        ratios = {
            "weights": (compression.get("weights") or {}).get("ratio"),
            "gradients": (compression.get("gradients") or {}).get("bytesRatio"),
        }
        for target, ratio in ratios.items():
            if ratio:
                metrics.compression_ratio.labels(target=target).set(ratio)


__all__ = ["LogObserver", "RunOptions", "TinyLM", "execute"]
