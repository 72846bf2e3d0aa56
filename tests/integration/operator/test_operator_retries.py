"""Retries that fit a cluster, on the real control plane with the real runtime: a disrupted pod does
not use up backoffLimit, an image that cannot be pulled is named within seconds, failed attempts
are spaced by a back-off, a pod whose /metrics the operator cannot reach is not killed as hung
(and a truly hung one is ended by the runtime's own watchdog), and an ignored spec edit does not
advance observedGeneration."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.integration.operator.conftest import Runs, free_port, tiny_spec
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration


def condition(runs: Runs, name: str, type_: str) -> dict[str, Any]:
    return runs.conditions(name).get(type_) or {}


@pytest.mark.slow
def test_an_evicted_pod_restarts_the_attempt_without_using_up_the_backoff_limit(
    start_operator: Any, runs: Runs, cluster: Any, namespace: str
) -> None:
    start_operator(namespace)
    # backoffLimit 0: a single counted failure would fail the run. From step 6 on each step takes
    # 0.3 s more (7 s to the end of training), so the pod is surely training when it is evicted,
    # and it checkpoints and leaves at the end of its current step.
    slow_steps = [{"type": "stall", "atStep": 6, "persistent": True, "durationSeconds": 0.3}]
    spec = tiny_spec(backoffLimit=0, faults=slow_steps)
    spec["training"]["stepsPerEpoch"] = 30
    runs.create("drained", spec)
    wait_for(
        lambda: ((runs.status("drained").get("progress") or {}).get("step") or 0) >= 8,
        timeout=90,
        message=lambda: f"training progress {runs.status('drained')}",
    )
    api = cluster.api()
    pod = f"/api/v1/namespaces/{namespace}/pods/drained-attempt-1"
    # What `kubectl drain` causes on a 1.26+ API server: the Eviction API marks the pod with
    # DisruptionTarget, then deletes it (the 1.20 test server only deletes, so the mark is put on
    # here, as the newer server would).
    api.request(
        "PATCH",
        f"{pod}/status",
        body={
            "status": {
                "conditions": [
                    {
                        "type": "DisruptionTarget",
                        "status": "True",
                        "reason": "EvictionByEvictionAPI",
                        "message": "Eviction API: evicting",
                        "lastTransitionTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    }
                ]
            }
        },
        content_type="application/strategic-merge-patch+json",
    )
    api.create(
        f"{pod}/eviction",
        {"apiVersion": "policy/v1beta1", "kind": "Eviction", "metadata": {"name": "drained-attempt-1"}},
    )
    status = runs.wait_phase("drained", "Succeeded", "Failed", timeout=180)
    assert status["phase"] == "Succeeded", status["message"]
    assert (status["attempts"], status.get("failedAttempts", 0), status["disruptedAttempts"]) == (2, 0, 1)
    assert [p.metadata.name for p in runs.pods("drained")] == ["drained-attempt-2"]
    runs.wait_events("drained", "Evicted")


def test_an_image_that_cannot_be_pulled_is_named_in_a_condition_within_seconds(
    start_operator: Any, runs: Runs, namespace: str
) -> None:
    start_operator(namespace, image_pull_timeout_seconds=6)
    image = "registry.invalid/optrun-runtime:0.1.0"  # .invalid: no kubelet can resolve it
    created = time.monotonic()
    runs.create("unpullable", tiny_spec(image=image, backoffLimit=0))

    def named() -> dict[str, Any] | None:
        c = condition(runs, "unpullable", "Running")
        return c if c.get("reason") in ("ErrImagePull", "ImagePullBackOff") else None

    running = wait_for(
        named, timeout=15, interval=0.25, message=lambda: f"the image named: {runs.status('unpullable')}"
    )
    seconds = time.monotonic() - created
    assert running["status"] == "False" and image in running["message"], running
    print(f"image pull failure named {seconds:.1f}s after the run was created")
    assert runs.status("unpullable")["phase"] == "Pending"
    runs.wait_events("unpullable", running["reason"])
    # After imagePullTimeoutSeconds the operator ends the attempt; backoffLimit 0 ends the run.
    status = runs.wait_phase("unpullable", "Failed", timeout=60)
    failed = condition(runs, "unpullable", "Failed")
    assert failed["reason"] == "BackoffLimitExceeded"
    assert "ImagePull" in failed["message"] and image in failed["message"], failed
    assert status["failedAttempts"] == 1


def test_failed_attempts_are_spaced_by_the_back_off(start_operator: Any, runs: Runs, namespace: str) -> None:
    start_operator(namespace, retry_backoff_seconds=4)
    # An exception at every training step: every attempt's runtime fails (a model that cannot
    # be loaded would not do: it is a NO_GO result, infra.sources-valid, not a failed attempt).
    spec = tiny_spec(backoffLimit=1, faults=[{"type": "exception", "atStep": 0, "persistent": True}])
    runs.create("crashing", spec)

    def backing_off() -> dict[str, Any] | None:
        st = runs.status("crashing")
        return st if st.get("nextAttemptTime") else None

    st = wait_for(backing_off, timeout=60, message=lambda: f"the back-off: {runs.status('crashing')}")
    assert st["phase"] == "Recovering" and st["failedAttempts"] == 1 and st["attempts"] == 1
    status = runs.wait_phase("crashing", "Failed", timeout=90)
    assert condition(runs, "crashing", "Failed")["reason"] == "BackoffLimitExceeded"
    assert status["attempts"] == 2
    first, second = runs.pods("crashing")
    finished = first.status.container_statuses[0].state.terminated.finished_at
    gap = (second.metadata.creation_timestamp - finished).total_seconds()
    assert gap >= 3, f"attempt 2 was created {gap:.0f}s after attempt 1 ended (back-off 4 s)"


@pytest.mark.slow
def test_a_pod_whose_metrics_cannot_be_reached_is_not_killed_as_hung(
    start_operator: Any, runs: Runs, namespace: str
) -> None:
    # The runtime listens on 127.0.0.1 only while the operator scrapes the pod IP: as if a
    # NetworkPolicy dropped the operator's scrapes.
    start_operator(
        namespace,
        runtime_metrics_address="127.0.0.1",
        runtime_metrics_port=free_port(),
        runtime_startup_seconds=3,
    )
    # Healthy but slow: every step from step 2 on takes 1.5 s more, 27 s in all, longer than
    # hangTimeoutSeconds (24 s) with progress every 1.5 s, so the runtime's own watchdog never
    # sees a hang (on a busy 2-core machine a stage can go 15 s without progress; 24 s is above).
    hang_timeout = 24
    slow_steps = [{"type": "stall", "atStep": 2, "persistent": True, "durationSeconds": 1.5}]
    spec = tiny_spec(safety={"hangTimeoutSeconds": hang_timeout}, faults=slow_steps, backoffLimit=0)
    runs.create("unobserved", spec)

    def unreachable() -> dict[str, Any] | None:
        c = condition(runs, "unobserved", "MetricsAvailable")
        return c if c.get("status") == "False" else None

    metrics = wait_for(
        unreachable, timeout=90, message=lambda: f"MetricsAvailable=False: {runs.status('unobserved')}"
    )
    assert metrics["reason"] == "MetricsUnreachable" and "hang gate is off" in metrics["message"]
    status = runs.wait_phase("unobserved", "Succeeded", "Failed", timeout=180)
    # Longer than hangTimeoutSeconds + the startup allowance with no progress seen: the old
    # operator ended it as hung; now it finishes, judged.
    assert status["phase"] == "Succeeded", status["message"]
    assert status["attempts"] == 1 and status["decision"] in ("GO", "CONDITIONAL_GO", "NO_GO")
    # It really was unobserved for longer than the hang gate allows (past a scrape interval).
    (pod,) = runs.pods("unobserved")
    ran = pod.status.container_statuses[0].state.terminated
    lived = (ran.finished_at - ran.started_at).total_seconds()
    assert lived > hang_timeout + 2, (
        f"the runtime ran {lived:.0f}s, not past hangTimeoutSeconds {hang_timeout}"
    )
    runs.wait_events("unobserved", "MetricsUnreachable")


@pytest.mark.slow
def test_a_truly_hung_runtime_unobserved_is_ended_by_its_own_watchdog_with_the_reason(
    start_operator: Any, runs: Runs, namespace: str
) -> None:
    start_operator(
        namespace,
        runtime_metrics_address="127.0.0.1",
        runtime_metrics_port=free_port(),
        runtime_startup_seconds=3,
    )
    spec = tiny_spec(
        safety={"hangTimeoutSeconds": 5},
        faults=[{"type": "stall", "atStep": 3, "durationSeconds": 300}],
        backoffLimit=0,
    )
    runs.create("hung", spec)
    status = runs.wait_phase("hung", "Failed", "Succeeded", timeout=120)
    assert status["phase"] == "Failed"
    failed = condition(runs, "hung", "Failed")
    assert failed["reason"] == "BackoffLimitExceeded"
    assert "HangDetected: no progress for" in failed["message"] and "watchdog" in failed["message"], failed
    assert condition(runs, "hung", "SafetyGatesPassed")["reason"] == "HangDetected"
    (pod,) = runs.pods("hung")
    assert pod.status.container_statuses[0].state.terminated.exit_code == 124, "ended by itself, not deleted"


def test_an_ignored_edit_of_a_started_run_does_not_advance_observed_generation(
    start_operator: Any, runs: Runs, namespace: str
) -> None:
    start_operator(namespace)  # no webhook: the edit gets into the stored object
    runs.create(
        "edited", tiny_spec(workload={"batchSize": 16}, resources={"gpus": 16})
    )  # stays Pending: no runtime needed
    wait_for(lambda: runs.status("edited").get("observedGeneration") == 1, message="generation 1 acted on")
    runs.patch_spec("edited", {"training": {"epochs": 4}})
    runs.wait_events("edited", "SpecChangeIgnored")
    assert runs.get("edited")["metadata"]["generation"] == 2
    assert runs.status("edited")["observedGeneration"] == 1
    assert all(c.get("observedGeneration") == 1 for c in runs.status("edited")["conditions"])
    # Put back, the spec is what the run does again.
    runs.patch_spec("edited", {"training": {"epochs": 1}})
    wait_for(lambda: runs.status("edited").get("observedGeneration") == 3, message="generation 3 acted on")
