"""The orchestrator: one run, stage by stage, on one model lineage.

    detect -> baseline -> kernels -> train -> rlvr -> compression -> kvcache -> speedups
           -> artifact -> acceptance -> report

`detect` finds the hardware, checks the user's model and data, loads the model and builds the
corpus with the model's tokenizer. From there every stage receives the model the previous stage
handed on, in the order a rollout uses it: the baseline is measured on the model as given, the
kernels are patched into it (with parity against the unpatched model on held-out data), it is
fine-tuned under the safety gates, RLVR trains that model, compression quantizes the trained
model (its gate and error bound judge trained weights; the quantized model is what every later
inference test uses), the KV-cache sweep decodes with it, the artifact is that model written to
disk, and acceptance judges it. `ctx.results["lineage"]` records, per stage, the fingerprint of
the model received and handed on, so a report shows the chain is unbroken. A stage that is off
is skipped and says so (`ctx.results["stages"]`); the speedup matrix alone times fresh copies
(speed does not depend on the weights' values, and the baseline must be the unoptimized model).

The same function serves `optrun run` on a laptop and `optrun runtime` in the operator's pod;
only the observer (progress bars or log lines) and the retry policy differ. Failures inside a
stage are data: a failed safety gate or a crashed optional stage ends up as a failed acceptance
test and so in the decision, never as a missing report.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from optrun import judge
from optrun.api.result import (
    ArtifactInfo,
    Category,
    DistributedInfo,
    Result,
    SafetySummary,
    TestResult,
    Timing,
    TrainingSummary,
)
from optrun.api.v1alpha1 import OptimizationRunSpec
from optrun.runtime import distributed, report
from optrun.runtime.acceptance import SUITE
from optrun.runtime.context import RunContext
from optrun.runtime.data import Corpus
from optrun.runtime.hardware import detect
from optrun.runtime.lm import CausalLM, evaluate, fingerprint
from optrun.runtime.lm.loading import ModelLoadError, model_factory
from optrun.runtime.lm.sources import SourceProblem, check
from optrun.runtime.metrics import PIPELINE, Metrics
from optrun.runtime.training.checkpoint import CheckpointStore
from optrun.runtime.training.faults import InjectedFault
from optrun.runtime.training.gates import SafetyGateFailed
from optrun.runtime.training.loop import Interrupted, Trainer

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
STAGES = PIPELINE


class InvalidSource(ValueError):
    """The run's model or data cannot be used; `problems` are field-named lines."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class Observer(Protocol):
    def serving(self, address: str) -> None: ...
    def stage(self, name: str) -> None: ...
    def stage_done(self, name: str, seconds: float) -> None: ...
    def stage_skipped(self, name: str, reason: str) -> None: ...
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

    def stage_skipped(self, name: str, reason: str) -> None:
        log.info("stage %s skipped: %s", name, reason)

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


class _Stages:
    """Times each stage, tells the observer and the metrics, records what was skipped and why,
    and keeps the lineage: the fingerprint of the model each stage received and handed on."""

    def __init__(self, obs: Observer, metrics: Metrics, ctx_results: dict[str, Any]) -> None:
        self.obs, self.metrics = obs, metrics
        self.timings: dict[str, float] = {}
        self.status: dict[str, dict[str, Any]] = ctx_results.setdefault("stages", {})
        self.lineage: list[dict[str, Any]] = ctx_results.setdefault("lineage", [])

    @contextmanager
    def run(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        self.metrics.set_stage(name)
        self.obs.stage(name)
        try:
            yield
        finally:
            seconds = time.monotonic() - started
            self.timings[name] = round(seconds, 3)
            self.status.setdefault(name, {"status": "ran"})
            self.metrics.stage_seconds.labels(stage=name).set(seconds)
            self.obs.stage_done(name, seconds)

    def skip(self, name: str, reason: str) -> None:
        self.status[name] = {"status": "skipped", "reason": reason}
        self.obs.stage_skipped(name, reason)

    @contextmanager
    def on_lineage(self, name: str, ctx: RunContext) -> Iterator[None]:
        """Run a stage that receives ctx.model and hands ctx.model on; the fingerprints are
        taken on the way in and on the way out (stages may change the model in place)."""
        received = fingerprint(ctx.model) if ctx.model is not None else None
        with self.run(name):
            yield
        self.lineage.append(
            {
                "stage": name,
                "received": received,
                "handedOn": fingerprint(ctx.model) if ctx.model is not None else None,
                "model": type(ctx.model).__name__,
            }
        )


def endpoint_url(addr: str, port: int) -> str:
    """Where a /metrics endpoint listening on `addr` answers: loopback when it listens on every
    address, else the one address it was given (a pod's IP where pods share one network namespace)."""
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(addr, addr)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"


def execute(spec: OptimizationRunSpec, opts: RunOptions, observer: Observer | None = None) -> Result | None:
    """Run every stage; the result (None on a rank other than 0 of a distributed run, whose part
    ends with training)."""
    obs = observer or LogObserver()
    out = opts.output_dir
    out.mkdir(parents=True, exist_ok=True)
    load_suite()
    d = distributed.init(spec, torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    main = d is None or d.is_main
    # Rank 0 writes the report and serves the metrics; every rank logs.
    metrics = Metrics(out / "metrics.jsonl" if main else None)
    serve = opts.metrics_port is not None and main
    port = metrics.serve(opts.metrics_port, opts.metrics_addr) if serve else None
    metrics_url = endpoint_url(opts.metrics_addr, port) if port is not None else None
    if metrics_url is not None:
        obs.serving(metrics_url)
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
    # The watchdog's reports, for the acceptance tests (safety.no-hang) and the safety summary.
    results: dict[str, Any] = {"metrics": metrics, "metrics_url": metrics_url, "hangs": hang_events}
    stages = _Stages(obs, metrics, results)
    try:
        with stages.run("detect"):
            ctx = _detect(spec, opts, results, d)
        o = spec.optimizations
        with stages.on_lineage("baseline", ctx):
            # An out-of-memory error here (past the evaluation's own back-off) is a failed
            # baseline that the tests against it report, not a run without a report.
            _optional(ctx, "baseline", lambda: _baseline(ctx))
        _stage(
            stages, ctx, "kernels", o.kernels.enabled, "spec.optimizations.kernels.enabled is false", _kernels
        )
        with stages.on_lineage("train", ctx):
            train(ctx, ctx.model, opts, obs)
            if d is not None:
                _leave_group(ctx)  # collective: every rank takes part; rank 0 hands the whole model on
        if d is not None and not d.is_main:
            return None  # this rank's part is done: rank 0 carries the trained model on alone
        _stage(stages, ctx, "rlvr", spec.rlvr.enabled, "spec.rlvr.enabled is false", _rlvr)
        ctx.trained = ctx.model  # the float model, before compression, for the training-side tests
        _stage(
            stages,
            ctx,
            "compression",
            o.compression.enabled,
            "spec.optimizations.compression.enabled is false",
            _compression,
        )
        _stage(
            stages,
            ctx,
            "kvcache",
            o.kv_cache.enabled,
            "spec.optimizations.kvCache.enabled is false",
            _kvcache,
        )
        with stages.run("speedups"):
            # Its error goes beside the matrix (results["speedups"] holds only timings).
            _optional(
                ctx,
                "speedups",
                lambda: importlib.import_module("optrun.runtime.speedup").run(ctx),
                record="speedup_matrix",
            )
        with stages.on_lineage("artifact", ctx):
            from optrun.runtime import artifact

            _optional(ctx, "artifact", lambda: artifact.write(ctx, out / "model"))
        with stages.run("acceptance"):
            tests = SUITE.run(
                ctx,
                on_result=lambda r: (
                    obs.test(r),
                    metrics.acceptance_tests.labels(outcome="passed" if r.passed else "failed").inc(),
                    metrics.progress(),  # each finished test is progress: the suite takes minutes
                ),
            )
        with stages.run("report"):
            result = _result(ctx, tests, hang_events, stages.timings)
            _export(metrics, result, ctx)
            ctx.results["report_paths"] = report.write(out, result, ctx)
            if result.artifact is not None:
                from optrun.runtime import artifact

                artifact.record_decision(Path(result.artifact.path), result)
        metrics.set_stage("done")
        return result
    finally:
        watchdog.done.set()
        # A pod keeps serving /metrics until the process exits; a local run closes its endpoint.
        if not opts.keep_serving:
            metrics.close()


def _detect(
    spec: OptimizationRunSpec, opts: RunOptions, results: dict[str, Any], d: distributed.Dist | None
) -> RunContext:
    """Hardware, the checked sources, the model (as given) and the corpus in its tokens."""
    device, hardware = detect(opts.device)
    if d is not None:
        device = distributed.device_for(d.local_rank, device)
        results["distributed"] = d.describe()
    problems = check(spec)
    if problems:
        raise InvalidSource(problems)
    factory = model_factory(spec, device)
    try:
        model = factory()
        corpus = Corpus.build(
            spec.workload.dataset, model.tokenizer, sequence_length=spec.workload.sequence_length
        )
    except (ModelLoadError, SourceProblem) as exc:
        raise InvalidSource(getattr(exc, "problems", [str(exc)])) from exc
    metrics: Metrics = results["metrics"]
    metrics.run_info.info({"name": opts.name, "model": spec.workload.model_name, "device": hardware.name})
    ctx = RunContext(
        spec=spec,
        device=device,
        hardware=hardware,
        corpus=corpus,
        model_factory=factory,
        output_dir=opts.output_dir,
        results=results,
        model=model,
        dist=d,
    )
    results["model"] = model.describe()
    results["data"] = corpus.info
    return ctx


def _stage(
    stages: _Stages,
    ctx: RunContext,
    name: str,
    enabled: bool,
    off_reason: str,
    fn: Callable[[RunContext], None],
) -> None:
    """An optional stage on the lineage: run it (a crash is recorded, the model kept), or say
    why it was skipped."""
    if not enabled:
        stages.skip(name, off_reason)
        return
    with stages.on_lineage(name, ctx):
        _optional(ctx, name, lambda: fn(ctx))


def _baseline(ctx: RunContext) -> None:
    assert ctx.model is not None
    ctx.results["baseline"] = evaluate(ctx.model, ctx.eval_batches(), ctx.device, ctx.dtype)


def _kernels(ctx: RunContext) -> None:
    assert ctx.model is not None
    ctx.model = importlib.import_module("optrun.runtime.kernels").run(ctx, ctx.model)


def _rlvr(ctx: RunContext) -> None:
    assert ctx.model is not None
    importlib.import_module("optrun.runtime.rlvr").run(ctx, ctx.model)


def _compression(ctx: RunContext) -> None:
    assert ctx.model is not None
    ctx.model = importlib.import_module("optrun.runtime.compression").apply(ctx, ctx.model)


def _kvcache(ctx: RunContext) -> None:
    importlib.import_module("optrun.runtime.kvcache").run(ctx, ctx.model)


def _optional(ctx: RunContext, key: str, fn: Callable[[], object], *, record: str | None = None) -> None:
    """A stage that crashes is recorded (its acceptance tests then fail), not fatal: the error
    goes into the stage's results (`record`, default its own key) and its status."""
    try:
        fn()
    except Exception as exc:  # any crash (a TypeError too) must end in the report, never lose it
        log.error("stage %s failed: %s", key, traceback.format_exc())
        entry = ctx.results.setdefault(record or key, {})
        if isinstance(entry, dict):
            entry["error"] = f"{type(exc).__name__}: {exc}"
        ctx.results.setdefault("stages", {})[key] = {
            "status": "failed",
            "reason": f"{type(exc).__name__}: {exc}",
        }


def train(ctx: RunContext, model: CausalLM, opts: RunOptions, obs: Observer) -> None:
    spec = ctx.spec
    store = CheckpointStore(ctx.output_dir / "checkpoints", keep=spec.training.checkpoint.keep)
    metrics: Metrics = ctx.results["metrics"]
    info: dict[str, Any] = {"attempts": 0}
    ctx.results["train"] = info
    trainer = None
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for attempt in range(1, opts.attempts + 1):
        info["attempts"] = attempt
        trainer = Trainer(
            spec,
            model,
            ctx.corpus,
            ctx.device,
            store,
            metrics,
            stop=opts.stop,
            on_step=obs.step,
            dist=ctx.dist,
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
        except torch.OutOfMemoryError as exc:
            # Past the trainer's own back-offs (micro-batch, evaluation rows): another attempt
            # would meet the same memory. Reported: the training tests fail and say why.
            log.error("training ran out of memory: %s", exc)
            info["error"] = f"OutOfMemoryError: {exc}"
            break
        except (InjectedFault, RuntimeError) as exc:
            log.error("attempt %d of training failed: %s", attempt, exc)
            info["error"] = f"{type(exc).__name__}: {exc}"
            if attempt == opts.attempts:
                raise
            model.load_state_dict(initial)  # the checkpoint, if any, decides the weights
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
        oom_backoffs=trainer.book.oom_backoffs,
        scaler_overflows=trainer.book.scaler_overflows,
        events=trainer.book.events,
        step_seconds=trainer.step_times,
    )
    if trainer.comm_stats is not None:
        info["gradientCompression"] = trainer.comm_stats.to_dict()
    if ctx.dist is not None:
        info["ranks"] = distributed.gather_rank_figures(trainer, ctx.dist)
    ctx.model = trainer.model


def _leave_group(ctx: RunContext) -> None:
    """Rank 0 after distributed training: the whole trained model (gathered from the shards under
    FSDP) in an unsharded copy, then out of the group, so later stages run in one process."""
    assert ctx.dist is not None and ctx.model is not None
    if ctx.dist.strategy == "fsdp":
        state = distributed.full_state_on_main(ctx.model, ctx.dist)
        if state is not None:
            fresh = ctx.model_factory()
            if "kernels" in ctx.transforms:
                fresh = ctx.transforms["kernels"](fresh)
            fresh.load_state_dict(state)
            ctx.model = fresh
    if not ctx.dist.is_main:
        ctx.model = None  # its shards mean nothing without the group
    distributed.leave(ctx.dist)


def invalid_result(spec: OptimizationRunSpec, problems: list[str]) -> Result:
    """The result of a run whose model or data cannot be used: NO_GO, one failed critical test
    that lists every field-named problem (what the operator's pod reports)."""
    test = TestResult(
        name="infra.sources-valid",
        category=Category.CRITICAL_INFRASTRUCTURE,
        critical=True,
        passed=False,
        measured=len(problems),
        reason="; ".join(problems),
    )
    return judge.build_result([test], spec.acceptance, exit_reason="invalid spec: " + "; ".join(problems))


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
    if gate:  # a trip of the compression gate keeps a tensor in full precision: no recovery
        trips["reconstruction_error"] = gate.get("trips", 0)
    failed_gate = train_info.get("gate_failed")
    safety = SafetySummary(
        trips=trips,
        recoveries=train_info.get("recoveries", 0),
        oom_backoffs=train_info.get("oom_backoffs", 0),
        hangs=len(hang_events),
        scaler_overflows=train_info.get("scaler_overflows", 0),
        events=train_info.get("events", []) + hang_events,
        failed_gate=failed_gate,
    )
    details = {
        k: v for k, v in ctx.results.items() if k not in {"metrics", "train", "speedups"} and _jsonable(v)
    }
    details["stageSeconds"] = timings
    details["train"] = {k: v for k, v in train_info.items() if k not in {"losses", "step_seconds"}}
    result = judge.build_result(
        tests,
        ctx.spec.acceptance,
        safety=safety,
        speedups={k: Timing.model_validate(v) for k, v in ctx.results.get("speedups", {}).items()},
        training=TrainingSummary.model_validate(
            {k: train_info[k] for k in TrainingSummary.model_fields if k in train_info}
        ),
        hardware=ctx.hardware,
        details=details,
        baseline=report.load_baseline(ctx.spec.acceptance),
        exit_reason=f"safety gate {failed_gate} failed: {train_info.get('gate_message', '')}"
        if failed_gate
        else "completed",
    )
    art = ctx.results.get("artifact")
    if isinstance(art, dict) and "path" in art:
        result = result.model_copy(update={"artifact": ArtifactInfo.model_validate(art)})
    if "distributed" in ctx.results:
        result = result.model_copy(
            update={"distributed": DistributedInfo.model_validate(ctx.results["distributed"])}
        )
    return result


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


__all__ = ["STAGES", "InvalidSource", "LogObserver", "RunOptions", "execute", "invalid_result"]
