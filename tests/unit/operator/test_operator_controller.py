"""The controller between kopf and the reconcile, without a cluster: the pod-event handler, the
looks it queues again when one fails, and what a deleted pod's last state says. `MemoryApi`
stands in for the API client (optrun.operator.kube.Kube): it keeps the objects it is given, with
resourceVersions as the API server gives them, and fails the creates a test asks it to fail."""

from __future__ import annotations

import copy
import logging
import threading
from typing import Any

import kopf
import pytest

from optrun.operator import builders
from optrun.operator.controller import Controller
from optrun.operator.kube import ApiError
from optrun.operator.main import on_pod_event
from optrun.runtime.metrics import Metrics
from tests.support.waiting import wait_for
from tests.unit.operator.helpers import SPEC, UID, config, pod_body, result_message, run_body, stamp

POD_1, POD_2 = builders.pod_name("demo", 1), builders.pod_name("demo", 2)
SPEC_CM = builders.configmap_name("demo")


class MemoryApi:
    """The verbs of optrun.operator.kube.Kube the controller calls, on objects kept in memory.
    `failures[kind]`: what the next creates of that kind raise, one each, in order."""

    def __init__(self, run: dict[str, Any]) -> None:
        self.lock = threading.Lock()
        self.run = copy.deepcopy(run)
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}  # (kind, name) -> body
        self.failures: dict[str, list[Exception]] = {}
        self.created: list[tuple[str, str]] = []  # (kind, name) of each create that made an object
        self._rv = 1000

    def _stamp(self, body: dict[str, Any]) -> dict[str, Any]:
        self._rv += 1
        body["metadata"]["resourceVersion"] = str(self._rv)
        return copy.deepcopy(body)

    def create(self, manifest: dict[str, Any]) -> dict[str, Any] | None:
        kind, name = manifest["kind"], manifest["metadata"].get("name", "")
        with self.lock:
            pending = self.failures.get(kind)
            if pending:
                raise pending.pop(0)
            if kind == "Event":
                return copy.deepcopy(manifest)
            if (kind, name) in self.objects:
                return None  # 409 AlreadyExists, as Kube.create answers it
            self.objects[kind, name] = body = copy.deepcopy(manifest)
            self.created.append((kind, name))
            return self._stamp(body)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self.lock:
            found = self.objects.get((kind, name))
            return copy.deepcopy(found) if found is not None else None

    def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get("Pod", namespace, name)

    def delete_pod(self, namespace: str, name: str) -> None:
        with self.lock:
            self.objects.pop(("Pod", name), None)

    def replace_status(
        self, namespace: str, name: str, status: dict[str, Any], *, uid: str
    ) -> dict[str, Any]:
        with self.lock:
            assert uid == self.run["metadata"]["uid"]
            self.run["status"] = copy.deepcopy(status)
            return self._stamp(self.run)

    def delete_run(self, namespace: str, name: str, uid: str) -> None:
        raise AssertionError("no run here lives past its TTL")

    # --- what the kubelet and people do -------------------------------------------------------

    def kubelet_reports(self, name: str, status: dict[str, Any], *, deleting: bool = False) -> dict[str, Any]:
        """The pod's status as a kubelet writes it; the pod as the watch then shows it."""
        with self.lock:
            pod = self.objects["Pod", name]
            pod["spec"]["nodeName"] = "gpu-node-0"
            pod["status"] = copy.deepcopy(status)
            if deleting:
                pod["metadata"]["deletionTimestamp"] = stamp(1)
            return self._stamp(pod)

    def force_delete(self, name: str) -> dict[str, Any]:
        """`kubectl delete --force --grace-period=0`: gone at once; the watch's DELETED event
        carries the pod's last state."""
        with self.lock:
            return self._stamp(self.objects.pop(("Pod", name)))

    def pods(self) -> list[str]:
        with self.lock:
            return sorted(name for kind, name in self.objects if kind == "Pod")

    def status(self) -> dict[str, Any]:
        with self.lock:
            return copy.deepcopy(self.run.get("status") or {})


def _started(spec: dict[str, Any] | None = None) -> tuple[MemoryApi, Controller]:
    """A run whose attempt 1 the controller has started (its create handler's look)."""
    run = run_body(spec)
    api = MemoryApi(run)
    # Status written at once (no batch window): what a look decided is in `api` when it returns.
    controller = Controller(config(status_batch_seconds=0), api)  # type: ignore[arg-type]
    controller.converge(run, trigger="create")
    assert api.pods() == [POD_1] and api.status()["attempts"] == 1
    return api, controller


def _pod_event(controller: Controller, pod: dict[str, Any], kind: str = "MODIFIED") -> None:
    """What kopf calls for an event of one of the run's pods; kopf's pod index, filled from the
    same watch, holds the pod unless it was deleted."""
    body = kopf.Body(pod)
    on_pod_event(
        event={"type": kind, "object": pod},
        body=body,
        labels=body.metadata.labels,
        memo=kopf.Memo(controller=controller),
        optrun_pods={} if kind == "DELETED" else {UID: [pod]},
    )


def _failed_status(exit_code: int = 1) -> dict[str, Any]:
    container = {
        "name": builders.CONTAINER,
        "state": {"terminated": {"exitCode": exit_code, "reason": "Error"}},
    }
    return {
        "phase": "Failed",
        "conditions": [{"type": "PodScheduled", "status": "True"}],
        "containerStatuses": [container],
    }


def _busy(code: int) -> ApiError:
    return ApiError(
        code, "the server is busy", "", "POST", "/api/v1/namespaces/team-a/pods", retry_after=0.01
    )


# --- no swallowed error ---------------------------------------------------------------------------


def test_a_pod_event_whose_look_an_api_error_fails_is_looked_at_again_until_one_pod_is_made() -> None:
    api, controller = _started()
    api.failures["Pod"] = [_busy(503), _busy(429)]
    _pod_event(controller, api.kubelet_reports(POD_1, _failed_status()))
    # The event's look failed at attempt 2's pod; a Recovering run without a back-off has no
    # timer, and kopf never retries an event handler: only the controller's retries look again.
    assert api.pods() == [POD_1] and api.status()["attempts"] == 1
    wait_for(lambda: api.status().get("attempts") == 2, timeout=15, message="attempt 2 started by a retry")
    assert api.failures["Pod"] == []  # both failures were met: the first retry failed too
    # Attempt 2's pod made once; the spec ConfigMap found again (409), not made twice.
    assert api.created == [("ConfigMap", SPEC_CM), ("Pod", POD_1), ("Pod", POD_2)]
    assert api.status()["failedAttempts"] == 1


def test_a_pod_event_whose_look_fails_with_a_bug_is_logged_with_its_traceback_and_looked_at_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    api, controller = _started()
    controller.bug_delay = 0.05
    api.failures["Pod"] = [KeyError("a bug in the operator")]
    with caplog.at_level(logging.ERROR, logger="optrun.operator.main"):
        _pod_event(controller, api.kubelet_reports(POD_1, _failed_status()))  # kopf: logged, dropped
    (record,) = [r for r in caplog.records if r.name == "optrun.operator.main"]
    assert "will look again in 0.05s" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is KeyError
    wait_for(lambda: api.status().get("attempts") == 2, timeout=15, message="attempt 2 started by a retry")
    assert api.pods() == [POD_1, POD_2]


# --- a deleted pod's last state ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("condition", "counted"),
    [
        # kubectl drain: the Eviction API marks the pod, then someone force-deletes it.
        ({"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}, False),
        ({"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}, False),
        (None, True),  # deleted by a person, for no reason the cluster gave
    ],
    ids=["evicted", "preempted", "deleted"],
)
def test_a_running_pod_force_deleted_after_a_disruption_does_not_use_up_the_backoff_limit(
    condition: dict[str, Any] | None, counted: bool
) -> None:
    api, controller = _started({**copy.deepcopy(SPEC), "backoffLimit": 0})
    running = {
        "phase": "Running",
        "conditions": [{"type": "PodScheduled", "status": "True"}, *([condition] if condition else [])],
        "containerStatuses": [{"name": builders.CONTAINER, "state": {"running": {"startedAt": stamp(30)}}}],
    }
    _pod_event(controller, api.kubelet_reports(POD_1, running, deleting=condition is not None))
    _pod_event(controller, api.force_delete(POD_1), kind="DELETED")
    st = api.status()
    if counted:
        assert (st["phase"], st["failedAttempts"], api.pods()) == ("Failed", 1, [])
    else:
        assert (st["phase"], st["attempts"], st.get("failedAttempts", 0)) == ("Recovering", 2, 0)
        assert st["disruptedAttempts"] == 1 and api.pods() == [POD_2]


# --- a runtime that stops answering -------------------------------------------------------------


def test_a_runtime_that_ends_before_its_pod_event_arrives_is_judged_not_reported_unreachable() -> None:
    """The runtime served /metrics (real HTTP, the runtime's own Metrics), then its process ended
    and closed the port; the kubelet wrote the pod's final state, but the watch has not delivered
    it (its event lags, or the watch is down). The next look must not tell the user that the
    operator cannot reach the pod: it reads the pod itself and judges the finished attempt."""
    running = pod_body(config(), 1, "running")["status"]
    metrics_server = Metrics()
    metrics_server.set_stage("acceptance")
    port = metrics_server.serve(0, addr=running["podIP"])  # a loopback address, as the pod's IP
    run = run_body()
    api = MemoryApi(run)
    controller = Controller(config(status_batch_seconds=0, runtime_metrics_port=port), api)  # type: ignore[arg-type]
    controller.converge(run, trigger="create")
    seen = api.kubelet_reports(POD_1, running)

    def look() -> dict[str, Any]:
        # The timer's look, with kopf's pod index still showing the pod running.
        controller.converge(
            {**run, "status": api.status()}, trigger="timer", indexed_pods=[seen], scrape_metrics=True
        )
        return api.status()

    st = look()
    assert {c["type"]: c["status"] for c in st["conditions"]}["MetricsAvailable"] == "True"
    assert st["progress"]["stage"] == "acceptance"
    metrics_server.close()  # the runtime's process ends
    api.kubelet_reports(POD_1, pod_body(config(), 1, "succeeded", message=result_message())["status"])
    st = look()
    assert st["phase"] == "Succeeded" and st["decision"] == "GO", st
    reasons = {c["type"]: c.get("reason") for c in st["conditions"]}
    assert "MetricsAvailable" not in reasons and reasons["Running"] == "RuntimeFinished", reasons
