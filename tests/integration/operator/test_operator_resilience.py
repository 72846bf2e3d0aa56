"""The operator under failure: SIGKILLed at random points of runs' lives, an API server restarted
under it, and two replicas of which the active one dies."""

from __future__ import annotations

import json
import random
import re
import time
from typing import Any

import pytest
from kubernetes import client as k8s

from tests.integration.operator.conftest import Runs, tiny_spec
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

KILLS = 20


def one_pod_per_attempt(runs: Runs, name: str) -> None:
    """The invariant a crash must never break: pods are exactly attempts 1..n of the status, and
    (nothing fails in these runs) n is 1."""
    pods = [p.metadata.name for p in runs.pods(name)]
    assert pods in ([], [f"{name}-attempt-1"]), pods
    assert runs.status(name).get("attempts", 0) in (0, 1), runs.status(name)


@pytest.mark.slow
def test_operator_sigkilled_20_times_never_makes_a_second_pod_and_every_run_finishes(
    start_operator: Any, runs: Runs, namespace: str
) -> None:
    operator = start_operator(namespace)
    rng = random.Random(20)  # the kill points are random, and the same on every run of the test
    names: list[str] = []
    kills = 0
    while kills < KILLS or (names and runs.status(names[-1]).get("phase") not in ("Succeeded", "Failed")):
        # One runtime at a time (two would share the 2 CPUs and each take twice as long): the
        # next run starts when the previous one is over.
        if not names or runs.status(names[-1]).get("phase") in ("Succeeded", "Failed"):
            names.append(f"crash-{len(names)}")
            runs.create(names[-1])
            if kills < KILLS and rng.random() < 0.5:
                # Right after creation: before, during or after the create handler.
                time.sleep(rng.uniform(0, 0.3))
                operator.kill()
                kills += 1
                for name in names:
                    one_pod_per_attempt(runs, name)
                operator.start()
                continue
        if kills >= KILLS:
            runs.wait_phase(names[-1], "Succeeded", "Failed", timeout=180)
            break
        time.sleep(rng.uniform(0.1, 1.5))
        operator.kill()
        kills += 1
        for name in names:
            one_pod_per_attempt(runs, name)
        operator.start()

    for name in names:
        status = runs.wait_phase(name, "Succeeded", "Failed", timeout=120)
        assert status["phase"] == "Succeeded", (name, status.get("message"))
        assert status["attempts"] == 1 and status.get("failedAttempts", 0) == 0, status
        one_pod_per_attempt(runs, name)
        assert status["decision"] in ("GO", "CONDITIONAL_GO"), status
    assert kills == KILLS and operator.starts == KILLS + 1
    assert len(names) >= 2, "the kills were spread over several runs"


def refused_tries(operator: Any, resource: str) -> int:
    """How many times in a row kopf has tried the watch of `resource` again (its log counts them)."""
    pattern = rf"Request attempt #(\d+) failed; will retry: GET \S+/{resource}\?watch=true"
    return max((int(n) for n in re.findall(pattern, operator.log.read_text(errors="replace"))), default=0)


@pytest.mark.slow
def test_api_server_restarted_and_refusing_past_kopfs_retries_the_operator_waits_it_out_and_the_run_finishes(
    start_operator: Any, runs: Runs, cluster: Any, kube: Any, namespace: str
) -> None:
    # At most 1 s between two tries of a failed request: kopf's default gives a request up after 8
    # retries (54 s), here spent in under 10 s; a refused status write is tried again after 1 s.
    operator = start_operator(namespace, api_retry_max_seconds=1)
    runs.create("through-restart")
    runs.wait_phase("through-restart", "Running")
    # The restarted API server refuses the operator (403) until the binding is back, as one whose
    # authorizer is still warming up does: a refused watch is not a dropped connection, and kopf
    # used to end that resource's watcher for good (the process up, no pod event ever again).
    rbac_api = k8s.RbacAuthorizationV1Api(kube)
    binding = rbac_api.read_namespaced_role_binding("optrun-operator", namespace)
    binding.metadata = k8s.V1ObjectMeta(name=binding.metadata.name, labels=binding.metadata.labels)
    rbac_api.delete_namespaced_role_binding("optrun-operator", namespace)
    cluster.restart_apiserver()
    # The harness records the new process, so a detached cluster is stopped by the right pid.
    state = json.loads((cluster.workdir / "state.json").read_text())
    assert state["processes"]["kube-apiserver"]["pid"] == cluster.processes["kube-apiserver"].pid
    wait_for(
        lambda: min(refused_tries(operator, r) for r in ("pods", "optimizationruns")) > 9,
        timeout=90,
        message=lambda: f"both watches refused more than 9 times in a row: {operator.tail(1500)}",
    )
    rbac_api.create_namespaced_role_binding(namespace, binding)
    status = runs.wait_phase("through-restart", "Succeeded", "Failed", timeout=180)
    assert status["phase"] == "Succeeded", status.get("message")
    assert status["attempts"] == 1
    assert operator.alive and operator.starts == 1, "the same operator process saw it through"
    # And both watches still deliver events: a new run (its watch) gets a pod (the pod watch
    # reports it scheduled in the run's status).
    runs.create("after-restart")
    runs.wait_phase("after-restart", "Running", "Succeeded")


def test_standby_replica_takes_over_when_the_active_one_is_killed(
    start_operator: Any, runs: Runs, kube: Any, namespace: str
) -> None:
    lifetime = 6
    k8s.CustomObjectsApi(kube).create_namespaced_custom_object(  # the chart creates it
        "kopf.dev",
        "v1",
        namespace,
        "kopfpeerings",
        {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "optrun"}},
    )
    settings = {"peering_mode": "mandatory", "peering_lifetime_seconds": lifetime}
    active = start_operator(namespace, name="replica-a", **settings)
    standby = start_operator(namespace, name="replica-b", grant=False, **settings)
    peering = k8s.CustomObjectsApi(kube)

    def both_replicas_keep_alive() -> bool:
        got = peering.get_namespaced_custom_object("kopf.dev", "v1", namespace, "kopfpeerings", "optrun")
        return len(got.get("status") or {}) == 2

    wait_for(both_replicas_keep_alive, timeout=30, message="both replicas' keep-alives in the KopfPeering")

    # Runs that stay Pending (no runtime needed): only the active replica acts.
    runs.create("before", tiny_spec(workload={"batchSize": 16}, resources={"gpus": 16}))
    wait_for(lambda: runs.pods("before"), message="the active replica to create the pod")
    assert "optrun_operator_attempts_total 1.0" in active.metrics()
    assert "optrun_operator_attempts_total 0.0" in standby.metrics()

    active.kill()
    killed = time.monotonic()
    runs.create("after", tiny_spec(workload={"batchSize": 16}, resources={"gpus": 16}))
    wait_for(lambda: runs.pods("after"), timeout=lifetime * 4 + 30, message=standby.tail)
    takeover = time.monotonic() - killed
    print(f"takeover after SIGKILL: {takeover:.1f}s (peering lifetime {lifetime}s)")
    # The new active replica resumed the run it had only watched, without a second pod. (The
    # killed replica may not have written the run's status: its writes are batched for a second.)
    wait_for(lambda: runs.status("before").get("attempts") == 1, message="status.attempts of 'before'")
    assert [p.metadata.name for p in runs.pods("before")] == ["before-attempt-1"]
    assert "optrun_operator_attempts_total 1.0" in standby.metrics()
