"""The one reconcile: what the operator observed of a run -> what it should do about it.

`reconcile(observed, cfg) -> Plan` is pure and idempotent: the same observation gives the same
plan, however often it runs, and a plan applied twice does no harm (children have deterministic
names and their creation tolerates 409; deleting a deleted pod is a no-op; the status patch
carries the resourceVersion it was computed from). kopf's create, resume, update and timer
handlers and the pod-event handler all end here (see optrun.operator.main).

The life of a run
-----------------
- Validation: the API server checks the schema; `parse_manifest` checks what a schema cannot
  (cross-field rules, built-in model names, name length). An invalid run goes Failed/InvalidSpec
  and never gets a pod.
- Attempt n runs in pod `<run>-attempt-<n>` (status.attempts = n). A pod that fails, is
  OOMKilled, evicted, deleted, or succeeds without a result (ResultsUnavailable), ends its
  attempt: status.failedAttempts += 1 and attempt n+1 starts, resuming from the last checkpoint
  when spec.training.checkpoint.claimName names a volume that outlives the pod. After
  spec.backoffLimit failed attempts the run is Failed/BackoffLimitExceeded. The next pod is
  created only once the previous one's process is over, so two attempts never write the same
  checkpoint directory.
- The result (the pod's termination message) goes through the judge (`optrun.judge.decide`)
  into decision, conditions and figures; phase Succeeded whatever the decision (NO_GO is a
  verdict on the optimizations, not a failure of the run).
- Live gates, while the runtime runs (from the scraped metrics): no progress for
  spec.safety.hangTimeoutSeconds ends the attempt (HangDetected; retried like any failed
  attempt). More recoveries than spec.safety.maxRecoveries marks SafetyGatesPassed=False at
  once; the runtime then stops training by itself and writes a judged result, and if it is
  still training `liveGateGraceSeconds` later the operator ends the run
  (Failed/RecoveryBudgetExhausted: a fault no recovery fixed will not be fixed by a retry).
- spec.activeDeadlineSeconds: wall time from status.startTime; passed -> the pod is deleted and
  the run is Failed/DeadlineExceeded (also given to the pod as activeDeadlineSeconds, so the
  kubelet enforces it while no operator runs). Suspended time does not count: resuming resets
  startTime, as Jobs do.
- spec.suspend: the pod is deleted (SIGTERM: the runtime writes a checkpoint and exits) and the
  run is Suspended; false again starts the next attempt, resuming from that checkpoint. The
  stopped attempt is not a failure.
- spec.ttlSecondsAfterFinished: the run (and through owner references its children) is deleted
  that long after completionTime.

A spec edited while the run is in progress
------------------------------------------
Every attempt trains under the spec the run started with (the immutable ConfigMap): a checkpoint
only resumes under the spec that made it, and a run judged GO must have been judged on one spec.
Edits are handled by field:
- suspend, activeDeadlineSeconds, backoffLimit, ttlSecondsAfterFinished and the live-gate
  settings (safety.hangTimeoutSeconds, safety.maxRecoveries) take effect at once;
- image, resources and scheduling apply from the next attempt (after an OOMKilled attempt,
  raising resources.memory helps the retry); event SpecChangeDeferred;
- everything else is ignored for this run, with a Warning event SpecChangeIgnored naming the
  fields: create a new run to train under them.
An edit that makes the spec invalid fails the run (InvalidSpec), as creating it invalid would.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import ValidationError

from optrun.api.errors import ManifestError
from optrun.api.result import Result
from optrun.api.v1alpha1 import OptimizationRunStatus, Progress, SafetyStatus
from optrun.operator import builders, status
from optrun.operator.builders import Run
from optrun.operator.config import OperatorConfig
from optrun.operator.pods import PodView, parse_time
from optrun.operator.scrape import Sample
from optrun.operator.status import (
    ACCEPTANCE,
    COMPLETE,
    FAILED,
    RUNNING,
    SAFETY,
    SCHEDULED,
    Event,
    Reason,
)

CONTROL_FIELDS = ("suspend", "activeDeadlineSeconds", "backoffLimit", "ttlSecondsAfterFinished")
LIVE_GATE_FIELDS = ("safety.hangTimeoutSeconds", "safety.maxRecoveries")
POD_SHAPE_FIELDS = ("image", "resources", "scheduling")


@dataclasses.dataclass(frozen=True)
class Observed:
    """Everything one reconcile looks at."""

    run: Mapping[str, Any]  # the OptimizationRun as last seen (the freshest resourceVersion)
    pods: Mapping[str, PodView]  # this run's pods by name; PodView.gone() for ones confirmed deleted
    now: dt.datetime
    sample: Sample | None = None  # the current pod's metrics, scraped just now
    spec_changes: tuple[str, ...] = ()  # spec paths an update changed ("spec.training.epochs")


@dataclasses.dataclass(frozen=True)
class Note:
    """Something for the operator's metrics: an attempt started or failed, a decision, a gate, a failure."""

    kind: Literal["attempt_started", "attempt_failed", "decision", "gate", "run_failed"]
    label: str = ""


@dataclasses.dataclass
class Plan:
    """What to do, in this order: create, delete pods, patch status, post events, delete the run."""

    create: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    delete_pods: list[str] = dataclasses.field(default_factory=list)
    status: dict[str, Any] | None = None  # the whole new .status (None: unchanged, nothing to write)
    events: list[Event] = dataclasses.field(default_factory=list)
    delete_run: bool = False
    notes: list[Note] = dataclasses.field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.create or self.delete_pods or self.status or self.events or self.delete_run)


def read_status(run: Mapping[str, Any]) -> OptimizationRunStatus:
    """The run's status as a model; a status this operator cannot read is started afresh."""
    try:
        return OptimizationRunStatus.model_validate(run.get("status") or {})
    except ValidationError:
        return OptimizationRunStatus()


def expected_pod(run: Mapping[str, Any]) -> str | None:
    """The pod of the run's current attempt, by its status (for the caller to confirm it exists)."""
    st = read_status(run)
    name = (run.get("metadata") or {}).get("name")
    return builders.pod_name(name, st.attempts) if st.attempts and name else None


def reconcile(observed: Observed, cfg: OperatorConfig) -> Plan:
    """The plan for one run (see the module docstring)."""
    return _Reconciler(observed, cfg).plan()


def creation_failed(observed: Observed, message: str, *, code: int) -> Plan:
    """The plan after the API server refused to create the next pod (quota, admission, a missing
    PriorityClass): say so in Scheduled=False/PodCreateFailed and try again on the next look."""
    r = _Reconciler(observed, OperatorConfig())
    if r.new.phase is None:
        r.new.phase = "Pending"
    r.cond(
        SCHEDULED,
        "False",
        Reason.POD_CREATE_FAILED,
        f"the API server refused the runtime pod ({code}): {message}",
    )
    r.events_out.append(Event("Warning", Reason.POD_CREATE_FAILED, status.clip(message)))
    return r.finish()


class _Reconciler:
    def __init__(self, observed: Observed, cfg: OperatorConfig) -> None:
        self.obs = observed
        self.cfg = cfg
        meta = observed.run.get("metadata") or {}
        self.name = str(meta.get("name", ""))
        self.generation: int | None = meta.get("generation")
        self.deleting = bool(meta.get("deletionTimestamp"))
        self.now = observed.now
        self.old = read_status(observed.run)
        self.new = self.old.model_copy(deep=True)
        self.out = Plan()
        self.events_out: list[Event] = []
        self.run: Run | None = None

    # --- helpers -------------------------------------------------------------------------------

    def cond(self, type_: str, state: Literal["True", "False", "Unknown"], reason: str, message: str) -> None:
        status.set_condition(
            self.new, type_, state, reason, message, now=self.now, generation=self.generation
        )

    def event(self, type_: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        self.events_out.append(Event(type_, str(reason), status.clip(message)))

    def delete(self, pod: PodView) -> None:
        if pod.live and pod.name not in self.out.delete_pods:
            self.out.delete_pods.append(pod.name)

    def finish(self) -> Plan:
        self.new.observed_generation = self.generation
        old = self.old.model_dump(mode="json", by_alias=True, exclude_none=True)
        new = self.new.model_dump(mode="json", by_alias=True, exclude_none=True)
        if new != old:
            self.out.status = new
        seen: set[str] = set()
        for e in [*self.events_out, *status.transition_events(self.old, self.new)]:
            if e.reason not in seen:
                seen.add(e.reason)
                self.out.events.append(e)
        return self.out

    # --- the decision tree ---------------------------------------------------------------------

    def plan(self) -> Plan:
        if self.deleting:
            return Plan()  # the garbage collector removes the children through owner references
        if self.new.phase in status.TERMINAL_PHASES:
            self.finished()
            return self.finish()
        try:
            self.run = Run.from_body(self.obs.run)
        except ManifestError as exc:
            self.fail(Reason.INVALID_SPEC, "invalid spec: " + "; ".join(exc.problems))
            return self.finish()
        self.spec_changes()
        attempt = self.adopt()
        self.attempt_step(attempt)
        return self.finish()

    def attempt_step(self, n: int) -> None:
        assert self.run is not None
        spec = self.run.spec
        current = self.obs.pods.get(builders.pod_name(self.name, n)) if n else None
        if n and current is None:
            return  # unconfirmed either way (the API did not answer): look again next time

        # A finished attempt comes first: a result is a result, even if a suspension came after it.
        outcome: tuple[str, str] | None = None
        if current is not None and current.finished:
            if current.state == "succeeded":
                try:
                    result = status.parse_result(current.message)
                except status.ResultUnreadable as exc:
                    outcome = (
                        Reason.RESULTS_UNAVAILABLE,
                        f"pod {current.name} succeeded without a result: {exc}",
                    )
                else:
                    self.succeed(current, result)
                    return
            if current.pod_reason == "DeadlineExceeded":
                self.fail(Reason.DEADLINE_EXCEEDED, self.deadline_message())
                self.out.notes.append(Note("gate", "deadline"))
                return
            if self.old.phase == "Suspended":
                outcome = None  # stopped for the suspension: not a failure
            elif outcome is None:
                stopped = status.get_condition(self.old, RUNNING)
                if (
                    stopped is not None
                    and stopped.status == "False"
                    and stopped.reason == Reason.HANG_DETECTED
                ):
                    outcome = (Reason.HANG_DETECTED, stopped.message)
                else:
                    outcome = current.failure()

        if not spec.suspend and self.deadline_passed():
            if current is not None:
                self.delete(current)
            self.fail(Reason.DEADLINE_EXCEEDED, self.deadline_message())
            self.out.notes.append(Note("gate", "deadline"))
            return
        if spec.suspend:
            self.suspend(current)
            return
        if n == 0:
            self.start(1)
            return
        assert current is not None
        if current.finished:
            if outcome is None:
                self.start(n + 1, resumed=True)
            else:
                self.attempt_failed(n, *outcome)
            return
        if current.deleting:
            return  # being stopped (a hang, a suspension, or someone's delete): wait until it is over
        self.live(n, current)

    # --- the branches --------------------------------------------------------------------------

    def adopt(self) -> int:
        """Attempts this status has not recorded yet (the operator died between creating a pod and
        writing status): take the newest pod as the current attempt, counting the skipped ones as
        failed attempts, except the one a resumption started."""
        n = self.new.attempts
        seen = max((p.attempt or 0 for p in self.obs.pods.values()), default=0)
        if seen > n:
            extra = seen - max(n, 1) - (1 if self.old.phase == "Suspended" else 0)
            self.new.failed_attempts += max(0, extra)
            self.new.attempts = seen
            self.new.pod_name = builders.pod_name(self.name, seen)
            if self.new.start_time is None:
                self.new.start_time = status.timestamp(self.now)
            if self.new.phase in (None, "Suspended"):
                self.new.phase = "Pending"
            self.in_progress(seen)
            self.cond(RUNNING, "Unknown", Reason.POD_PENDING, f"waiting for pod {self.new.pod_name} to start")
            self.new.message = f"attempt {seen}: pod {self.new.pod_name} found"
        return self.new.attempts

    def start(self, k: int, *, resumed: bool = False, after: tuple[str, str] | None = None) -> None:
        """Create attempt k's ConfigMap (409 after the first) and pod."""
        assert self.run is not None
        if self.new.start_time is None or resumed:
            self.new.start_time = status.timestamp(self.now)
        remaining = self.deadline_remaining()
        self.out.create.append(builders.configmap(self.run, self.cfg))
        self.out.create.append(
            builders.pod(
                self.run, k, self.cfg, active_deadline_seconds=None if remaining is None else int(remaining)
            )
        )
        pod = builders.pod_name(self.name, k)
        self.new.attempts = k
        self.new.pod_name = pod
        self.new.phase = "Recovering" if after else "Pending"
        self.new.completion_time = None
        self.in_progress(k)
        if after:
            reason, message = after
            self.cond(RUNNING, "False", reason, f"attempt {k - 1} failed: {message}; attempt {k} is starting")
        elif resumed:
            self.cond(RUNNING, "False", Reason.RESUMED, f"resumed: attempt {k} is starting")
        else:
            self.cond(RUNNING, "Unknown", Reason.POD_PENDING, f"waiting for pod {pod} to start")
        claim = self.run.spec.training.checkpoint.claim_name
        where = (
            f"checkpoints on claim {claim}: resumes from the newest one"
            if claim
            else "no checkpoint claim (spec.training.checkpoint.claimName): starts from step 0"
        )
        self.event("Normal", Reason.ATTEMPT_STARTED, f"created pod {pod} (attempt {k}); {where}")
        self.new.message = f"attempt {k}: pod {pod} created"
        self.out.notes.append(Note("attempt_started"))

    def in_progress(self, k: int) -> None:
        """The conditions of attempt k from its pod's creation until the pod says more."""
        pod = builders.pod_name(self.name, k)
        self.cond(SCHEDULED, "Unknown", Reason.POD_CREATED, f"pod {pod} created; waiting for the scheduler")
        if status.get_condition(self.new, SAFETY) is None:
            self.cond(SAFETY, "Unknown", Reason.NOT_YET_JUDGED, "no result yet")
        if status.get_condition(self.new, ACCEPTANCE) is None:
            self.cond(ACCEPTANCE, "Unknown", Reason.NOT_YET_JUDGED, "no result yet")
        self.cond(COMPLETE, "False", Reason.IN_PROGRESS, f"attempt {k} in progress")
        status.remove_condition(self.new, FAILED)

    def attempt_failed(self, n: int, reason: str, message: str) -> None:
        assert self.run is not None
        self.new.failed_attempts += 1
        self.out.notes.append(Note("attempt_failed", str(reason)))
        self.event("Warning", reason, f"attempt {n} failed: {message}")
        limit = self.run.spec.backoff_limit
        if self.new.failed_attempts > limit:
            self.fail(
                Reason.BACKOFF_LIMIT_EXCEEDED,
                f"{self.new.failed_attempts} attempt(s) failed (backoffLimit {limit}); last: {reason}: {message}",
            )
            return
        self.start(n + 1, after=(reason, message))

    def live(self, n: int, pod: PodView) -> None:
        """The current pod exists and nobody asked it to stop: scheduling, running, live gates."""
        assert self.run is not None
        if pod.scheduled is True:
            self.cond(SCHEDULED, "True", Reason.SCHEDULED, f"pod {pod.name} scheduled on node {pod.node}")
        elif pod.scheduled is False:
            self.cond(SCHEDULED, "False", Reason.UNSCHEDULABLE, f"pod {pod.name}: {pod.schedule_message}")
        if pod.state != "running":
            if self.new.phase is None:
                self.new.phase = "Pending"
            return
        self.new.phase = "Running"
        self.cond(
            RUNNING, "True", Reason.RUNTIME_STARTED, f"attempt {n}: the runtime started on node {pod.node}"
        )
        self.new.message = f"attempt {n} running"
        sample = self.obs.sample
        if sample is not None:
            self.new.progress = sample.progress()
            self.new.safety = SafetyStatus(trips=dict(sample.trips), recoveries=sample.recoveries)
        if self.recovery_gate(n, pod):
            return
        self.hang_gate(n, pod)

    def recovery_gate(self, n: int, pod: PodView) -> bool:
        assert self.run is not None
        budget = self.run.spec.safety.max_recoveries
        recoveries = self.new.safety.recoveries if self.new.safety else 0
        if recoveries <= budget:
            return False
        stage = self.new.progress.stage if self.new.progress else ""
        message = (
            f"{recoveries} recoveries exceed maxRecoveries {budget} (seen live in attempt {n}, stage {stage})"
        )
        self.cond(SAFETY, "False", Reason.RECOVERY_BUDGET_EXHAUSTED, message)
        waited = status.since(self.new, SAFETY, self.now) or 0.0
        if stage == "train" and waited >= self.cfg.live_gate_grace_seconds:
            self.delete(pod)
            self.out.notes.append(Note("gate", "recovery_budget"))
            self.fail(
                Reason.RECOVERY_BUDGET_EXHAUSTED,
                f"{message}; still training {waited:.0f}s later, so the operator ended attempt {n}",
            )
            return True
        return False

    def hang_gate(self, n: int, pod: PodView) -> None:
        """No progress for hangTimeoutSeconds ends the attempt. Before its first progress report a
        runtime is starting (imports, device detection): it gets runtimeStartupSeconds instead."""
        assert self.run is not None
        timeout = float(self.run.spec.safety.hang_timeout_seconds)
        progress = parse_time(self.new.progress.updated_at if self.new.progress else None)
        if pod.started_at is not None and (progress is None or progress < pod.started_at):
            since, allowed = pod.started_at, max(timeout, self.cfg.runtime_startup_seconds)
        elif progress is not None:
            since, allowed = progress, timeout
        else:
            return
        idle = (self.now - since).total_seconds()
        if idle <= allowed:
            return
        what = "no progress" if since is progress else "no first progress since the runtime started"
        message = f"{what} for {idle:.0f}s (hangTimeoutSeconds {timeout:g}); the operator ended attempt {n}"
        self.delete(pod)
        self.out.notes.append(Note("gate", "hang"))
        self.new.phase = "Recovering"
        self.cond(RUNNING, "False", Reason.HANG_DETECTED, message)
        self.cond(SAFETY, "False", Reason.HANG_DETECTED, message)

    def succeed(self, pod: PodView, result: Result) -> None:
        assert self.run is not None
        # Kept for a later run's spec.acceptance.baseline.run (see optrun.operator.builders).
        self.out.create.append(builders.result_configmap(self.run, pod.message))
        judged = status.judge_result(result, max_recoveries=self.run.spec.safety.max_recoveries)
        status.apply_result(self.new, result, judged)
        decision = judged.decision
        self.new.phase = "Succeeded"
        self.new.completion_time = status.timestamp(self.now)
        if self.new.progress is not None:
            self.new.progress = self.new.progress.model_copy(update={"stage": "done"})
        else:
            self.new.progress = Progress(stage="done")
        self.cond(SCHEDULED, "True", Reason.SCHEDULED, f"pod {pod.name} ran on node {pod.node or 'unknown'}")
        self.cond(
            RUNNING, "True", Reason.RUNTIME_FINISHED, f"the runtime of attempt {self.new.attempts} finished"
        )
        self.cond(
            SAFETY, "True" if judged.safety_ok else "False", judged.safety_reason, judged.safety_message
        )
        self.cond(
            ACCEPTANCE,
            "False" if decision == "NO_GO" else "True",
            judged.acceptance_reason,
            judged.acceptance_message,
        )
        summary = (
            f"{decision.value}: score {result.score:.3f}, risk {result.risk_level}, "
            f"pass rate {result.acceptance.pass_rate:.1%} ({result.acceptance.passed}/{result.acceptance.collected})"
        )
        self.cond(COMPLETE, "True", status.complete_reason(decision), summary)
        status.remove_condition(self.new, FAILED)
        self.new.message = judged.acceptance_message
        self.out.notes.append(Note("decision", decision.value))

    def fail(self, reason: str, message: str) -> None:
        self.new.phase = "Failed"
        self.new.completion_time = status.timestamp(self.now)
        self.new.message = message
        self.cond(FAILED, "True", reason, message)
        self.cond(COMPLETE, "False", reason, message)
        running = status.get_condition(self.new, RUNNING)
        if running is not None and running.status != "False":
            self.cond(RUNNING, "False", reason, message)
        if reason in (Reason.RECOVERY_BUDGET_EXHAUSTED, Reason.HANG_DETECTED):
            self.cond(SAFETY, "False", reason, message)
        for pod in self.obs.pods.values():
            self.delete(pod)
        self.out.notes.append(Note("run_failed", str(reason)))

    def suspend(self, current: PodView | None) -> None:
        if current is not None and current.live:
            self.delete(current)
            message = (
                f"suspended: pod {current.name} stopped (SIGTERM: the runtime writes a checkpoint); "
                "set spec.suspend to false to resume"
            )
        elif self.new.attempts == 0:
            message = "suspended before the first attempt; set spec.suspend to false to start"
        else:
            message = "suspended; set spec.suspend to false to resume from the last checkpoint"
        if self.new.phase != "Suspended":
            self.new.phase = "Suspended"
            self.new.message = message
            self.cond(RUNNING, "False", Reason.SUSPENDED, message)

    def finished(self) -> None:
        """A terminal run: no pod may live on, and ttlSecondsAfterFinished deletes it."""
        for pod in self.obs.pods.values():
            self.delete(pod)
        spec = self.obs.run.get("spec") or {}
        ttl = spec.get("ttlSecondsAfterFinished")
        done = parse_time(self.new.completion_time)
        if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 0 or done is None:
            return
        if (self.now - done).total_seconds() >= ttl:
            self.out.delete_run = True

    def spec_changes(self) -> None:
        """Events for a spec edit while the run is in progress (see the module docstring)."""
        if not self.obs.spec_changes or self.new.attempts == 0:
            return
        ignored: list[str] = []
        deferred: list[str] = []
        for path in self.obs.spec_changes:
            rel = path.removeprefix("spec.")
            top = rel.split(".", 1)[0]
            if top in CONTROL_FIELDS or rel in LIVE_GATE_FIELDS:
                continue
            (deferred if top in POD_SHAPE_FIELDS else ignored).append(path)
        cm = builders.configmap_name(self.name)
        if ignored:
            self.event(
                "Warning",
                Reason.SPEC_CHANGE_IGNORED,
                f"{', '.join(ignored)} changed while the run is in progress; every attempt keeps the spec the run "
                f"started with (ConfigMap {cm}); create a new run to train under the new values",
            )
        if deferred:
            self.event(
                "Normal",
                Reason.SPEC_CHANGE_DEFERRED,
                f"{', '.join(deferred)} changed: applies from the next attempt; the current pod keeps its shape",
            )

    # --- the deadline --------------------------------------------------------------------------

    def deadline_remaining(self) -> float | None:
        assert self.run is not None
        limit = self.run.spec.active_deadline_seconds
        started = parse_time(self.new.start_time)
        if limit is None or started is None:
            return None
        return limit - (self.now - started).total_seconds()

    def deadline_passed(self) -> bool:
        remaining = self.deadline_remaining()
        return remaining is not None and remaining <= 0

    def deadline_message(self) -> str:
        assert self.run is not None
        return (
            f"the run exceeded activeDeadlineSeconds {self.run.spec.active_deadline_seconds} "
            f"(started {self.new.start_time}); attempt {self.new.attempts} was stopped"
        )
