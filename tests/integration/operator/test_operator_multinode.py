"""A multi-node run on the real control plane: one pod per node, the headless Service, a real
torchrun c10d rendezvous between the pods (the node agent resolves their hostnames as cluster
DNS would), one decision from pod 0, and a pod killed mid-run restarting the whole group from
the shared checkpoint."""

from __future__ import annotations

import json
import os
import re
import signal
from typing import Any

import pytest
from kubernetes import client as k8s

from tests.integration.operator.conftest import Runs, free_port, pvc, tiny_spec
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration


def two_nodes(claim: str, steps: int, **changes: Any) -> dict[str, Any]:
    # gloo on the CPU, one rank per pod: a world of 2 over two pods.
    return tiny_spec(
        distributed={"nodes": 2, "processesPerNode": 1, "timeoutSeconds": 60},
        training={"stepsPerEpoch": steps, "checkpoint": {"everySteps": 5, "keep": 2, "claimName": claim}},
        resources={"gpus": 0, "cpu": "1", "memory": "2Gi"},
        **changes,
    )


def report(node_agent: Any, namespace: str, claim: str) -> dict[str, Any]:
    """Rank 0's report, on the claim both pods share (the agent keeps a directory per claim)."""
    return dict(json.loads((node_agent.state_dir / "pvcs" / namespace / claim / "report.json").read_text()))


@pytest.mark.slow
def test_two_nodes_rendezvous_for_real_and_end_in_one_decision(
    start_operator: Any, runs: Runs, kube: Any, namespace: str, node_agent: Any
) -> None:
    start_operator(namespace, rendezvous_port=free_port())
    claim = pvc(kube, namespace, access_modes=("ReadWriteMany",))
    body = runs.create("pair", two_nodes(claim, steps=10))
    status = runs.wait_phase("pair", "Succeeded", "Failed", timeout=240)
    assert status["phase"] == "Succeeded", status.get("message")
    assert status["decision"] in ("GO", "CONDITIONAL_GO", "NO_GO")
    assert status["attempts"] == 1 and status["pods"] == ["pair-attempt-1-0", "pair-attempt-1-1"]
    assert status["podName"] == "pair-attempt-1-0"

    pods = runs.pods("pair")
    assert [p.metadata.name for p in pods] == ["pair-attempt-1-0", "pair-attempt-1-1"]
    assert [(p.spec.hostname, p.spec.subdomain) for p in pods] == [("pair-0", "pair"), ("pair-1", "pair")]
    assert {p.metadata.labels["kueue.x-k8s.io/pod-group-name"] for p in pods} == {"pair-attempt-1"}
    assert {p.metadata.annotations["kueue.x-k8s.io/pod-group-total-count"] for p in pods} == {"2"}
    # Both pods finished by themselves: pod 1 left once training was done, pod 0 wrote the result.
    assert [p.status.phase for p in pods] == ["Succeeded", "Succeeded"]

    svc = k8s.CoreV1Api(kube).read_namespaced_service("pair", namespace)
    assert svc.spec.cluster_ip == "None"
    assert [(o.kind, o.uid) for o in svc.metadata.owner_references] == [
        ("OptimizationRun", body["metadata"]["uid"])
    ]

    # The two ranks met: rank 0's report says so, and is the result the run was judged on.
    got = report(node_agent, namespace, claim)
    assert got["distributed"]["worldSize"] == 2 and got["distributed"]["nodes"] == 2
    assert got["decision"] == status["decision"]
    ranks = got["details"]["train"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["steps"] > 0 for r in ranks)
    # DDP replicas end identical: the gradients really were all-reduced between the pods.
    assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"]
    # Global rank 0 is on pod 0, which hosted the rendezvous.
    for index in (0, 1):
        log = node_agent.container_log(namespace, f"pair-attempt-1-{index}", "runtime")
        assert f"rank {index} of 2" in log, log[-2000:]


@pytest.mark.slow
def test_one_pod_killed_mid_run_restarts_the_group_from_the_checkpoint(
    start_operator: Any, runs: Runs, kube: Any, namespace: str, node_agent: Any
) -> None:
    start_operator(namespace, rendezvous_port=free_port())
    claim = pvc(kube, namespace, access_modes=("ReadWriteMany",))
    # From step 10 on each step takes 0.15 s more on every rank (6 s to the end of training), so
    # the group is surely training when pod 1 is killed, and attempt 2 has few steps left.
    slow_steps = [{"type": "stall", "atStep": 10, "persistent": True, "durationSeconds": 0.15}]
    runs.create("group", two_nodes(claim, steps=50, faults=slow_steps))

    def trained_past_a_checkpoint() -> bool:
        progress = runs.status("group").get("progress") or {}
        return (progress.get("step") or 0) >= 12

    wait_for(
        trained_past_a_checkpoint, timeout=180, message=lambda: f"training progress {runs.status('group')}"
    )
    os.killpg(node_agent.container_pid(namespace, "group-attempt-1-1", "runtime"), signal.SIGKILL)

    status = runs.wait_phase("group", "Succeeded", "Failed", timeout=300)
    assert status["phase"] == "Succeeded", status.get("message")
    assert (status["attempts"], status["failedAttempts"]) == (2, 1)
    assert status["pods"] == ["group-attempt-2-0", "group-attempt-2-1"]
    names = [p.metadata.name for p in runs.pods("group")]
    # The operator stopped pod 0 of attempt 1 (deleted, so gone); the killed pod stays, Failed. Pod 1
    # of attempt 2 may still be leaving torchrun's exit barrier when pod 0's result is in: the
    # operator deletes what still runs of a finished run.
    assert names[:2] == ["group-attempt-1-1", "group-attempt-2-0"], names
    assert set(names) <= {"group-attempt-1-1", "group-attempt-2-0", "group-attempt-2-1"}, names
    killed = runs.pods("group")[0]
    assert killed.status.container_statuses[0].state.terminated.exit_code == 137
    # Every pod of attempt 2 resumed from the checkpoint attempt 1 left on the shared claim.
    for pod in ("group-attempt-2-0", "group-attempt-2-1"):
        log = node_agent.container_log(namespace, pod, "runtime")
        resumed_at = [int(s) for s in re.findall(r"resumed from \S+ \(epoch \d+, step (\d+)\)", log)]
        assert resumed_at and resumed_at[0] >= 5, log[-2000:]
    assert report(node_agent, namespace, claim)["distributed"]["worldSize"] == 2
    failed = runs.wait_events("group", "AttemptStarted", "RuntimeError")
    assert failed.count("AttemptStarted") == 2
