"""Status of an OptimizationRun: conditions, phases, the judged result, and the Events they cause.

Pure functions over `optrun.api` models; the reconcile decides *when*, this module says *what*.

Conditions follow the Kubernetes API convention (type, status, reason, message,
lastTransitionTime, observedGeneration); the list is a map keyed on type, and lastTransitionTime
moves only when the status moves.

  Ready              the summary for health checks (kstatus, Flux, Argo CD): True once the run
                     finished and was judged (whatever the decision: NO_GO is a verdict, not a
                     broken run), False when it failed or is suspended, Unknown while in progress
  Scheduled          the current attempt's pod was placed on a node (False: Unschedulable,
                     with the scheduler's message, or PodCreateFailed)
  Running            the runtime of the current attempt is running; False once it finished
                     (RuntimeFinished), while an attempt is being replaced or waits out its
                     back-off, while its image cannot be pulled, or while suspended
  MetricsAvailable   the operator can read the running runtime's /metrics (False:
                     MetricsUnreachable; the hang gate then waits for evidence, see reconcile)
  SafetyGatesPassed  the gates held (False: RecoveryBudgetExhausted, HangDetected, NonFiniteLoss, ...)
  AcceptancePassed   the judge's decision is GO or CONDITIONAL_GO (False: NO_GO, with why)
  Complete           the run was judged (reason DecisionGo, DecisionConditionalGo, DecisionNoGo)
  Failed             added only when the run fails (InvalidSpec, BackoffLimitExceeded,
                     DeadlineExceeded, RecoveryBudgetExhausted, ...), as Jobs do

Each reason is CamelCase and listed in `Reason`, so a person can search for it. Every change of
a condition's status or reason emits an Event with the same reason (`transition_events`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from enum import StrEnum
from typing import Any, Literal

from pydantic import ValidationError

from optrun.api.result import AcceptanceSummary, Decision, Result
from optrun.api.v1alpha1 import (
    AcceptanceStatus,
    Condition,
    FailedTest,
    OptimizationRunStatus,
    SafetyStatus,
)
from optrun.judge import decide

READY = "Ready"
SCHEDULED = "Scheduled"
RUNNING = "Running"
METRICS = "MetricsAvailable"
SAFETY = "SafetyGatesPassed"
ACCEPTANCE = "AcceptancePassed"
COMPLETE = "Complete"
FAILED = "Failed"
CONDITION_TYPES = (READY, SCHEDULED, RUNNING, METRICS, SAFETY, ACCEPTANCE, COMPLETE, FAILED)

TERMINAL_PHASES = ("Succeeded", "Failed")
MESSAGE_LIMIT = 1024  # condition and event messages: enough to name the fields and the tests


class Reason(StrEnum):
    # Scheduled
    POD_CREATED = "PodCreated"
    SCHEDULED = "Scheduled"
    UNSCHEDULABLE = "Unschedulable"
    POD_CREATE_FAILED = "PodCreateFailed"
    # Running
    POD_PENDING = "PodPending"
    RUNTIME_STARTED = "RuntimeStarted"
    RUNTIME_FINISHED = "RuntimeFinished"
    SUSPENDED = "Suspended"
    RESUMED = "Resumed"
    ATTEMPT_FAILED = "AttemptFailed"
    BACKING_OFF = "BackingOff"
    # the kubelet cannot start the container (Running=False within seconds; the attempt ends
    # after --image-pull-timeout-seconds)
    ERR_IMAGE_PULL = "ErrImagePull"
    IMAGE_PULL_BACK_OFF = "ImagePullBackOff"
    INVALID_IMAGE_NAME = "InvalidImageName"
    CREATE_CONTAINER_CONFIG_ERROR = "CreateContainerConfigError"
    CREATE_CONTAINER_ERROR = "CreateContainerError"
    # MetricsAvailable
    METRICS_SCRAPED = "MetricsScraped"
    METRICS_UNREACHABLE = "MetricsUnreachable"
    # disruptions: the attempt is restarted at once and not counted against backoffLimit
    PREEMPTED = "Preempted"
    NODE_SHUTDOWN = "NodeShutdown"
    NODE_LOST = "NodeLost"
    DISRUPTED = "Disrupted"
    # attempt failures (Running=False, AttemptFailed events)
    POD_DELETED = "PodDeleted"
    EVICTED = "Evicted"
    OOM_KILLED = "OOMKilled"
    RUNTIME_ERROR = "RuntimeError"
    RESULTS_UNAVAILABLE = "ResultsUnavailable"
    # safety gates
    NOT_YET_JUDGED = "NotYetJudged"
    GATES_HELD = "GatesHeld"
    RECOVERY_BUDGET_EXHAUSTED = "RecoveryBudgetExhausted"
    HANG_DETECTED = "HangDetected"
    NON_FINITE_LOSS = "NonFiniteLoss"
    GRADIENT_EXPLODING = "GradientExploding"
    GRADIENT_VANISHING = "GradientVanishing"
    SAFETY_GATE_FAILED = "SafetyGateFailed"
    SAFETY_TESTS_FAILED = "SafetyTestsFailed"
    # acceptance
    ACCEPTANCE_TARGET_MET = "AcceptanceTargetMet"
    ACCEPTANCE_MINIMUM_MET = "AcceptanceMinimumMet"
    CRITICAL_TESTS_FAILED = "CriticalTestsFailed"
    PASS_RATE_BELOW_MINIMUM = "PassRateBelowMinimum"
    NO_TESTS_COLLECTED = "NoTestsCollected"
    # Complete
    IN_PROGRESS = "InProgress"
    DECISION_GO = "DecisionGo"
    DECISION_CONDITIONAL_GO = "DecisionConditionalGo"
    DECISION_NO_GO = "DecisionNoGo"
    # Failed
    INVALID_SPEC = "InvalidSpec"
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    # events without a condition
    ATTEMPT_STARTED = "AttemptStarted"
    SPEC_CHANGE_IGNORED = "SpecChangeIgnored"
    SPEC_CHANGE_DEFERRED = "SpecChangeDeferred"
    EXPIRED = "Expired"


# The runtime's gate names (optrun.runtime.training.gates) as condition reasons.
GATE_REASONS = {
    "recovery_budget": Reason.RECOVERY_BUDGET_EXHAUSTED,
    "hang": Reason.HANG_DETECTED,
    "nan_loss": Reason.NON_FINITE_LOSS,
    "gradient_exploding": Reason.GRADIENT_EXPLODING,
    "gradient_vanishing": Reason.GRADIENT_VANISHING,
}

# Waiting reasons of the kubelet that keep the runtime container from starting, as condition reasons.
CONTAINER_START_REASONS = frozenset(
    {
        Reason.ERR_IMAGE_PULL,
        Reason.IMAGE_PULL_BACK_OFF,
        Reason.INVALID_IMAGE_NAME,
        Reason.CREATE_CONTAINER_CONFIG_ERROR,
        Reason.CREATE_CONTAINER_ERROR,
    }
)
# The kubelet alternates these two while it retries one pull: one problem, one condition reason.
IMAGE_PULL_REASONS = frozenset({Reason.ERR_IMAGE_PULL, Reason.IMAGE_PULL_BACK_OFF})
DISRUPTION_REASONS = frozenset(
    {Reason.EVICTED, Reason.PREEMPTED, Reason.NODE_SHUTDOWN, Reason.NODE_LOST, Reason.DISRUPTED}
)

# Condition (type, reason) pairs that are expected on the way, not a problem worth a Warning.
_BENIGN_FALSE = {
    (RUNNING, Reason.SUSPENDED),
    (RUNNING, Reason.RESUMED),
    (RUNNING, Reason.POD_PENDING),
    (RUNNING, Reason.RUNTIME_FINISHED),
    (COMPLETE, Reason.IN_PROGRESS),
    (READY, Reason.SUSPENDED),
}
# ... and those not worth an Event at all: every run starts with them (AttemptStarted says it),
# or they repeat another condition's Event.
_QUIET = {
    (COMPLETE, Reason.IN_PROGRESS),
    (RUNNING, Reason.POD_PENDING),
    (METRICS, Reason.METRICS_SCRAPED),
}


@dataclasses.dataclass(frozen=True)
class Event:
    """A Kubernetes Event about the run: type Normal or Warning, a searchable reason, a message."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


def timestamp(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def clip(message: str, limit: int = MESSAGE_LIMIT) -> str:
    return message if len(message) <= limit else message[: limit - 3] + "..."


def omit_empty(value: Any) -> Any:
    """The status as written: empty strings left out, as Go API types' `omitempty` leaves them.
    An API server may read `""` in a custom resource as null and refuse the whole write (422, "must
    be of type string: null"): every status write of a NO_GO result whose failing test had no
    expected range was refused so, and the run stayed Running. No field of the status requires
    a string that can be empty (a condition's reason cannot be), so nothing is lost."""
    if isinstance(value, dict):
        return {k: omit_empty(v) for k, v in value.items() if v != ""}
    if isinstance(value, list):
        return [omit_empty(v) for v in value if v != ""]
    return value


def get_condition(status: OptimizationRunStatus, type_: str) -> Condition | None:
    return next((c for c in status.conditions if c.type == type_), None)


def set_condition(
    status: OptimizationRunStatus,
    type_: str,
    state: Literal["True", "False", "Unknown"],
    reason: str,
    message: str,
    *,
    now: dt.datetime,
    generation: int | None,
) -> None:
    """Set one condition in place; lastTransitionTime changes only when `state` changes."""
    old = get_condition(status, type_)
    moved = old is None or old.status != state
    new = Condition(
        type=type_,
        status=state,
        reason=str(reason),
        message=clip(message),
        last_transition_time=timestamp(now) if moved or old is None else old.last_transition_time,
        observed_generation=generation,
    )
    others = [c for c in status.conditions if c.type != type_]
    status.conditions = sorted([*others, new], key=lambda c: _order(c.type))


def ready(status: OptimizationRunStatus) -> tuple[Literal["True", "False", "Unknown"], str, str]:
    """The Ready summary from the phase and the other conditions: (status, reason, message)."""
    if status.phase == "Succeeded":
        complete = get_condition(status, COMPLETE)
        return "True", complete.reason if complete else Reason.IN_PROGRESS, status.message
    if status.phase == "Failed":
        failed = get_condition(status, FAILED)
        return "False", failed.reason if failed else Reason.ATTEMPT_FAILED, status.message
    if status.phase == "Suspended":
        return "False", Reason.SUSPENDED, status.message
    return "Unknown", Reason.IN_PROGRESS, status.message or "the run is starting"


def remove_condition(status: OptimizationRunStatus, type_: str) -> None:
    status.conditions = [c for c in status.conditions if c.type != type_]


def _order(type_: str) -> int:
    return CONDITION_TYPES.index(type_) if type_ in CONDITION_TYPES else len(CONDITION_TYPES)


def condition_is(status: OptimizationRunStatus, type_: str, state: str, reason: str | None = None) -> bool:
    c = get_condition(status, type_)
    return c is not None and c.status == state and (reason is None or c.reason == reason)


def since(status: OptimizationRunStatus, type_: str, now: dt.datetime) -> float | None:
    """Seconds since the condition last changed status, or None if it has no time."""
    c = get_condition(status, type_)
    if c is None or not c.last_transition_time:
        return None
    try:
        then = dt.datetime.fromisoformat(c.last_transition_time.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (now - then).total_seconds()


def _bad(c: Condition) -> bool:
    if c.type == FAILED:
        return c.status == "True"
    return c.status == "False" and (c.type, c.reason) not in _BENIGN_FALSE


def transition_events(old: OptimizationRunStatus, new: OptimizationRunStatus) -> list[Event]:
    """One Event per condition whose status or reason changed (Unknown states excepted)."""
    events: list[Event] = []
    seen: set[str] = set()
    for c in new.conditions:
        before = get_condition(old, c.type)
        if before is not None and (before.status, before.reason) == (c.status, c.reason):
            continue
        if c.status == "Unknown" or c.reason in seen or (c.type, c.reason) in _QUIET:
            continue
        seen.add(c.reason)
        events.append(Event("Warning" if _bad(c) else "Normal", c.reason, c.message))
    return events


# --- the judged result ----------------------------------------------------------------------


class ResultUnreadable(ValueError):
    """The termination message is not a result contract; the message says why."""


def parse_result(message: str) -> Result:
    """The result contract from a pod's termination message."""
    text = message.strip()
    if not text:
        raise ResultUnreadable("the termination message is empty")
    try:
        return Result.model_validate(json.loads(text))
    except json.JSONDecodeError as exc:
        raise ResultUnreadable(f"the termination message is not JSON ({exc.msg}): {text[-200:]!r}") from None
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "(result)"
        raise ResultUnreadable(f"the termination message is not a result: {where}: {first['msg']}") from None


@dataclasses.dataclass(frozen=True)
class Judged:
    """What the operator makes of a result: the decision re-derived by the judge, and why."""

    decision: Decision
    acceptance_reason: Reason
    acceptance_message: str
    safety_ok: bool
    safety_reason: Reason
    safety_message: str


def _pct(x: float) -> str:
    return f"{x * 100:.4g}%"


def judge_result(result: Result, *, max_recoveries: int) -> Judged:
    """Re-derive the decision from the acceptance counts (optrun.judge.decide): a pod's word alone
    is not trusted, and the summary survives even when the 4 KiB message dropped the tests."""
    s: AcceptanceSummary = result.acceptance
    decision = decide(s)
    failed_names = [t.name for t in result.tests if not t.passed]
    named = f"; failed: {', '.join(failed_names[:8])}" if failed_names else ""
    rate = f"pass rate {_pct(s.pass_rate)} ({s.passed}/{s.collected}), target {_pct(s.target)}, minimum {_pct(s.minimum)}"
    if s.collected == 0:
        a_reason = Reason.NO_TESTS_COLLECTED
    elif s.critical_failed:
        a_reason = Reason.CRITICAL_TESTS_FAILED
        rate = f"{s.critical_failed} critical test(s) failed; {rate}"
    elif decision == Decision.GO:
        a_reason = Reason.ACCEPTANCE_TARGET_MET
    elif decision == Decision.CONDITIONAL_GO:
        a_reason = Reason.ACCEPTANCE_MINIMUM_MET
    else:
        a_reason = Reason.PASS_RATE_BELOW_MINIMUM
    a_message = f"{decision.value}: {rate}{named}"
    if decision != result.decision:
        a_message += f" (the runtime reported {result.decision.value}; the operator's judge decides)"

    trips = {k: v for k, v in result.safety.trips.items() if v}
    recoveries = result.safety.recoveries
    failed_gate = result.safety.failed_gate
    safety_failed = [t.name for t in result.tests if not t.passed and t.category == "safety"]
    counts = f"trips {trips or 'none'}, {recoveries} recoveries (maxRecoveries {max_recoveries})"
    if recoveries > max_recoveries or failed_gate == "recovery_budget":
        s_ok, s_reason = False, Reason.RECOVERY_BUDGET_EXHAUSTED
        s_message = f"{recoveries} recoveries exceed maxRecoveries {max_recoveries}; {counts}"
    elif failed_gate:
        s_ok, s_reason = False, GATE_REASONS.get(failed_gate, Reason.SAFETY_GATE_FAILED)
        s_message = f"{result.exit_reason or f'safety gate {failed_gate} failed'}; {counts}"
    elif safety_failed:
        s_ok, s_reason = False, Reason.SAFETY_TESTS_FAILED
        s_message = f"safety tests failed: {', '.join(safety_failed)}; {counts}"
    else:
        s_ok, s_reason = True, Reason.GATES_HELD
        s_message = f"the gates held: {counts}"
    return Judged(decision, a_reason, a_message, s_ok, s_reason, s_message)


def apply_result(status: OptimizationRunStatus, result: Result, judged: Judged) -> None:
    """Copy the result's figures into status (decision, score, acceptance, failures, ...)."""
    s = result.acceptance
    status.decision = judged.decision
    status.score = round(result.score, 4)
    status.risk_level = result.risk_level
    status.pass_rate = round(s.pass_rate, 4)
    status.acceptance = AcceptanceStatus(
        **{**s.model_dump(), "pass_rate": round(s.pass_rate, 4)},
        failures=[
            FailedTest(
                name=t.name,
                category=str(t.category),
                critical=t.critical,
                measured=t.measured if not isinstance(t.measured, dict) else json.dumps(t.measured)[:200],
                expected=t.expected.describe() if t.expected is not None else "",
                reason=clip(t.reason, 300),
            )
            for t in result.tests
            if not t.passed
        ],
    )
    status.recommendations = list(result.recommendations)
    status.safety = SafetyStatus(trips=dict(result.safety.trips), recoveries=result.safety.recoveries)
    status.speedups = {k: round(t.median, 4) for k, t in result.speedups.items()}


def complete_reason(decision: Decision) -> Reason:
    return {
        Decision.GO: Reason.DECISION_GO,
        Decision.CONDITIONAL_GO: Reason.DECISION_CONDITIONAL_GO,
        Decision.NO_GO: Reason.DECISION_NO_GO,
    }[decision]
