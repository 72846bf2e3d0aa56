"""Multi-node runs and the pods' fit to a cluster: one pod per node per attempt, the headless
Service, torchrun's rendezvous, group failure and restart, and what a scheduler reads."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from optrun.api.errors import ManifestError
from optrun.operator import builders
from optrun.operator import reconcile as rec
from optrun.operator.builders import Run
from optrun.operator.config import OperatorConfig
from tests.unit.operator.helpers import (
    SPEC,
    UID,
    applied,
    conditions,
    observe,
    pod_body,
    result_message,
    run_body,
)


def multi(nodes: int = 2, **changes: Any) -> dict[str, Any]:
    """SPEC over `nodes` pods of one rank each (the global batch a multiple of the ranks)."""
    spec = copy.deepcopy(SPEC)
    spec["distributed"] = {"nodes": nodes, "processesPerNode": 1}
    spec["workload"] = {**spec["workload"], "batchSize": 4 * nodes}
    spec.update(changes)
    return spec


def build(spec: dict[str, Any] | None = None, **meta: Any) -> Run:
    return Run.from_body(run_body(spec, **meta))


def container(pod: dict[str, Any]) -> dict[str, Any]:
    (c,) = pod["spec"]["containers"]
    return c


def condition(run: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in run["status"]["conditions"] if c["type"] == type_)


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


# --- the pods and the Service --------------------------------------------------------------------


def test_each_node_gets_its_own_pod_with_a_stable_hostname_in_the_runs_subdomain(cfg: OperatorConfig) -> None:
    pods = builders.pods(build(multi(3)), 2, cfg)
    assert [p["metadata"]["name"] for p in pods] == [
        "demo-attempt-2-0",
        "demo-attempt-2-1",
        "demo-attempt-2-2",
    ]
    assert [p["spec"]["hostname"] for p in pods] == ["demo-0", "demo-1", "demo-2"]
    assert {p["spec"]["subdomain"] for p in pods} == {builders.service_name("demo")} == {"demo"}
    assert [p["metadata"]["labels"][builders.LABEL_INDEX] for p in pods] == ["0", "1", "2"]
    assert {builders.attempt_of(p) for p in pods} == {2}
    # The next attempt's pod 0 answers to the same name: the rendezvous endpoint never moves.
    assert builders.pod(build(multi(3)), 3, cfg)["spec"]["hostname"] == "demo-0"
    with pytest.raises(ValueError, match="index: 3 is out of range; allowed: 0 to 2"):
        builders.pod(build(multi(3)), 1, cfg, index=3)


def test_a_one_node_run_keeps_one_pod_without_hostname_group_or_rendezvous(cfg: OperatorConfig) -> None:
    (pod,) = builders.pods(build(), 1, cfg)
    assert pod["metadata"]["name"] == "demo-attempt-1"
    assert "hostname" not in pod["spec"] and "subdomain" not in pod["spec"]
    assert builders.KUEUE_POD_GROUP not in pod["metadata"]["labels"]
    assert "annotations" not in pod["metadata"]
    assert [p["name"] for p in container(pod)["ports"]] == ["metrics"]


def test_the_headless_service_selects_the_runs_pods_and_is_owned_by_the_run(cfg: OperatorConfig) -> None:
    svc = builders.service(build(multi()), cfg)
    assert svc["kind"] == "Service" and svc["metadata"]["name"] == "demo"
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True  # DNS before readiness: the rendezvous comes first
    assert svc["spec"]["selector"] == {builders.LABEL_RUN_UID: UID}
    pod = builders.pod(build(multi()), 1, cfg, index=1)
    assert all(pod["metadata"]["labels"][k] == v for k, v in svc["spec"]["selector"].items())
    assert svc["spec"]["ports"][0]["port"] == cfg.rendezvous_port
    (owner,) = svc["metadata"]["ownerReferences"]
    assert (owner["uid"], owner["controller"], owner["blockOwnerDeletion"]) == (UID, True, True)


def test_every_pod_runs_torchrun_with_the_c10d_rendezvous_on_pod_0(cfg: OperatorConfig) -> None:
    spec = multi(2, distributed={"nodes": 2, "processesPerNode": 4})
    spec["workload"] = {**spec["workload"], "batchSize": 8}
    run = build(spec)
    commands = [container(p)["command"] for p in builders.pods(run, 3, cfg)]
    for i, command in enumerate(commands):
        assert command[:3] == ["python", "-m", "torch.distributed.run"]
        assert flag(command, "--nnodes") == "2"
        assert flag(command, "--nproc-per-node") == "4"
        assert flag(command, "--max-restarts") == "0"  # the operator restarts the group, not torchrun
        assert flag(command, "--rdzv-backend") == "c10d"
        assert flag(command, "--rdzv-endpoint") == f"demo-0.demo:{cfg.rendezvous_port}"
        assert flag(command, "--rdzv-id") == f"{UID}-3"  # a new id per attempt: never a stale group
        assert flag(command, "--local-addr") == f"demo-{i}.demo"
        conf = dict(kv.split("=") for kv in flag(command, "--rdzv-conf").split(","))
        assert conf == {
            "is_host": "1" if i == 0 else "0",
            "join_timeout": str(cfg.rendezvous_timeout_seconds),
        }
        # Then the runtime itself, as torchrun's module, with the same arguments as a one-rank pod.
        tail = command[command.index("-m", 3) :]
        assert tail[:3] == ["-m", "optrun.cli", "runtime"]
        assert flag(tail, "--spec") == "/etc/optrun/run.yaml"
        assert flag(tail, "--termination-log") == "/dev/termination-log"
    assert container(builders.pod(run, 4, cfg))["command"] != commands[0]  # attempt 4: another rdzv id


def test_c10d_ranks_pod_0_first_at_any_node_count() -> None:
    # c10d orders the nodes by their address (--local-addr): pod 0 must come first to hold rank 0.
    addrs = [f"demo-{i}.demo" for i in range(128)]
    assert min(addrs) == "demo-0.demo"


def test_one_pod_with_several_ranks_runs_a_standalone_torchrun(cfg: OperatorConfig) -> None:
    command = container(builders.pod(build(), 1, cfg))["command"]  # SPEC: 2 GPUs, 2 ranks
    assert command[:3] == ["python", "-m", "torch.distributed.run"]
    assert "--standalone" in command and "--rdzv-endpoint" not in command
    assert (flag(command, "--nnodes"), flag(command, "--nproc-per-node")) == ("1", "2")
    one = {**SPEC, "resources": {**SPEC["resources"], "gpus": 1}}
    assert container(builders.pod(build(one), 1, cfg))["command"][:2] == ["optrun", "runtime"]


def test_a_multi_node_pod_declares_the_rendezvous_port(cfg: OperatorConfig) -> None:
    ports = container(builders.pod(build(multi()), 1, cfg))["ports"]
    assert {"name": "rendezvous", "containerPort": cfg.rendezvous_port, "protocol": "TCP"} in ports


# --- cluster fit ---------------------------------------------------------------------------------


def test_the_runtime_gets_a_memory_backed_dev_shm(cfg: OperatorConfig) -> None:
    pod = builders.pod(build(), 1, cfg)
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container(pod)["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory"}


def test_the_labels_and_annotations_a_scheduler_reads_reach_every_pod(cfg: OperatorConfig) -> None:
    run = build(
        multi(2),
        labels={"kueue.x-k8s.io/queue-name": "team-a", "kueue.x-k8s.io/priority-class": "high", "team": "a"},
        annotations={"scheduling.x-k8s.io/group": "g", "note": "mine"},
    )
    for index, pod in enumerate(builders.pods(run, 2, cfg)):
        meta = pod["metadata"]
        assert meta["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
        assert meta["labels"]["kueue.x-k8s.io/priority-class"] == "high"
        assert "team" not in meta["labels"] and "note" not in meta["annotations"]  # the run's own business
        assert meta["annotations"]["scheduling.x-k8s.io/group"] == "g"
        # Kueue's pod group: the attempt's pods, admitted together.
        assert meta["labels"][builders.KUEUE_POD_GROUP] == "demo-attempt-2"
        assert meta["annotations"][builders.KUEUE_POD_GROUP_COUNT] == "2"
        assert meta["labels"][builders.LABEL_INDEX] == str(index)
    # The operator's own labels win over a run's label of the same key.
    spoofed = build(multi(2), labels={"kueue.x-k8s.io/pod-group-name": "other"})
    assert builders.pod(spoofed, 1, cfg)["metadata"]["labels"][builders.KUEUE_POD_GROUP] == "demo-attempt-1"


def test_a_one_pod_run_carries_the_queue_name_but_no_pod_group(cfg: OperatorConfig) -> None:
    pod = builders.pod(build(labels={"kueue.x-k8s.io/queue-name": "team-a"}), 1, cfg)
    assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert builders.KUEUE_POD_GROUP not in pod["metadata"]["labels"]


def test_runtime_class_pull_secrets_and_service_account_are_set_from_scheduling(cfg: OperatorConfig) -> None:
    spec = copy.deepcopy(SPEC)
    spec["scheduling"] = {
        "runtimeClassName": "nvidia",
        "imagePullSecrets": ["registry-a", "registry-b"],
        "serviceAccountName": "trainer",
    }
    pod_spec = builders.pod(build(spec), 1, cfg)["spec"]
    assert pod_spec["runtimeClassName"] == "nvidia"
    assert pod_spec["imagePullSecrets"] == [{"name": "registry-a"}, {"name": "registry-b"}]
    assert pod_spec["serviceAccountName"] == "trainer"
    assert (
        pod_spec["automountServiceAccountToken"] is False
    )  # still no token: the runtime never calls the API
    plain = builders.pod(build(), 1, cfg)["spec"]
    assert not {"runtimeClassName", "imagePullSecrets", "serviceAccountName"} & set(plain)


def test_a_run_without_gpus_gets_no_gpu_tolerations(cfg: OperatorConfig) -> None:
    spec = copy.deepcopy(SPEC)
    spec["resources"] = {"gpus": 0, "cpu": "1", "memory": "1Gi"}
    assert "tolerations" not in builders.pod(build(spec), 1, cfg)["spec"]
    spec["scheduling"] = {"tolerations": [{"key": "team", "operator": "Exists"}]}
    assert builders.pod(build(spec), 1, cfg)["spec"]["tolerations"] == [{"key": "team", "operator": "Exists"}]
    assert builders.pod(build(), 1, cfg)["spec"]["tolerations"] == cfg.default_tolerations  # with GPUs


# --- validation ----------------------------------------------------------------------------------


def test_several_nodes_need_the_checkpoints_on_a_claim_every_pod_shares() -> None:
    spec = multi(2)
    spec["training"] = {**spec["training"], "checkpoint": {"everySteps": 5}}
    with pytest.raises(ManifestError) as err:
        build(spec)
    text = "; ".join(err.value.problems)
    assert "training.checkpoint.claimName" in text and "distributed.nodes 2" in text


def test_a_multi_node_run_name_must_make_valid_hostnames_and_a_service() -> None:
    with pytest.raises(
        ManifestError, match=r"metadata.name: '1demo' cannot name a run .*starting with a letter"
    ):
        build(multi(2), name="1demo")
    with pytest.raises(ManifestError, match="at most 60 characters"):
        build(multi(11), name="a" * 61)  # a-...-10 would be 64 characters
    assert build(multi(11), name="a" * 60).name == "a" * 60
    assert build(name="1demo").name == "1demo"  # one node: no hostname, no Service


# --- the reconcile -------------------------------------------------------------------------------


def multi_run(cfg: OperatorConfig, nodes: int = 2) -> dict[str, Any]:
    run = run_body(multi(nodes))
    return applied(run, rec.reconcile(observe(run), cfg))


def group(
    cfg: OperatorConfig, run: dict[str, Any], attempt: int, *states: str, **kw: Any
) -> list[dict[str, Any]]:
    return [pod_body(cfg, attempt, s, run=run, index=i, **kw) for i, s in enumerate(states)]


def test_a_multi_node_run_starts_with_its_service_and_every_pod_and_shows_them(cfg: OperatorConfig) -> None:
    run = run_body(multi(3))
    plan = rec.reconcile(observe(run), cfg)
    assert [(m["kind"], m["metadata"]["name"]) for m in plan.create] == [
        ("Service", "demo"),
        ("ConfigMap", "demo-spec"),
        ("Pod", "demo-attempt-1-0"),
        ("Pod", "demo-attempt-1-1"),
        ("Pod", "demo-attempt-1-2"),
    ]
    status = applied(run, plan)["status"]
    assert status["pods"] == ["demo-attempt-1-0", "demo-attempt-1-1", "demo-attempt-1-2"]
    assert status["podName"] == "demo-attempt-1-0"
    assert rec.expected_pods(applied(run, plan)) == status["pods"]


def test_the_group_runs_only_once_every_pod_runs(cfg: OperatorConfig) -> None:
    run = multi_run(cfg)
    half = applied(run, rec.reconcile(observe(run, group(cfg, run, 1, "running", "pending")), cfg))
    assert half["status"]["phase"] == "Pending"
    unschedulable = group(
        cfg, run, 1, "running", "unschedulable", unschedulable="0/3 nodes: Insufficient gpu"
    )
    st = applied(run, rec.reconcile(observe(run, unschedulable), cfg))
    assert conditions(st)["Scheduled"] == ("False", "Unschedulable")
    assert "demo-attempt-1-1" in condition(st, "Scheduled")["message"]
    both = applied(run, rec.reconcile(observe(run, group(cfg, run, 1, "running", "running")), cfg))
    assert both["status"]["phase"] == "Running"


def test_one_pod_failing_stops_the_others_and_the_next_attempt_restarts_them_all(cfg: OperatorConfig) -> None:
    run = multi_run(cfg)
    pods = group(cfg, run, 1, "running", "failed", exit_code=137)
    plan = rec.reconcile(observe(run, pods), cfg)
    assert plan.delete_pods == ["demo-attempt-1-0"]
    assert not [m for m in plan.create if m["kind"] == "Pod"]  # not while pod 0 may still write checkpoints
    run = applied(run, plan)
    assert run["status"]["attempts"] == 1 and run["status"].get("failedAttempts", 0) == 0
    # Pod 0 stopped (SIGTERM after the delete): the attempt is over, counted once, for pod 1's failure.
    stopped = group(cfg, run, 1, "failed", "failed", exit_code=137)
    stopped[0]["metadata"]["deletionTimestamp"] = stopped[1]["status"]["containerStatuses"][0]["state"][
        "terminated"
    ]["finishedAt"]
    plan = rec.reconcile(observe(run, stopped), cfg)
    assert [m["metadata"]["name"] for m in plan.create if m["kind"] == "Pod"] == [
        "demo-attempt-2-0",
        "demo-attempt-2-1",
    ]
    run = applied(run, plan)
    assert run["status"]["failedAttempts"] == 1 and run["status"]["pods"] == [
        "demo-attempt-2-0",
        "demo-attempt-2-1",
    ]
    assert "demo-attempt-1-1 exited with code 137" in condition(run, "Running")["message"]


def test_a_pod_of_the_group_deleted_ends_the_attempt_for_all(cfg: OperatorConfig) -> None:
    from optrun.operator.pods import PodView

    run = multi_run(cfg)
    obs = observe(run, group(cfg, run, 1, "running", "running"))
    views = dict(obs.pods)
    views["demo-attempt-1-1"] = PodView.gone("demo-attempt-1-1", 1)
    plan = rec.reconcile(rec.Observed(run=run, pods=views, now=obs.now), cfg)
    assert plan.delete_pods == ["demo-attempt-1-0"]


def test_the_result_is_pod_0s(cfg: OperatorConfig) -> None:
    run = multi_run(cfg)
    message = result_message()
    pods = group(cfg, run, 1, "succeeded", "running", message=message)
    plan = rec.reconcile(observe(run, pods), cfg)
    done = applied(run, plan)
    assert done["status"]["phase"] == "Succeeded" and done["status"]["decision"]
    # A pod other than 0 finishing first is no result: the group still runs.
    early = group(cfg, run, 1, "running", "succeeded")
    assert applied(run, rec.reconcile(observe(run, early), cfg))["status"]["phase"] == "Running"
