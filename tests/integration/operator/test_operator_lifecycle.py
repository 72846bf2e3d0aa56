"""A run's life on the real control plane, the operator acting with only its chart RBAC rules and
the node agent running the real runtime: success, NO_GO, safety gates, retries, suspend,
deadline, deletion, scheduling."""

from __future__ import annotations

import os
import re
import signal
from typing import Any

import pytest
from kubernetes import client as k8s

from tests.integration.operator.conftest import Runs, pvc, tiny_spec
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

ALL_CONDITIONS = {"Ready", "Scheduled", "Running", "SafetyGatesPassed", "AcceptancePassed", "Complete"}


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of Prometheus text by name and labels (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        base, _, rest = key.partition("{")
        got = ",".join(sorted(p for p in rest.rstrip("}").split(",") if p))
        if base == name and got == want:
            return float(value)
    return 0.0


@pytest.mark.slow
def test_small_run_goes_pending_running_succeeded_with_go_ready_and_the_runtime_finished(
    start_operator: Any, runs: Runs, kubectl: Any, namespace: str
) -> None:
    operator = start_operator(namespace)
    runs.create("small")
    seen = {runs.wait_phase("small", "Pending", "Running", "Succeeded")["phase"]}
    seen.add(runs.wait_phase("small", "Running", "Succeeded")["phase"])
    status = runs.wait_phase("small", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded", status
    assert seen & {"Pending", "Running"}, "the run was seen on its way"
    assert status["decision"] == "GO", status["message"]
    conditions = runs.conditions("small")
    assert set(conditions) == ALL_CONDITIONS
    # A finished run: Ready (kstatus, Flux, Argo CD read it), the runtime no longer running.
    assert {t: c["status"] for t, c in conditions.items()} == {
        **dict.fromkeys(ALL_CONDITIONS, "True"),
        "Running": "False",
    }
    assert conditions["Running"]["reason"] == "RuntimeFinished"
    assert conditions["Ready"]["reason"] == "DecisionGo"
    assert all(c["observedGeneration"] == 1 for c in conditions.values())
    assert conditions["Complete"]["reason"] == "DecisionGo"
    assert status["attempts"] == 1 and status["podName"] == "small-attempt-1"
    assert status["acceptance"]["collected"] > 0 and status["passRate"] >= 0.85
    assert status["startTime"] <= status["completionTime"]
    assert status["progress"]["stage"] == "done"

    table = kubectl("get", "optruns", "-n", namespace).stdout
    header, row = table.splitlines()[:2]
    assert header.split() == ["NAME", "PHASE", "DECISION", "PASS", "RATE", "AGE"]
    assert row.split()[:3] == ["small", "Succeeded", "GO"]
    wide = kubectl("get", "optruns", "-n", namespace, "-o", "wide").stdout
    assert "small-attempt-1" in wide and "ATTEMPTS" in wide

    described = kubectl("describe", "optrun", "small", "-n", namespace).stdout
    for reason in ("DecisionGo", "GatesHeld", "AcceptanceTargetMet", "RuntimeStarted"):
        assert reason in described, described
    runs.wait_events("small", "AttemptStarted", "Scheduled", "RuntimeStarted", "DecisionGo")
    described = kubectl("describe", "optrun", "small", "-n", namespace).stdout
    assert re.search(r"Events:.*AttemptStarted.*DecisionGo", described, re.S), described

    # The operator's own metrics saw it.
    text = operator.metrics()
    assert metric(text, "optrun_operator_runs", phase="Succeeded") == 1
    assert metric(text, "optrun_operator_decisions_total", decision="GO") == 1
    assert metric(text, "optrun_operator_attempts_total") == 1
    assert metric(text, "optrun_operator_reconcile_duration_seconds_count", trigger="create") >= 1
    assert metric(text, "optrun_operator_api_requests_total", verb="post", resource="pods") == 1


@pytest.mark.slow
def test_failing_acceptance_is_no_go_with_the_failing_tests_in_status(
    start_operator: Any, runs: Runs, namespace: str
) -> None:
    start_operator(namespace)
    runs.create("strict", tiny_spec(training={"targetAccuracy": 0.99}))
    status = runs.wait_phase("strict", "Succeeded", "Failed")
    assert (status["phase"], status["decision"]) == ("Succeeded", "NO_GO")
    cond = runs.conditions("strict")
    assert (cond["AcceptancePassed"]["status"], cond["AcceptancePassed"]["reason"]) == (
        "False",
        "CriticalTestsFailed",
    )
    assert cond["Complete"]["reason"] == "DecisionNoGo"
    failures = {f["name"]: f for f in status["acceptance"]["failures"]}
    accuracy = failures["e2e.target-accuracy"]
    assert accuracy["critical"] is True
    assert accuracy["expected"] == ">= 0.99"
    assert isinstance(accuracy["measured"], float) and accuracy["measured"] < 0.99
    runs.wait_events("strict", "DecisionNoGo")


@pytest.mark.slow
def test_persistent_non_finite_loss_fails_the_safety_gates_with_a_searchable_reason(
    start_operator: Any, runs: Runs, namespace: str
) -> None:
    start_operator(namespace)
    spec = tiny_spec(
        faults=[{"type": "nan-loss", "atStep": 6, "persistent": True}],
        safety={"nonFiniteLoss": "rollback", "maxRecoveries": 1},
    )
    runs.create("nan", spec)
    status = runs.wait_phase("nan", "Succeeded", "Failed")
    safety = runs.conditions("nan")["SafetyGatesPassed"]
    assert safety["status"] == "False"
    assert safety["reason"] == "RecoveryBudgetExhausted", safety
    assert "maxRecoveries 1" in safety["message"]
    assert status.get("decision") in (None, "NO_GO")
    runs.wait_events("nan", "RecoveryBudgetExhausted")


@pytest.mark.slow
def test_runtime_killed_mid_training_resumes_from_its_checkpoint_in_a_second_attempt(
    start_operator: Any, runs: Runs, kube: Any, namespace: str, node_agent: Any
) -> None:
    start_operator(namespace)
    claim = pvc(kube, namespace)
    runs.create(
        "resumed",
        # Long enough that the pod is still training when the suspension's SIGTERM arrives on a
        # quiet machine (40 steps could finish first, and the run then ends in one attempt).
        tiny_spec(training={"stepsPerEpoch": 200, "checkpoint": {"everySteps": 5, "claimName": claim}}),
    )

    def trained_past_a_checkpoint() -> bool:
        progress = runs.status("resumed").get("progress") or {}
        return (progress.get("step") or 0) >= 12

    wait_for(
        trained_past_a_checkpoint, timeout=90, message=lambda: f"training progress {runs.status('resumed')}"
    )
    pid = node_agent.container_pid(namespace, "resumed-attempt-1", "runtime")
    os.killpg(pid, signal.SIGKILL)

    status = runs.wait_phase("resumed", "Succeeded", "Failed", timeout=180)
    assert status["phase"] == "Succeeded", status["message"]
    assert (status["attempts"], status["failedAttempts"]) == (2, 1)
    assert [p.metadata.name for p in runs.pods("resumed")] == ["resumed-attempt-1", "resumed-attempt-2"]
    first, _ = runs.pods("resumed")
    assert first.status.container_statuses[0].state.terminated.exit_code == 137
    log = node_agent.container_log(namespace, "resumed-attempt-2", "runtime")
    resumed_at = [int(s) for s in re.findall(r"resumed from \S+ \(epoch \d+, step (\d+)\)", log)]
    assert resumed_at and resumed_at[0] >= 5, log[-2000:]
    reasons = runs.wait_events("resumed", "AttemptStarted", "RuntimeError")
    assert reasons.count("AttemptStarted") == 2


def test_a_run_that_cannot_be_scheduled_says_so_within_seconds(
    start_operator: Any, runs: Runs, namespace: str
) -> None:
    start_operator(namespace)
    runs.create("huge", tiny_spec(workload={"batchSize": 16}, resources={"gpus": 16}))

    def unschedulable() -> dict[str, Any] | None:
        c = runs.conditions("huge").get("Scheduled")
        return c if c and c["status"] == "False" else None

    cond = wait_for(unschedulable, timeout=15, message="Scheduled=False on the run")
    assert cond["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in cond["message"]
    assert runs.status("huge")["phase"] == "Pending"
    runs.wait_events("huge", "Unschedulable")


def test_deleting_a_run_removes_its_pod_and_configmap(
    start_operator: Any, runs: Runs, namespace: str
) -> None:
    start_operator(namespace)
    runs.create(
        "doomed", tiny_spec(workload={"batchSize": 16}, resources={"gpus": 16})
    )  # stays Pending: no runtime needed
    wait_for(lambda: runs.pods("doomed"), message="the run's pod")
    core = runs.core
    assert core.read_namespaced_config_map("doomed-spec", namespace).immutable is True
    runs.delete("doomed")

    def children_gone() -> bool:
        cms = core.list_namespaced_config_map(namespace, label_selector="optrun.io/run=doomed").items
        return not runs.pods("doomed") and not cms

    wait_for(children_gone, timeout=60, message="the garbage collector to remove the children")
    wait_for(
        lambda: (
            not runs.objects.list_namespaced_custom_object(
                "optrun.io", "v1alpha1", namespace, "optimizationruns"
            )["items"]
        ),
        message="the run itself (the operator's finalizer released)",
    )


@pytest.mark.slow
def test_suspend_stops_the_pod_keeps_the_checkpoint_and_resume_finishes_the_run(
    start_operator: Any, runs: Runs, kube: Any, namespace: str, node_agent: Any
) -> None:
    start_operator(namespace)
    claim = pvc(kube, namespace)
    runs.create(
        "paused",
        # From step 6 on each step takes 0.25 s more (7.5 s to the end of training), so the pod
        # is surely training when the suspension's SIGTERM arrives (a tiny run trains 200 steps in
        # a second or two on a quiet machine, faster than its progress reaches status); the
        # runtime checkpoints at the end of its current step, well within its grace period.
        tiny_spec(
            training={"stepsPerEpoch": 36, "checkpoint": {"everySteps": 5, "claimName": claim}},
            faults=[{"type": "stall", "atStep": 6, "persistent": True, "durationSeconds": 0.25}],
        ),
    )
    wait_for(
        lambda: ((runs.status("paused").get("progress") or {}).get("step") or 0) >= 8,
        timeout=90,
        message=lambda: f"training progress {runs.status('paused')}",
    )
    runs.patch_spec("paused", {"suspend": True})
    status = runs.wait_phase("paused", "Suspended")
    assert runs.conditions("paused")["Running"]["reason"] == "Suspended"
    wait_for(lambda: not runs.pods("paused"), timeout=60, message="the suspended run's pod to be gone")
    log = node_agent.container_log(namespace, "paused-attempt-1", "runtime")
    assert re.search(r"received signal 15: checkpointing", log), log[-1500:]

    runs.patch_spec("paused", {"suspend": False})
    # A bound, not a wait: the second attempt runs every stage again, minutes on a loaded 2-core CI host.
    status = runs.wait_phase("paused", "Succeeded", "Failed", timeout=360)
    assert status["phase"] == "Succeeded", status["message"]
    assert status["attempts"] == 2 and status.get("failedAttempts", 0) == 0
    runs.wait_events("paused", "Suspended", "Resumed")
    resumed = node_agent.container_log(namespace, "paused-attempt-2", "runtime")
    assert re.search(r"resumed from \S+ \(epoch \d+, step [1-9]\d*\)", resumed), resumed[-1500:]


@pytest.mark.slow
def test_a_deadline_ends_a_run(start_operator: Any, runs: Runs, namespace: str) -> None:
    start_operator(namespace)
    spec = tiny_spec(activeDeadlineSeconds=8, faults=[{"type": "stall", "atStep": 3, "durationSeconds": 120}])
    runs.create("late", spec)
    status = runs.wait_phase("late", "Failed", "Succeeded", timeout=60)
    assert status["phase"] == "Failed"
    failed = runs.conditions("late")["Failed"]
    assert failed["reason"] == "DeadlineExceeded" and "activeDeadlineSeconds 8" in failed["message"]
    runs.wait_no_live_pods()


@pytest.mark.slow
def test_no_progress_for_the_hang_timeout_ends_the_attempt(
    start_operator: Any, runs: Runs, namespace: str
) -> None:
    start_operator(namespace)
    spec = tiny_spec(
        safety={"hangTimeoutSeconds": 5},
        faults=[{"type": "stall", "atStep": 3, "durationSeconds": 120}],
        backoffLimit=0,
    )
    runs.create("stuck", spec)
    status = runs.wait_phase("stuck", "Failed", "Succeeded", timeout=90)
    assert status["phase"] == "Failed"
    cond = runs.conditions("stuck")
    assert cond["Failed"]["reason"] == "BackoffLimitExceeded" and "HangDetected" in cond["Failed"]["message"]
    assert cond["SafetyGatesPassed"]["reason"] == "HangDetected"
    runs.wait_events("stuck", "HangDetected")


def test_cluster_wide_operator_with_only_the_cluster_role_handles_a_run_and_peers(
    start_operator: Any, runs: Runs, kube: Any, namespace: str
) -> None:
    peering = k8s.CustomObjectsApi(kube)
    name = f"optrun-{namespace}"[:63]
    peering.create_cluster_custom_object(  # the chart creates it
        "kopf.dev",
        "v1",
        "clusterkopfpeerings",
        {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": name}},
    )
    try:
        start_operator(namespace, clusterwide=True, peering_mode="mandatory", peering_name=name)
        runs.create("anywhere", tiny_spec(workload={"batchSize": 16}, resources={"gpus": 16}))
        wait_for(lambda: runs.pods("anywhere"), message="the cluster-wide operator to create the pod")
        wait_for(
            lambda: (runs.conditions("anywhere").get("Scheduled") or {}).get("reason") == "Unschedulable",
            message="the Unschedulable condition",
        )
        keepalives = peering.get_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", name).get(
            "status"
        )
        assert keepalives and len(keepalives) == 1, keepalives
    finally:
        peering.delete_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", name)
