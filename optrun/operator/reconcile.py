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
  OOMKilled, deleted, succeeds without a result (ResultsUnavailable), or whose container the
  kubelet cannot start (ErrImagePull, ImagePullBackOff, CreateContainerConfigError, ... for
  `imagePullTimeoutSeconds` after its scheduling) ends its attempt: status.failedAttempts += 1 and,
  after a back-off (`retryBackoffSeconds` doubling per failure up to `retryBackoffMaxSeconds`,
  status.nextAttemptTime), attempt n+1 starts, resuming from the last checkpoint when
  spec.training.checkpoint.claimName names a volume that outlives the pod. After
  spec.backoffLimit failed attempts the run is Failed/BackoffLimitExceeded. A disruption (an
  eviction, a preemption, a node drained, shut down or lost: `PodView.disruption`) is no failure:
  status.disruptedAttempts += 1 and the next attempt starts at once. The next pod is created only
  once the previous one's process is over, so two attempts never write the same checkpoint
  directory.
- The result (the pod's termination message) goes through the judge (`optrun.judge.decide`)
  into decision, conditions and figures; phase Succeeded whatever the decision (NO_GO is a
  verdict on the optimizations, not a failure of the run).
- Live gates, while the runtime runs (from the scraped metrics): no progress for
  spec.safety.hangTimeoutSeconds ends the attempt (HangDetected; retried like any failed
  attempt), but only on evidence: a scrape that answered just now. When /metrics cannot be read
  (a NetworkPolicy, a mesh), MetricsAvailable=False says so, and the operator never kills a pod
  it cannot observe: the runtime's own watchdog ends a process that is truly hung, with
  "HangDetected: ..." as its termination message, which the operator reads as the reason. More recoveries than spec.safety.maxRecoveries marks SafetyGatesPassed=False at
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
Edits are handled by field (optrun.api.mutability, which the admission webhook enforces):
- suspend, activeDeadlineSeconds, backoffLimit, ttlSecondsAfterFinished and the live-gate
  settings (safety.hangTimeoutSeconds, safety.maxRecoveries) take effect at once;
- image, resources and scheduling apply from the next attempt (after an OOMKilled attempt,
  raising resources.memory helps the retry); event SpecChangeDeferred;
- everything else is refused by the webhook. An edit that got past it (the webhook down with
  failurePolicy Ignore) is ignored for this run, with a Warning event SpecChangeIgnored naming
  the fields, and status.observedGeneration does not advance: the spec as written is not what
  the run does (the reconcile compares it with the spec in the run's ConfigMap).
An edit that makes the spec invalid fails the run (InvalidSpec), as creating it invalid would.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import ValidationError

from optrun.api import mutability
from optrun.api.errors import ManifestError
from optrun.api.result import Result
from optrun.api.v1alpha1 import OptimizationRunSpec, OptimizationRunStatus, Progress, SafetyStatus
from optrun.operator import builders, status
from optrun.operator.builders import Run
from optrun.operator.config import OperatorConfig
from optrun.operator.pods import PodView, parse_time
from optrun.operator.scrape import Sample
from optrun.operator.status import (
    ACCEPTANCE,
    COMPLETE,
    CONTAINER_START_REASONS,
    FAILED,
    IMAGE_PULL_REASONS,
    METRICS,
    READY,
    RUNNING,
    SAFETY,
    SCHEDULED,
    Event,
    Reason,
)


@dataclasses.dataclass(frozen=True)
class Observed:
    """Everything one reconcile looks at."""

    run: Mapping[str, Any]  # the OptimizationRun as last seen (the freshest resourceVersion)
    pods: Mapping[str, PodView]  # this run's pods by name; PodView.gone() for ones confirmed deleted
    now: dt.datetime
    sample: Sample | None = None  # the current pod's metrics, scraped just now
    scrape_error: str | None = None  # a scrape was tried just now and failed: why
    spec_changes: tuple[str, ...] = ()  # spec paths an update changed ("spec.training.epochs")
    # The spec every attempt runs under (the run's ConfigMap), when the run's generation is one the
    # operator has not acted on yet: None when not needed or not known.
    started_spec: Mapping[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class Note:
    """Something for the operator's metrics: an attempt started or failed, a decision, a gate, a failure."""

    kind: Literal["attempt_started", "attempt_failed", "attempt_disrupted", "decision", "gate", "run_failed"]
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


def expected_pods(run: Mapping[str, Any]) -> list[str]:
    """The pods of the run's current attempt, by its status (for the caller to confirm they exist);
    index 0 first."""
    st = read_status(run)
    name = (run.get("metadata") or {}).get("name")
    if not st.attempts or not name:
        return []
    nodes = ((run.get("spec") or {}).get("distributed") or {}).get("nodes", 1)
    return builders.pod_names(name, st.attempts, nodes if isinstance(nodes, int) else 1)


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
        self.acted = self.acted_generation()
        # A multi-node attempt's pods, and the one view of them the decision tree reads (`group`).
        self.members: list[PodView] = []
        self.group_view: PodView | None = None

    # --- helpers -------------------------------------------------------------------------------

    def cond(self, type_: str, state: Literal["True", "False", "Unknown"], reason: str, message: str) -> None:
        status.set_condition(self.new, type_, state, reason, message, now=self.now, generation=self.acted)

    def event(self, type_: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        self.events_out.append(Event(type_, str(reason), status.clip(message)))

    def delete(self, pod: PodView) -> None:
        # Ending a multi-node attempt ends every pod of it.
        for p in self.members if pod is self.group_view else [pod]:
            if p.live and p.name not in self.out.delete_pods:
                self.out.delete_pods.append(p.name)

    def finish(self) -> Plan:
        self.new.observed_generation = self.acted
        self.cond(READY, *status.ready(self.new))
        old = status.omit_empty(self.old.model_dump(mode="json", by_alias=True, exclude_none=True))
        new = status.omit_empty(self.new.model_dump(mode="json", by_alias=True, exclude_none=True))
        if new != old:
            self.out.status = new
        seen: set[str] = set()
        for e in [*self.events_out, *status.transition_events(self.old, self.new)]:
            if e.reason not in seen:
                seen.add(e.reason)
                self.out.events.append(e)
        return self.out

    def acted_generation(self) -> int | None:
        """The generation this reconcile acts on: the run's own, unless the spec holds an edit of a
        field a started run may not change (it got past the webhook), which the operator ignores:
        then the generation it last acted on stays (status.observedGeneration says only that)."""
        started = self.obs.started_spec
        last = self.old.observed_generation
        if started is None or last is None or last == self.generation or not self.old.attempts:
            return self.generation
        try:
            current = OptimizationRunSpec.model_validate(self.obs.run.get("spec") or {})
            before = OptimizationRunSpec.model_validate(started)
        except ValidationError:
            return self.generation  # an invalid edit is acted on: it fails the run
        dump = {"mode": "json", "by_alias": True, "exclude_none": True}
        ignored = mutability.immutable_changes(before.model_dump(**dump), current.model_dump(**dump))  # type: ignore[arg-type]
        return last if ignored else self.generation

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
        current = self.group(n) if n else None
        if n and current is None:
            return  # unconfirmed either way (the API did not answer): look again next time

        # A finished attempt comes first: a result is a result, even if a suspension came after it.
        outcome: tuple[str, str] | None = None
        disrupted = False
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
                disruption = current.disruption()
                if (
                    stopped is not None
                    and stopped.status == "False"
                    and (stopped.reason == Reason.HANG_DETECTED or stopped.reason in CONTAINER_START_REASONS)
                ):
                    outcome = (stopped.reason, stopped.message)  # the operator ended it, and said why
                elif disruption is not None:
                    outcome, disrupted = disruption, True
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
            elif disrupted:
                self.attempt_disrupted(n, *outcome)
            elif self.new.next_attempt_time is not None:
                self.back_off(n, *outcome)  # counted already: wait out the back-off
            else:
                self.attempt_failed(n, *outcome)
            return
        if current.deleting:
            return  # being stopped (a hang, a suspension, or someone's delete): wait until it is over
        self.live(n, current)

    def group(self, n: int) -> PodView | None:
        """Attempt n's pod; for several nodes, one view of its pods, with PyTorchJob's semantics: any
        pod failing or stopping ends the attempt for all (the others are deleted; the attempt is over
        once every pod is), and the result is pod 0's (global rank 0). None: a pod is unconfirmed."""
        assert self.run is not None
        views = [self.obs.pods.get(name) for name in builders.pod_names(self.name, n, self.run.nodes)]
        if any(v is None for v in views):
            return None
        members = [v for v in views if v is not None]
        if len(members) == 1:
            return members[0]
        self.members = members
        first = members[0]
        if first.state == "succeeded":
            view = first  # the others end on their own, or as the finished run's leftovers
        elif ended := [m for m in members if m.state in ("failed", "gone")]:
            # The pod that failed by itself, before those the operator (or someone) stopped.
            cause = next((m for m in ended if not m.deleting), ended[0])
            if all(m.finished for m in members):
                view = cause
            else:
                view = dataclasses.replace(cause, state="pending", deleting=True)
                self.new.message = f"attempt {n}: pod {cause.name} ended ({cause.state}); stopping the others"
        else:
            unscheduled = next((m for m in members if m.scheduled is False), None)
            waiting = next((m for m in members if m.waiting_reason in CONTAINER_START_REASONS), None)
            base = waiting or unscheduled or first
            view = dataclasses.replace(
                base,
                state="running" if all(m.state in ("running", "succeeded") for m in members) else "pending",
                deleting=any(m.deleting for m in members),
                scheduled=False if unscheduled else (True if all(m.scheduled for m in members) else None),
                node=", ".join(m.node for m in members if m.node),
                pod_ip=first.pod_ip,  # pod 0 serves the metrics (global rank 0)
                started_at=first.started_at,
            )
        self.group_view = view
        if view.deleting and not view.finished:
            self.delete(view)  # one pod stopping stops the group
        return view

    # --- the branches --------------------------------------------------------------------------

    def adopt(self) -> int:
        """Attempts this status has not recorded yet (the operator died between creating a pod and
        writing status): take the newest pod as the current attempt, counting the skipped ones as
        failed attempts, except the one a resumption started."""
        n = self.new.attempts
        seen = max((p.attempt or 0 for p in self.obs.pods.values()), default=0)
        if seen > n:
            # Neither the attempt a resumption started nor one whose failure was counted already
            # (its successor waited out a back-off) is a lost failure.
            extra = (
                seen
                - max(n, 1)
                - (1 if self.old.phase == "Suspended" else 0)
                - (1 if self.old.next_attempt_time else 0)
            )
            self.new.failed_attempts += max(0, extra)
            self.new.attempts = seen
            self.new.next_attempt_time = None
            self.new.pods = builders.pod_names(self.name, seen, self.run.nodes if self.run else 1)
            self.new.pod_name = self.new.pods[0]
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
        if self.run.nodes > 1:
            self.out.create.append(builders.service(self.run, self.cfg))  # 409 after the first attempt
        self.out.create.append(builders.configmap(self.run, self.cfg))
        self.out.create.extend(
            builders.pods(
                self.run, k, self.cfg, active_deadline_seconds=None if remaining is None else int(remaining)
            )
        )
        self.new.pods = builders.pod_names(self.name, k, self.run.nodes)
        pod = ", ".join(self.new.pods)
        self.new.attempts = k
        self.new.pod_name = self.new.pods[0]
        self.new.phase = "Recovering" if after else "Pending"
        self.new.completion_time = None
        self.new.next_attempt_time = None
        status.remove_condition(self.new, METRICS)  # each attempt's pod is scraped afresh
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
        what = f"pods {pod}" if self.run.nodes > 1 else f"pod {pod}"
        self.event("Normal", Reason.ATTEMPT_STARTED, f"created {what} (attempt {k}); {where}")
        self.new.message = f"attempt {k}: pod {pod} created"
        self.out.notes.append(Note("attempt_started"))

    def in_progress(self, k: int) -> None:
        """The conditions of attempt k from its pod's creation until the pod says more."""
        pod = ", ".join(self.new.pods) or builders.pod_name(self.name, k)
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
        if reason == Reason.HANG_DETECTED:
            self.cond(SAFETY, "False", Reason.HANG_DETECTED, message)
        limit = self.run.spec.backoff_limit
        if self.new.failed_attempts > limit:
            self.fail(
                Reason.BACKOFF_LIMIT_EXCEEDED,
                f"{self.new.failed_attempts} attempt(s) failed (backoffLimit {limit}); last: {reason}: {message}",
            )
            return
        delay = min(
            self.cfg.retry_backoff_seconds * 2 ** (self.new.failed_attempts - 1),
            self.cfg.retry_backoff_max_seconds,
        )
        if delay <= 0:
            self.start(n + 1, after=(reason, message))
            return
        self.new.next_attempt_time = status.timestamp(self.now + dt.timedelta(seconds=delay))
        self.back_off(n, reason, message)

    def back_off(self, n: int, reason: str, message: str) -> None:
        """Attempt n failed and was counted; attempt n+1 starts at status.nextAttemptTime."""
        due = parse_time(self.new.next_attempt_time)
        if due is None or self.now >= due:
            self.start(n + 1, after=(reason, message))
            return
        self.new.phase = "Recovering"
        self.cond(
            RUNNING,
            "False",
            reason,
            f"attempt {n} failed: {message}; attempt {n + 1} starts at {self.new.next_attempt_time} (back-off)",
        )
        self.new.message = (
            f"attempt {n} failed ({reason}); attempt {n + 1} starts at {self.new.next_attempt_time}"
        )

    def attempt_disrupted(self, n: int, reason: str, message: str) -> None:
        """The cluster ended the attempt (eviction, preemption, node drain): not the run's failure,
        so not counted against backoffLimit, and the next attempt starts at once (elsewhere)."""
        self.new.disrupted_attempts += 1
        self.out.notes.append(Note("attempt_disrupted", str(reason)))
        self.event(
            "Warning",
            reason,
            f"attempt {n} was disrupted: {message}; not counted against backoffLimit, attempt {n + 1} starts now",
        )
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
            self.container_start(n, pod)
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
        self.metrics_condition(pod)
        if self.recovery_gate(n, pod):
            return
        if sample is not None:
            self.hang_gate(n, pod)  # only on evidence: a scrape that answered just now

    def container_start(self, n: int, pod: PodView) -> None:
        """The kubelet cannot start the runtime container (the image, its configuration): say so at
        once, and end the attempt once the pod has waited imagePullTimeoutSeconds on its node."""
        reason = pod.waiting_reason
        if reason not in CONTAINER_START_REASONS:
            return
        running = status.get_condition(self.new, RUNNING)
        same = (
            running is not None
            and running.status == "False"
            and (running.reason == reason or {running.reason, reason} <= IMAGE_PULL_REASONS)
        )
        if not same:
            detail = f": {pod.waiting_message}" if pod.waiting_message else ""
            self.cond(
                RUNNING,
                "False",
                reason,
                f"pod {pod.name}: the kubelet cannot start the runtime container, image {pod.image} ({reason}){detail}",
            )
            self.new.message = f"attempt {n}: {reason}: image {pod.image}"
            running = status.get_condition(self.new, RUNNING)
        assert running is not None
        # From whichever is later: the pod reaching its node, or this problem first being seen.
        times = [t for t in (parse_time(running.last_transition_time), pod.scheduled_at) if t is not None]
        since = max(times, default=self.now)
        waited = (self.now - since).total_seconds()
        if waited < self.cfg.image_pull_timeout_seconds:
            return
        self.delete(pod)
        self.cond(
            RUNNING,
            "False",
            running.reason,
            f"{running.message}; {waited:.0f}s on its node without starting "
            f"(imagePullTimeoutSeconds {self.cfg.image_pull_timeout_seconds:g}): the operator ended attempt {n}",
        )

    def metrics_condition(self, pod: PodView) -> None:
        """MetricsAvailable: whether the operator can read the running runtime's /metrics."""
        where = f"http://{pod.pod_ip}:{self.cfg.runtime_metrics_port}/metrics"
        if self.obs.sample is not None:
            self.cond(METRICS, "True", Reason.METRICS_SCRAPED, f"the operator reads {where}")
            return
        if self.obs.scrape_error is None:
            return  # not scraped in this reconcile (a pod event): nothing new to say
        seen = status.get_condition(self.new, METRICS)
        starting = pod.started_at is not None and (
            (self.now - pod.started_at).total_seconds() < self.cfg.runtime_startup_seconds
        )
        if (seen is None or seen.status == "Unknown") and starting:
            self.cond(
                METRICS, "Unknown", Reason.METRICS_UNREACHABLE, f"waiting for the runtime to serve {where}"
            )
            return
        self.cond(
            METRICS,
            "False",
            Reason.METRICS_UNREACHABLE,
            f"cannot read {where} ({self.obs.scrape_error}): progress is not followed and the operator's hang "
            "gate is off for this attempt (it never ends a pod it cannot observe); the runtime's own watchdog "
            "ends a hung process. Let the operator reach the pods' port metrics (the chart's NetworkPolicy).",
        )

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
            RUNNING, "False", Reason.RUNTIME_FINISHED, f"the runtime of attempt {self.new.attempts} finished"
        )
        status.remove_condition(self.new, METRICS)
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
        status.remove_condition(self.new, METRICS)
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
            if mutability.takes_effect_next_attempt(rel):
                deferred.append(path)
            elif not mutability.is_mutable(rel):
                ignored.append(path)
        cm = builders.configmap_name(self.name)
        if ignored:
            self.event(
                "Warning",
                Reason.SPEC_CHANGE_IGNORED,
                f"{', '.join(ignored)} changed while the run is in progress, past the admission webhook; every "
                f"attempt keeps the spec the run started with (ConfigMap {cm}) and observedGeneration stays; "
                "create a new run to train under the new values",
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
