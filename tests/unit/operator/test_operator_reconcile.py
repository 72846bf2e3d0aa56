"""The one reconcile, on observed runs and pods: what it creates, deletes, and writes into status."""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest

from optrun.operator import reconcile as rec
from optrun.operator.config import OperatorConfig
from optrun.operator.scrape import Sample
from tests.unit.operator.helpers import (
    NOW,
    SPEC,
    applied,
    conditions,
    observe,
    result_message,
    run_body,
    stamp,
)

PodFactory = Callable[..., dict[str, Any]]


def started(cfg: OperatorConfig, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """A run after its first reconcile: attempt 1 created, status written."""
    run = run_body(spec)
    return applied(run, rec.reconcile(observe(run), cfg))


def kinds(plan: rec.Plan) -> list[tuple[str, str]]:
    return [(m["kind"], m["metadata"]["name"]) for m in plan.create]


def reasons(plan: rec.Plan) -> list[str]:
    return [e.reason for e in plan.events]


# --- the first attempt ---------------------------------------------------------------------------


def test_a_new_run_gets_its_configmap_and_first_pod_and_goes_pending(cfg: OperatorConfig) -> None:
    run = run_body()
    plan = rec.reconcile(observe(run), cfg)
    assert kinds(plan) == [("ConfigMap", "demo-spec"), ("Pod", "demo-attempt-1")]
    status = applied(run, plan)["status"]
    assert (status["phase"], status["attempts"], status["podName"]) == ("Pending", 1, "demo-attempt-1")
    assert status["startTime"] == stamp(0)
    assert status["observedGeneration"] == 1
    assert reasons(plan) == ["AttemptStarted"]
    assert all(c["observedGeneration"] == 1 for c in status["conditions"])


def test_the_same_observation_gives_the_same_plan(cfg: OperatorConfig) -> None:
    run = run_body()
    assert rec.reconcile(observe(run), cfg) == rec.reconcile(observe(run), cfg)


def test_a_second_reconcile_finds_the_pod_and_creates_no_second_one(
    cfg: OperatorConfig, pod: PodFactory
) -> None:
    run = started(cfg)
    plan = rec.reconcile(observe(run, [pod(1)]), cfg)
    assert plan.create == [] and plan.delete_pods == []
    assert plan.status is None  # nothing changed: no write at all


def test_a_restarted_operator_that_lost_the_status_write_adopts_the_pod(
    cfg: OperatorConfig, pod: PodFactory
) -> None:
    run = run_body()  # the pod was created, then the operator died before writing status
    plan = rec.reconcile(observe(run, [pod(1)]), cfg)
    assert plan.create == []
    status = applied(run, plan)["status"]
    assert (status["attempts"], status["podName"], status.get("failedAttempts", 0)) == (
        1,
        "demo-attempt-1",
        0,
    )


def test_a_missing_pod_that_is_not_confirmed_gone_is_waited_for(cfg: OperatorConfig) -> None:
    run = started(cfg)
    plan = rec.reconcile(observe(run), cfg)  # no pod view at all: the API did not answer
    assert plan.empty


def test_an_invalid_spec_fails_the_run_naming_the_field_and_creates_no_pod(cfg: OperatorConfig) -> None:
    spec = copy.deepcopy(SPEC)
    spec["acceptance"] = {"targetPassRate": 0.8, "minimumPassRate": 0.9}
    run = run_body(spec)
    plan = rec.reconcile(observe(run), cfg)
    assert plan.create == []
    status = applied(run, plan)["status"]
    assert status["phase"] == "Failed"
    assert conditions(applied(run, plan))["Failed"] == ("True", "InvalidSpec")
    assert "spec.acceptance" in status["message"] and "minimumPassRate" in status["message"]
    assert reasons(plan)[0] == "InvalidSpec"


def test_a_name_too_long_for_pod_labels_is_invalid(cfg: OperatorConfig) -> None:
    run = run_body(name="x" * 70)
    plan = rec.reconcile(observe(run), cfg)
    assert plan.create == []
    assert "metadata.name" in applied(run, plan)["status"]["message"]


# --- scheduling and running ---------------------------------------------------------------------


def test_an_unschedulable_pod_says_so_with_the_schedulers_message(
    cfg: OperatorConfig, pod: PodFactory
) -> None:
    why = "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."
    run = started(cfg)
    plan = rec.reconcile(observe(run, [pod(1, "unschedulable", unschedulable=why)]), cfg)
    new = applied(run, plan)
    assert conditions(new)["Scheduled"] == ("False", "Unschedulable")
    assert why in next(c["message"] for c in new["status"]["conditions"] if c["type"] == "Scheduled")
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "Unschedulable")]
    assert new["status"]["phase"] == "Pending"


def test_a_running_pod_makes_the_run_running_with_progress_from_the_scrape(
    cfg: OperatorConfig, pod: PodFactory
) -> None:
    run = started(cfg)
    sample = Sample(
        stage="train", epoch=0, step=12, loss=3.1, tokens_per_second=900.0, progress_timestamp=NOW.timestamp()
    )
    new = applied(run, rec.reconcile(observe(run, [pod(1, "running")], sample=sample), cfg))
    assert new["status"]["phase"] == "Running"
    assert conditions(new)["Scheduled"] == ("True", "Scheduled")
    assert conditions(new)["Running"] == ("True", "RuntimeStarted")
    assert new["status"]["progress"] == {
        "stage": "train", "epoch": 0, "step": 12, "loss": 3.1, "tokensPerSecond": 900.0, "updatedAt": stamp(0),
    }  # fmt: skip


# --- the result -------------------------------------------------------------------------------------


def test_a_go_result_succeeds_the_run_ready_with_the_runtime_no_longer_running(
    cfg: OperatorConfig, pod: PodFactory
) -> None:
    run = started(cfg)
    assert conditions(run)["Ready"] == ("Unknown", "InProgress")
    done = pod(1, "succeeded", message=result_message())
    plan = rec.reconcile(observe(run, [done]), cfg)
    new = applied(run, plan)
    status = new["status"]
    assert (status["phase"], status["decision"]) == ("Succeeded", "GO")
    assert conditions(new) == {
        "Ready": ("True", "DecisionGo"),
        "Scheduled": ("True", "Scheduled"),
        "Running": ("False", "RuntimeFinished"),
        "SafetyGatesPassed": ("True", "GatesHeld"),
        "AcceptancePassed": ("True", "AcceptanceTargetMet"),
        "Complete": ("True", "DecisionGo"),
    }
    assert status["conditions"][0]["type"] == "Ready"  # the summary first
    assert all(c["observedGeneration"] == 1 for c in status["conditions"])
    assert status["passRate"] == 1.0 and status["acceptance"]["collected"] == 23
    assert status["completionTime"] == stamp(0)
    assert "DecisionGo" in reasons(plan)
    # The one child a success makes: its result, kept for a later run's baseline.
    assert kinds(plan) == [("ConfigMap", "demo-result")] and plan.delete_pods == []
    assert plan.create[0]["data"] == {
        "result.json": done["status"]["containerStatuses"][0]["state"]["terminated"]["message"]
    }


def test_a_no_go_result_lists_each_failing_test_measured_against_expected(
    cfg: OperatorConfig, pod: PodFactory
) -> None:
    run = started(cfg)
    message = result_message(failing=("speedup.all",), critical_failing=("e2e.target-accuracy",))
    new = applied(run, rec.reconcile(observe(run, [pod(1, "succeeded", message=message)]), cfg))
    status = new["status"]
    assert (status["phase"], status["decision"]) == ("Succeeded", "NO_GO")
    assert conditions(new)["AcceptancePassed"] == ("False", "CriticalTestsFailed")
    failures = {f["name"]: f for f in status["acceptance"]["failures"]}
    assert failures["speedup.all"]["measured"] == 2.57 and failures["speedup.all"]["expected"] == "2..2.5"
    assert failures["e2e.target-accuracy"]["critical"] is True
    assert status["recommendations"]  # the judge's suggestion for the out-of-range speedup


def test_a_result_for_a_model_that_is_not_there_is_written_without_empty_strings(
    cfg: OperatorConfig, pod: PodFactory
) -> None:
    # The runtime's result for a bad source: one failed test with no expected range. The API server
    # reads "" in a custom resource's status as null and refuses the whole write, which left this
    # run Running for ever (tests/integration/operator/test_operator_user_model.py).
    from optrun.api.v1alpha1 import parse_manifest
    from optrun.runtime.orchestrator import invalid_result

    spec = parse_manifest(run_body())
    message = invalid_result(spec, ["spec.workload.model.path: /models/nope does not exist"]).compact()
    run = started(cfg)
    plan = rec.reconcile(observe(run, [pod(1, "succeeded", message=message)]), cfg)
    assert plan.status is not None and plan.status["decision"] == "NO_GO"
    (failure,) = plan.status["acceptance"]["failures"]
    assert failure["name"] == "infra.sources-valid" and "expected" not in failure

    def strings(value: Any) -> list[str]:
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return [value] if isinstance(value, str) else []

    assert "" not in strings(plan.status)
    # Read back, the status is the same (an absent string reads as the empty default).
    again = applied(run, plan)
    assert rec.reconcile(observe(again, [pod(1, "succeeded", message=message)]), cfg).status is None


def test_the_operator_rederives_the_decision_instead_of_trusting_the_pod(
    cfg: OperatorConfig, pod: PodFactory
) -> None:
    import json

    doc = json.loads(result_message(critical_failing=("e2e.target-accuracy",)))
    doc["decision"] = "GO"  # a runtime that claims GO despite a critical failure
    new = applied(
        started(cfg),
        rec.reconcile(observe(started(cfg), [pod(1, "succeeded", message=json.dumps(doc))]), cfg),
    )
    assert new["status"]["decision"] == "NO_GO"


def test_spent_recovery_budget_in_the_result_fails_the_safety_gates_searchably(
    cfg: OperatorConfig, pod: PodFactory
) -> None:
    message = result_message(recoveries=4, failed_gate="recovery_budget")
    new = applied(
        started(cfg), rec.reconcile(observe(started(cfg), [pod(1, "succeeded", message=message)]), cfg)
    )
    assert conditions(new)["SafetyGatesPassed"] == ("False", "RecoveryBudgetExhausted")


@pytest.mark.parametrize(
    ("gate", "reason"),
    [
        ("nan_loss", "NonFiniteLoss"),
        ("gradient_exploding", "GradientExploding"),
        ("reconstruction", "SafetyGateFailed"),
    ],
)
def test_the_failed_gate_in_the_result_becomes_the_condition_reason(
    cfg: OperatorConfig, pod: PodFactory, gate: str, reason: str
) -> None:
    message = result_message(failed_gate=gate)
    new = applied(
        started(cfg), rec.reconcile(observe(started(cfg), [pod(1, "succeeded", message=message)]), cfg)
    )
    condition = next(c for c in new["status"]["conditions"] if c["type"] == "SafetyGatesPassed")
    assert (condition["status"], condition["reason"]) == ("False", reason)
    assert condition["message"].startswith(f"safety gate {gate} failed: as the runtime words it")


def test_success_without_a_result_is_no_success_and_the_attempt_is_retried(
    cfg: OperatorConfig, pod: PodFactory
) -> None:
    run = started(cfg)
    plan = rec.reconcile(observe(run, [pod(1, "succeeded", message="")]), cfg)
    new = applied(run, plan)
    assert new["status"]["phase"] == "Recovering"
    assert new["status"]["failedAttempts"] == 1
    assert kinds(plan)[-1] == ("Pod", "demo-attempt-2")
    assert "ResultsUnavailable" in reasons(plan)
    assert conditions(new)["Running"] == ("False", "ResultsUnavailable")


# --- failed attempts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"exit_code": 1, "message": "Traceback...\nRuntimeError: CUDA error"}, "RuntimeError"),
        ({"exit_code": 137, "reason": "OOMKilled"}, "OOMKilled"),
        ({"exit_code": 143, "deleting": True}, "PodDeleted"),
        ({"exit_code": 124, "message": "step 7\nHangDetected: no progress for 31s"}, "HangDetected"),
    ],
)
def test_a_failed_attempt_is_retried_as_the_next_attempt(
    cfg: OperatorConfig, pod: PodFactory, kw: dict[str, Any], reason: str
) -> None:
    run = started(cfg)
    plan = rec.reconcile(observe(run, [pod(1, "failed", **kw)]), cfg)
    new = applied(run, plan)
    assert kinds(plan) == [("ConfigMap", "demo-spec"), ("Pod", "demo-attempt-2")]
    assert (new["status"]["attempts"], new["status"]["failedAttempts"]) == (2, 1)
    assert new["status"]["phase"] == "Recovering"
    assert reasons(plan)[:2] == [reason, "AttemptStarted"]
    assert conditions(new)["Running"] == ("False", reason)


def test_a_pod_confirmed_deleted_counts_as_a_failed_attempt(cfg: OperatorConfig) -> None:
    run = started(cfg)
    plan = rec.reconcile(observe(run, gone=("demo-attempt-1",)), cfg)
    assert kinds(plan)[-1] == ("Pod", "demo-attempt-2")
    assert reasons(plan)[0] == "PodDeleted"


def test_the_retry_after_a_failure_waits_for_the_new_pod_and_does_not_count_twice(
    cfg: OperatorConfig, pod: PodFactory
) -> None:
    run = started(cfg)
    failed = pod(1, "failed", exit_code=1)
    run = applied(run, rec.reconcile(observe(run, [failed]), cfg))
    plan = rec.reconcile(observe(run, [failed, pod(2)]), cfg)
    assert plan.create == []
    assert applied(run, plan)["status"]["failedAttempts"] == 1


def test_failures_beyond_the_backoff_limit_fail_the_run(cfg: OperatorConfig, pod: PodFactory) -> None:
    spec = {**copy.deepcopy(SPEC), "backoffLimit": 1}
    run = started(cfg, spec)
    pods = [pod(1, "failed", exit_code=1)]
    run = applied(run, rec.reconcile(observe(run, pods), cfg))
    pods.append(pod(2, "failed", exit_code=1, run=run))
    plan = rec.reconcile(observe(run, pods), cfg)
    new = applied(run, plan)
    assert plan.create == []
    assert new["status"]["phase"] == "Failed"
    assert conditions(new)["Failed"] == ("True", "BackoffLimitExceeded")
    assert "2 attempt(s) failed (backoffLimit 1)" in new["status"]["message"]


# --- live gates ----------------------------------------------------------------------------------------


def test_no_progress_for_the_hang_timeout_ends_the_attempt_and_the_retry_says_why(
    cfg: OperatorConfig, pod: PodFactory
) -> None:
    spec = copy.deepcopy(SPEC)
    spec["safety"] = {"hangTimeoutSeconds": 30}
    run = started(cfg, spec)
    stale = Sample(stage="train", step=7, progress_timestamp=(NOW - dt.timedelta(seconds=45)).timestamp())
    plan = rec.reconcile(observe(run, [pod(1, "running", started_seconds_ago=60)], sample=stale), cfg)
    run = applied(run, plan)
    assert plan.delete_pods == ["demo-attempt-1"]
    assert conditions(run)["Running"] == ("False", "HangDetected")
    assert conditions(run)["SafetyGatesPassed"] == ("False", "HangDetected")
    assert rec.Note("gate", "hang") in plan.notes
    # While it is being stopped nothing else happens; once its process is over, attempt 2 starts.
    assert rec.reconcile(observe(run, [pod(1, "running", deleting=True)]), cfg).empty
    plan = rec.reconcile(observe(run, [pod(1, "failed", exit_code=143, deleting=True)]), cfg)
    assert kinds(plan)[-1] == ("Pod", "demo-attempt-2")
    assert reasons(plan)[0] == "HangDetected"


def test_a_starting_runtime_gets_the_startup_allowance_before_the_hang_gate(
    cfg: OperatorConfig, pod: PodFactory
) -> None:
    spec = copy.deepcopy(SPEC)
    spec["safety"] = {"hangTimeoutSeconds": 30}
    run = started(cfg, spec)
    serving = Sample(stage="detect")  # /metrics answers, no progress reported yet
    # 60 s after start without any progress report: importing, not hung (allowance 120 s).
    plan = rec.reconcile(observe(run, [pod(1, "running", started_seconds_ago=60)], sample=serving), cfg)
    assert plan.delete_pods == []
    plan = rec.reconcile(
        observe(
            run, [pod(1, "running", started_seconds_ago=cfg.runtime_startup_seconds + 1)], sample=serving
        ),
        cfg,
    )
    assert plan.delete_pods == ["demo-attempt-1"]
    running = next(c for c in applied(run, plan)["status"]["conditions"] if c["type"] == "Running")
    assert (running["reason"], running["status"]) == ("HangDetected", "False")
    assert running["message"].startswith("no first progress since the runtime started")


def test_a_spent_recovery_budget_is_flagged_at_once_and_enforced_after_the_grace(
    cfg: OperatorConfig, pod: PodFactory
) -> None:
    spec = copy.deepcopy(SPEC)
    spec["safety"] = {"maxRecoveries": 2}
    run = started(cfg, spec)
    over = Sample(
        stage="train", step=30, recoveries=3, trips={"nan_loss": 3}, progress_timestamp=NOW.timestamp()
    )
    running = pod(1, "running")
    plan = rec.reconcile(observe(run, [running], sample=over), cfg)
    run = applied(run, plan)
    assert conditions(run)["SafetyGatesPassed"] == ("False", "RecoveryBudgetExhausted")
    assert run["status"]["safety"] == {"trips": {"nan_loss": 3}, "recoveries": 3}
    assert plan.delete_pods == []  # the runtime gets its chance to stop and write a judged result
    later = NOW + dt.timedelta(seconds=cfg.live_gate_grace_seconds + 1)
    plan = rec.reconcile(observe(run, [running], sample=over, now=later), cfg)
    new = applied(run, plan)
    assert plan.delete_pods == ["demo-attempt-1"]
    assert conditions(new)["Failed"] == ("True", "RecoveryBudgetExhausted")
    assert rec.Note("gate", "recovery_budget") in plan.notes


def test_a_spent_budget_after_training_lets_the_runtime_finish_its_report(
    cfg: OperatorConfig, pod: PodFactory
) -> None:
    spec = copy.deepcopy(SPEC)
    spec["safety"] = {"maxRecoveries": 2}
    run = started(cfg, spec)
    over = Sample(stage="acceptance", recoveries=3, progress_timestamp=NOW.timestamp())
    run = applied(run, rec.reconcile(observe(run, [pod(1, "running")], sample=over), cfg))
    later = NOW + dt.timedelta(seconds=600)
    still = Sample(stage="acceptance", recoveries=3, progress_timestamp=later.timestamp())
    assert rec.reconcile(observe(run, [pod(1, "running")], sample=still, now=later), cfg).delete_pods == []


# --- suspend, deadline, TTL, deletion --------------------------------------------------------------------


def test_suspend_stops_the_pod_and_resuming_starts_the_next_attempt_without_a_failure(
    cfg: OperatorConfig, pod: PodFactory
) -> None:
    run = started(cfg)
    run["spec"]["suspend"] = True
    plan = rec.reconcile(observe(run, [pod(1, "running")]), cfg)
    run = applied(run, plan)
    assert plan.delete_pods == ["demo-attempt-1"]
    assert run["status"]["phase"] == "Suspended"
    assert conditions(run)["Running"] == ("False", "Suspended")
    assert "Suspended" in reasons(plan)
    stopped = pod(1, "failed", exit_code=143, deleting=True)
    assert rec.reconcile(observe(run, [stopped]), cfg).create == []  # still suspended
    run["spec"]["suspend"] = False
    plan = rec.reconcile(observe(run, [stopped]), cfg)
    new = applied(run, plan)
    assert kinds(plan)[-1] == ("Pod", "demo-attempt-2")
    assert (new["status"]["attempts"], new["status"].get("failedAttempts", 0)) == (2, 0)
    assert new["status"]["phase"] == "Pending"
    assert "Resumed" in reasons(plan)


def test_a_run_created_suspended_waits_without_a_pod(cfg: OperatorConfig) -> None:
    run = run_body({**copy.deepcopy(SPEC), "suspend": True})
    plan = rec.reconcile(observe(run), cfg)
    assert plan.create == []
    assert applied(run, plan)["status"]["phase"] == "Suspended"


def test_a_passed_deadline_stops_the_pod_and_fails_the_run(cfg: OperatorConfig, pod: PodFactory) -> None:
    run = started(cfg, {**copy.deepcopy(SPEC), "activeDeadlineSeconds": 60})
    first = rec.reconcile(observe(run_body({**copy.deepcopy(SPEC), "activeDeadlineSeconds": 60})), cfg)
    assert first.create[-1]["spec"]["activeDeadlineSeconds"] == 60  # the kubelet's backstop
    plan = rec.reconcile(observe(run, [pod(1, "running")], now=NOW + dt.timedelta(seconds=61)), cfg)
    new = applied(run, plan)
    assert plan.delete_pods == ["demo-attempt-1"]
    assert conditions(new)["Failed"] == ("True", "DeadlineExceeded")
    assert rec.Note("gate", "deadline") in plan.notes


def test_a_pod_the_kubelet_ended_at_its_deadline_fails_the_run_without_a_retry(
    cfg: OperatorConfig, pod: PodFactory
) -> None:
    run = started(cfg, {**copy.deepcopy(SPEC), "activeDeadlineSeconds": 60})
    plan = rec.reconcile(observe(run, [pod(1, "failed", exit_code=137, pod_reason="DeadlineExceeded")]), cfg)
    assert plan.create == []
    assert conditions(applied(run, plan))["Failed"] == ("True", "DeadlineExceeded")


def test_a_finished_run_is_deleted_after_its_ttl(cfg: OperatorConfig, pod: PodFactory) -> None:
    run = started(cfg, {**copy.deepcopy(SPEC), "ttlSecondsAfterFinished": 30})
    run = applied(run, rec.reconcile(observe(run, [pod(1, "succeeded", message=result_message())]), cfg))
    assert not rec.reconcile(
        observe(run, [pod(1, "succeeded")], now=NOW + dt.timedelta(seconds=29)), cfg
    ).delete_run
    assert rec.reconcile(
        observe(run, [pod(1, "succeeded")], now=NOW + dt.timedelta(seconds=30)), cfg
    ).delete_run


def test_a_finished_run_never_keeps_a_live_pod(cfg: OperatorConfig, pod: PodFactory) -> None:
    run = started(cfg)
    run["status"]["phase"] = "Failed"
    assert rec.reconcile(observe(run, [pod(1, "running")]), cfg).delete_pods == ["demo-attempt-1"]


def test_a_run_being_deleted_is_left_to_the_garbage_collector(cfg: OperatorConfig, pod: PodFactory) -> None:
    run = started(cfg)
    run["metadata"]["deletionTimestamp"] = stamp(1)
    assert rec.reconcile(observe(run, [pod(1, "running")]), cfg).empty


# --- spec edits while running ---------------------------------------------------------------------------


def _started_spec(run: dict[str, Any], cfg: OperatorConfig) -> dict[str, Any]:
    """The spec the run's ConfigMap holds (what the controller reads back)."""
    import yaml

    from optrun.operator import builders

    cm = builders.configmap(builders.Run.from_body(run), cfg)
    return dict(yaml.safe_load(cm["data"]["run.yaml"])["spec"])


def test_a_spec_edit_while_running_is_reported_by_field_and_an_ignored_one_is_not_acted_on(
    cfg: OperatorConfig, pod: PodFactory
) -> None:
    run = started(cfg)
    before = _started_spec(run, cfg)
    run["metadata"]["generation"] = 2
    run["spec"]["training"]["epochs"] = 3
    run["spec"]["resources"]["memory"] = "8Gi"
    run["spec"]["backoffLimit"] = 5
    changes = (
        "spec.training.epochs",
        "spec.resources.memory",
        "spec.backoffLimit",
        "spec.safety.hangTimeoutSeconds",
    )
    plan = rec.reconcile(observe(run, [pod(1, "running")], changes=changes, started_spec=before), cfg)
    events = {e.reason: e for e in plan.events}
    assert events["SpecChangeIgnored"].type == "Warning"
    assert "spec.training.epochs" in events["SpecChangeIgnored"].message
    assert "backoffLimit" not in events["SpecChangeIgnored"].message
    assert "spec.resources.memory" in events["SpecChangeDeferred"].message
    new = applied(run, plan)
    # The spec as written (epochs 3) is not what the run does: generation 2 was not acted on.
    assert new["status"]["observedGeneration"] == 1
    assert all(c["observedGeneration"] == 1 for c in new["status"]["conditions"])

    # Put back, the spec is one the run acts on again: generation 3 is.
    new["metadata"]["generation"] = 3
    new["spec"]["training"]["epochs"] = before["training"]["epochs"]
    plan = rec.reconcile(observe(new, [pod(1, "running")], started_spec=before), cfg)
    assert applied(new, plan)["status"]["observedGeneration"] == 3


def test_an_edit_of_fields_a_started_run_may_change_is_acted_on(cfg: OperatorConfig, pod: PodFactory) -> None:
    run = started(cfg)
    before = _started_spec(run, cfg)
    run["metadata"]["generation"] = 2
    run["spec"]["backoffLimit"] = 5
    run["spec"]["resources"]["memory"] = "8Gi"
    plan = rec.reconcile(observe(run, [pod(1, "running")], started_spec=before), cfg)
    assert applied(run, plan)["status"]["observedGeneration"] == 2


def test_fields_a_finished_status_no_longer_has_are_removed_by_the_patch(
    cfg: OperatorConfig, pod: PodFactory
) -> None:
    run = started(cfg, {**copy.deepcopy(SPEC), "backoffLimit": 0})
    run["status"]["progress"] = {"stage": "train", "step": 3}
    plan = rec.reconcile(observe(run, [pod(1, "failed", exit_code=1)]), cfg)
    assert plan.status is not None
    assert applied(run, plan)["status"]["phase"] == "Failed"
    assert "completionTime" in plan.status


def test_a_refused_pod_creation_is_reported_and_retried_later(cfg: OperatorConfig) -> None:
    run = run_body()
    plan = rec.creation_failed(observe(run), 'pods "demo-attempt-1" is forbidden: exceeded quota', code=403)
    new = applied(run, plan)
    assert conditions(new)["Scheduled"] == ("False", "PodCreateFailed")
    assert new["status"]["phase"] == "Pending" and new["status"].get("attempts", 0) == 0
    assert reasons(plan) == ["PodCreateFailed"]
