"""Retries that fit a cluster (back-off, disruptions, containers the kubelet cannot start), no hang
kill without evidence, and the admission webhook's review: the pure parts, on the objects the
operator sees."""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest

from optrun.operator import admission
from optrun.operator import reconcile as rec
from optrun.operator.config import OperatorConfig
from optrun.operator.scrape import Sample
from tests.unit.operator.helpers import NOW, SPEC, applied, conditions, config, observe, run_body

PodFactory = Callable[..., dict[str, Any]]


def started(cfg: OperatorConfig, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    run = run_body(spec)
    return applied(run, rec.reconcile(observe(run), cfg))


def pod_names(plan: rec.Plan) -> list[str]:
    return [m["metadata"]["name"] for m in plan.create if m["kind"] == "Pod"]


def later(seconds: float) -> dt.datetime:
    return NOW + dt.timedelta(seconds=seconds)


# --- back-off between attempts ------------------------------------------------------------------


def test_a_failed_attempt_is_followed_by_an_exponential_back_off_counted_once(pod: PodFactory) -> None:
    cfg = config(retry_backoff_seconds=10, retry_backoff_max_seconds=25)
    run = started(cfg, {**copy.deepcopy(SPEC), "backoffLimit": 5})
    failed = pod(1, "failed", exit_code=1)
    plan = rec.reconcile(observe(run, [failed]), cfg)
    run = applied(run, plan)
    assert pod_names(plan) == []  # not at once
    st = run["status"]
    assert (st["phase"], st["failedAttempts"], st["attempts"]) == ("Recovering", 1, 1)
    assert st["nextAttemptTime"] == "2026-01-02T03:04:15Z"  # NOW + 10 s
    assert conditions(run)["Running"] == ("False", "RuntimeError")
    assert "starts at 2026-01-02T03:04:15Z" in next(
        c["message"] for c in st["conditions"] if c["type"] == "Running"
    )
    # Looking again during the back-off changes nothing and counts nothing.
    plan = rec.reconcile(observe(run, [failed], now=later(9)), cfg)
    assert pod_names(plan) == [] and plan.status is None
    # Once it has passed, attempt 2 starts; the failure is still counted once.
    plan = rec.reconcile(observe(run, [failed], now=later(10)), cfg)
    run = applied(run, plan)
    assert pod_names(plan) == ["demo-attempt-2"]
    assert (run["status"]["failedAttempts"], run["status"]["attempts"]) == (1, 2)
    assert "nextAttemptTime" not in run["status"]
    # The second failure doubles it (20 s); the third is capped at retryBackoffMaxSeconds (25 s).
    failed2 = pod(2, "failed", exit_code=1, run=run)
    run = applied(run, rec.reconcile(observe(run, [failed, failed2], now=later(30)), cfg))
    assert run["status"]["nextAttemptTime"] == "2026-01-02T03:04:55Z"  # 30 + 20
    run = applied(run, rec.reconcile(observe(run, [failed, failed2], now=later(50)), cfg))
    failed3 = pod(3, "failed", exit_code=1, run=run)
    run = applied(run, rec.reconcile(observe(run, [failed, failed2, failed3], now=later(60)), cfg))
    assert run["status"]["nextAttemptTime"] == "2026-01-02T03:05:30Z"  # 60 + 25, not 60 + 40


def test_a_restarted_operator_finds_the_retry_it_made_after_a_back_off_without_counting_twice(
    pod: PodFactory,
) -> None:
    cfg = config(retry_backoff_seconds=10)
    run = started(cfg)
    failed = pod(1, "failed", exit_code=1)
    run = applied(run, rec.reconcile(observe(run, [failed]), cfg))
    # Attempt 2 was created after the back-off, then the status write was lost.
    plan = rec.reconcile(observe(run, [failed, pod(2)], now=later(11)), cfg)
    new = applied(run, plan)
    assert pod_names(plan) == []
    assert (new["status"]["attempts"], new["status"]["failedAttempts"]) == (2, 1)


# --- disruptions ---------------------------------------------------------------------------------


def _disrupted(pod: PodFactory, reason: str, state: str = "failed", **kw: Any) -> dict[str, Any]:
    p = pod(1, state, exit_code=143, deleting=True, **kw)
    p["status"]["conditions"].append(
        {"type": "DisruptionTarget", "status": "True", "reason": reason, "message": "drained by kubectl"}
    )
    return p


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("EvictionByEvictionAPI", "Evicted"),
        ("PreemptionByScheduler", "Preempted"),
        ("DeletionByTaintManager", "NodeLost"),
        ("TerminationByKubelet", "Evicted"),
    ],
)
@pytest.mark.parametrize("ended", ["terminated", "force-deleted"])
def test_a_disrupted_attempt_restarts_at_once_without_using_up_the_backoff_limit(
    pod: PodFactory, target: str, reason: str, ended: str
) -> None:
    cfg = config(retry_backoff_seconds=10)
    run = started(cfg, {**copy.deepcopy(SPEC), "backoffLimit": 0})
    if ended == "terminated":  # the container stopped, the pod object is still there
        observed = observe(run, [_disrupted(pod, target)])
    else:  # deleted while still running (--force, or the node's pods GC'd): only its last state
        observed = observe(run, deleted=(_disrupted(pod, target, "running"),))
    plan = rec.reconcile(observed, cfg)
    new = applied(run, plan)
    assert pod_names(plan) == ["demo-attempt-2"]  # no back-off after a disruption
    st = new["status"]
    assert (st["attempts"], st.get("failedAttempts", 0), st["disruptedAttempts"]) == (2, 0, 1)
    assert st["phase"] == "Recovering"
    assert conditions(new)["Running"] == ("False", reason)
    event = next(e for e in plan.events if e.reason == reason)
    assert event.type == "Warning" and "not counted against backoffLimit" in event.message
    assert rec.Note("attempt_disrupted", reason) in plan.notes


def test_a_node_pressure_eviction_by_the_kubelet_is_a_disruption(pod: PodFactory) -> None:
    cfg = config()
    run = started(cfg, {**copy.deepcopy(SPEC), "backoffLimit": 0})
    evicted = pod(1, "failed", exit_code=137, pod_reason="Evicted")
    new = applied(run, rec.reconcile(observe(run, [evicted]), cfg))
    assert (new["status"]["attempts"], new["status"].get("failedAttempts", 0)) == (2, 0)


def test_a_pod_deleted_before_it_finished_without_a_disruption_is_a_failed_attempt(pod: PodFactory) -> None:
    cfg = config()
    run = started(cfg, {**copy.deepcopy(SPEC), "backoffLimit": 0})
    # Deleted by a person while running: no DisruptionTarget, no kubelet reason.
    plan = rec.reconcile(observe(run, deleted=(pod(1, "running", deleting=True),)), cfg)
    new = applied(run, plan)
    assert new["status"]["phase"] == "Failed" and new["status"]["failedAttempts"] == 1
    assert conditions(new)["Failed"] == ("True", "BackoffLimitExceeded")
    assert [e.reason for e in plan.events] == ["PodDeleted", "BackoffLimitExceeded"]


# --- containers the kubelet cannot start -----------------------------------------------------------


def _waiting(pod: PodFactory, reason: str, message: str, scheduled_seconds_ago: float = 5) -> dict[str, Any]:
    p = pod(1, "pending")
    p["spec"]["nodeName"] = "gpu-node-0"
    p["status"]["conditions"] = [
        {
            "type": "PodScheduled",
            "status": "True",
            "lastTransitionTime": (NOW - dt.timedelta(seconds=scheduled_seconds_ago)).strftime(
                "%Y-%m-%dT%H:%M:%SZ"
            ),
        }
    ]
    p["status"]["containerStatuses"] = [
        {
            "name": "runtime",
            "image": "registry.example/optrun-runtime:test",
            "state": {"waiting": {"reason": reason, "message": message}},
        }
    ]
    return p


def test_an_image_that_cannot_be_pulled_is_named_at_once_and_ends_the_attempt_after_the_wait(
    pod: PodFactory,
) -> None:
    cfg = config(image_pull_timeout_seconds=60)
    run = started(cfg)
    pulling = _waiting(pod, "ErrImagePull", "failed to resolve reference")
    plan = rec.reconcile(observe(run, [pulling]), cfg)
    run = applied(run, plan)
    assert conditions(run)["Running"] == ("False", "ErrImagePull")
    running = next(c for c in run["status"]["conditions"] if c["type"] == "Running")
    assert "image registry.example/optrun-runtime:test" in running["message"]
    assert ("Warning", "ErrImagePull") in [(e.type, e.reason) for e in plan.events]
    assert plan.delete_pods == []
    # The kubelet's back-off between two pulls is the same problem: no flapping reason, no Event.
    backoff = _waiting(pod, "ImagePullBackOff", 'Back-off pulling image "x"')
    assert rec.reconcile(observe(run, [backoff], now=later(20)), cfg).empty
    # After the wait the operator ends the attempt; once the pod is gone it counts as failed.
    plan = rec.reconcile(observe(run, [backoff], now=later(61)), cfg)
    run = applied(run, plan)
    assert plan.delete_pods == ["demo-attempt-1"]
    assert "the operator ended attempt 1" in next(
        c["message"] for c in run["status"]["conditions"] if c["type"] == "Running"
    )
    plan = rec.reconcile(observe(run, gone=("demo-attempt-1",), now=later(62)), cfg)
    new = applied(run, plan)
    assert pod_names(plan) == ["demo-attempt-2"]
    assert new["status"]["failedAttempts"] == 1
    assert plan.events[0].reason == "ErrImagePull"


def test_a_missing_configmap_of_the_container_surfaces_as_its_reason(pod: PodFactory) -> None:
    cfg = config()
    run = started(cfg)
    waiting = _waiting(pod, "CreateContainerConfigError", 'configmap "x" not found')
    new = applied(run, rec.reconcile(observe(run, [waiting]), cfg))
    assert conditions(new)["Running"] == ("False", "CreateContainerConfigError")


# --- no hang kill without evidence -----------------------------------------------------------------


def test_metrics_that_cannot_be_read_are_reported_and_never_end_the_attempt(pod: PodFactory) -> None:
    cfg = config(runtime_startup_seconds=30)
    spec = copy.deepcopy(SPEC)
    spec["safety"] = {"hangTimeoutSeconds": 30}
    run = started(cfg, spec)
    refused = "http://127.0.0.9:9090/metrics: connection refused"
    # While the runtime starts, a refused scrape is expected: Unknown, no Event.
    plan = rec.reconcile(observe(run, [pod(1, "running", started_seconds_ago=5)], scrape_error=refused), cfg)
    run = applied(run, plan)
    assert conditions(run)["MetricsAvailable"] == ("Unknown", "MetricsUnreachable")
    assert "MetricsUnreachable" not in [e.reason for e in plan.events]
    # Long past the hang timeout and the startup allowance: said so, and the pod lives on.
    long_running = pod(1, "running", started_seconds_ago=600)
    plan = rec.reconcile(observe(run, [long_running], scrape_error=refused), cfg)
    run = applied(run, plan)
    assert plan.delete_pods == []
    assert conditions(run)["MetricsAvailable"] == ("False", "MetricsUnreachable")
    assert conditions(run)["Running"] == ("True", "RuntimeStarted")
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "MetricsUnreachable")]
    # A pod event (no scrape) is no evidence either way.
    assert rec.reconcile(observe(run, [long_running]), cfg).delete_pods == []
    # Reachable again and stale: now the gate acts, on evidence.
    stale = Sample(stage="train", step=9, progress_timestamp=(NOW - dt.timedelta(seconds=45)).timestamp())
    plan = rec.reconcile(observe(run, [long_running], sample=stale), cfg)
    assert plan.delete_pods == ["demo-attempt-1"]
    assert conditions(applied(run, plan))["MetricsAvailable"] == ("True", "MetricsScraped")


def test_the_runtime_watchdogs_verdict_is_the_attempts_reason_and_fails_the_safety_gates(
    pod: PodFactory,
) -> None:
    cfg = config()
    run = started(cfg, {**copy.deepcopy(SPEC), "backoffLimit": 0})
    message = "HangDetected: no progress for 301s (hangTimeoutSeconds 300); the runtime's watchdog ended the process"
    new = applied(run, rec.reconcile(observe(run, [pod(1, "failed", exit_code=124, message=message)]), cfg))
    assert conditions(new)["Failed"] == ("True", "BackoffLimitExceeded")
    assert conditions(new)["SafetyGatesPassed"] == ("False", "HangDetected")
    assert "HangDetected: no progress for 301s" in new["status"]["message"]
    assert conditions(new)["Ready"] == ("False", "BackoffLimitExceeded")


# --- the admission review ----------------------------------------------------------------------------


def _obj(spec: dict[str, Any], attempts: int = 0, **meta: Any) -> dict[str, Any]:
    body = run_body(spec, status={"attempts": attempts} if attempts else None, **meta)
    return body


def test_the_webhook_names_a_misspelt_field_and_a_broken_cross_field_rule() -> None:
    spec = copy.deepcopy(SPEC)
    spec["training"]["epochz"] = 3
    spec["acceptance"] = {"targetPassRate": 0.8, "minimumPassRate": 0.9}
    problems = admission.review("CREATE", _obj(spec), None)
    assert any(p.startswith("spec.training.epochz: unknown field; allowed: epochs,") for p in problems)
    assert any(
        "spec.acceptance" in p and "minimumPassRate must not exceed targetPassRate" in p for p in problems
    )
    assert admission.review("CREATE", _obj(copy.deepcopy(SPEC)), None) == []


def test_the_webhook_refuses_an_immutable_field_of_a_started_run_and_admits_the_mutable_ones() -> None:
    old = _obj(copy.deepcopy(SPEC), attempts=1)
    edited = copy.deepcopy(old)
    edited["spec"]["training"]["epochs"] = 9
    edited["spec"]["suspend"] = True
    problems = admission.review("UPDATE", edited, old)
    assert len(problems) == 1 and problems[0].startswith("spec.training.epochs: may not change once the run")
    assert "suspend" in problems[0]  # says what may change
    allowed = copy.deepcopy(old)
    allowed["spec"].update(suspend=True, activeDeadlineSeconds=600, ttlSecondsAfterFinished=60)
    allowed["spec"]["resources"]["memory"] = "64Gi"
    assert admission.review("UPDATE", allowed, old) == []
    assert admission.warnings("UPDATE", allowed, old) == [
        "spec.resources.memory changed: applies from the next attempt; the current pod keeps its shape"
    ]
    # Before its first attempt (created suspended) a run may change freely.
    fresh = _obj(copy.deepcopy(SPEC))
    changed = copy.deepcopy(fresh)
    changed["spec"]["training"]["epochs"] = 9
    assert admission.review("UPDATE", changed, fresh) == []


def test_the_webhook_never_blocks_metadata_updates_or_the_deletion_of_an_invalid_stored_run() -> None:
    spec = copy.deepcopy(SPEC)
    spec["acceptance"] = {"targetPassRate": 0.8, "minimumPassRate": 0.9}  # stored while the webhook was down
    old = _obj(spec, attempts=0)
    finalizer_patch = copy.deepcopy(old)
    finalizer_patch["metadata"]["finalizers"] = ["optrun.io/operator"]
    assert admission.review("UPDATE", finalizer_patch, old) == []
    deleting = copy.deepcopy(old)
    deleting["metadata"]["deletionTimestamp"] = "2026-01-02T03:04:05Z"
    deleting["spec"]["training"] = {"epochs": 2}
    assert admission.review("UPDATE", deleting, old) == []
    assert admission.review("DELETE", None, old) == []
