"""The children of a run, as pure functions: names, pod shape, security, volumes, ownership."""

from __future__ import annotations

import copy

import pytest
import yaml

from optrun.api.v1alpha1 import parse_manifest
from optrun.operator import builders
from optrun.operator.builders import Run
from optrun.operator.config import OperatorConfig
from tests.unit.operator.helpers import SPEC, UID, run_body


def build(spec: dict | None = None) -> Run:
    return Run.from_body(run_body(spec))


def container(pod: dict) -> dict:
    (c,) = pod["spec"]["containers"]
    return c


def test_names_are_deterministic_per_run_and_attempt() -> None:
    assert builders.pod_name("demo", 3) == "demo-attempt-3"
    assert builders.configmap_name("demo") == "demo-spec"


def test_the_same_run_builds_the_same_children(cfg: OperatorConfig) -> None:
    assert builders.pod(build(), 2, cfg) == builders.pod(build(), 2, cfg)
    assert builders.configmap(build(), cfg) == builders.configmap(build(), cfg)


def test_pod_carries_its_attempt_as_a_label_that_reads_back(cfg: OperatorConfig) -> None:
    pod = builders.pod(build(), 4, cfg)
    assert pod["metadata"]["name"] == "demo-attempt-4"
    assert builders.attempt_of(pod) == 4
    assert pod["metadata"]["labels"][builders.LABEL_RUN_UID] == UID


def test_pod_runs_the_runtime_with_its_spec_output_metrics_port_and_termination_log(
    cfg: OperatorConfig,
) -> None:
    c = container(builders.pod(build({**SPEC, "resources": {**SPEC["resources"], "gpus": 1}}), 1, cfg))
    assert c["command"] == [
        "optrun", "runtime", "--spec", "/etc/optrun/run.yaml", "--output", "/var/lib/optrun",
        "--metrics-port", "9090", "--metrics-addr", "0.0.0.0", "--termination-log", "/dev/termination-log",
    ]  # fmt: skip
    assert c["ports"] == [{"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]
    assert c["terminationMessagePath"] == "/dev/termination-log"
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_the_runtime_can_listen_on_its_pod_ip_alone(cfg: OperatorConfig) -> None:
    shared = cfg.model_copy(update={"runtime_metrics_address": "$(POD_IP)"})
    c = container(builders.pod(build(), 1, shared))
    assert c["command"][c["command"].index("--metrics-addr") + 1] == "$(POD_IP)"
    assert any(e["name"] == "POD_IP" for e in c["env"]), "the kubelet expands $(POD_IP) from the env"


def test_pod_limits_gpus_and_selects_the_gpu_product_label(cfg: OperatorConfig) -> None:
    pod = builders.pod(build(), 1, cfg)
    resources = container(pod)["resources"]
    assert resources["limits"] == {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": "2"}
    assert resources["requests"] == resources["limits"]
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}


def test_pod_without_gpus_asks_for_none_and_pins_the_runtime_to_the_cpu(cfg: OperatorConfig) -> None:
    spec = copy.deepcopy(SPEC)
    spec["resources"] = {"gpus": 0, "cpu": "1", "memory": "1Gi"}
    pod = builders.pod(build(spec), 1, cfg)
    c = container(pod)
    assert "nvidia.com/gpu" not in c["resources"]["limits"]
    assert {"name": "OPTRUN_DEVICE", "value": "cpu"} in c["env"]
    assert "nodeSelector" not in pod["spec"]


def test_pod_security_context_is_restricted(cfg: OperatorConfig) -> None:
    pod = builders.pod(build(), 1, cfg)
    sc = container(pod)["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["readOnlyRootFilesystem"] is True
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["automountServiceAccountToken"] is False
    # A read-only root needs a writable scratch volume, and the caches must point into it.
    mounts = {m["mountPath"]: m["name"] for m in container(pod)["volumeMounts"]}
    assert mounts["/scratch"] == "scratch"
    env = {e["name"]: e.get("value") for e in container(pod)["env"]}
    assert env["HOME"] == env["TMPDIR"] == "/scratch"


def test_pod_gets_downward_api_identity_in_its_env(cfg: OperatorConfig) -> None:
    env = {e["name"]: e for e in container(builders.pod(build(), 3, cfg))["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["OPTRUN_ATTEMPT"]["value"] == "3"
    # The runtime must checkpoint and exit before the kubelet's SIGKILL ends its grace period.
    assert 0 < int(env["OPTRUN_TERM_GRACE"]["value"]) < cfg.termination_grace_seconds


def test_checkpoint_volume_is_the_named_claim_else_an_empty_dir(cfg: OperatorConfig) -> None:
    volumes = {v["name"]: v for v in builders.pod(build(), 1, cfg)["spec"]["volumes"]}
    assert volumes["checkpoints"]["persistentVolumeClaim"] == {"claimName": "ckpt"}
    spec = copy.deepcopy(SPEC)
    del spec["training"]["checkpoint"]["claimName"]
    volumes = {v["name"]: v for v in builders.pod(build(spec), 1, cfg)["spec"]["volumes"]}
    assert volumes["checkpoints"] == {"name": "checkpoints", "emptyDir": {}}
    assert volumes["spec"]["configMap"]["name"] == "demo-spec"


def test_the_users_claims_are_mounted_read_only_where_the_spec_says(cfg: OperatorConfig) -> None:
    spec = copy.deepcopy(SPEC)
    spec["workload"] = {
        **spec["workload"],
        "model": {"path": "/models/llama"},
        "dataset": {"path": "/data/t.jsonl"},
    }
    spec["volumes"] = [
        {"name": "models", "claimName": "llama-weights", "mountPath": "/models"},
        {"name": "data", "claimName": "corpora", "mountPath": "/data", "subPath": "team-a"},
    ]
    pod = builders.pod(build(spec), 1, cfg)
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["user-models"] == {
        "name": "user-models",
        "persistentVolumeClaim": {"claimName": "llama-weights", "readOnly": True},
    }
    mounts = {m["name"]: m for m in container(pod)["volumeMounts"]}
    assert mounts["user-models"] == {"name": "user-models", "mountPath": "/models", "readOnly": True}
    assert mounts["user-data"] == {
        "name": "user-data",
        "mountPath": "/data",
        "readOnly": True,
        "subPath": "team-a",
    }
    # The runtime's own mounts are still there, and none of the user's can sit on them.
    assert {m["mountPath"] for m in container(pod)["volumeMounts"]} >= {
        builders.SPEC_DIR,
        builders.OUTPUT_DIR,
    }
    from optrun.api.v1alpha1 import RESERVED_MOUNT_PATHS

    assert {builders.SPEC_DIR, builders.OUTPUT_DIR, builders.SCRATCH_DIR} <= set(RESERVED_MOUNT_PATHS)


def test_children_are_owned_by_the_run_as_its_controller(cfg: OperatorConfig) -> None:
    for child in (builders.pod(build(), 1, cfg), builders.configmap(build(), cfg)):
        (ref,) = child["metadata"]["ownerReferences"]
        assert ref == {
            "apiVersion": "optrun.io/v1alpha1",
            "kind": "OptimizationRun",
            "name": "demo",
            "uid": UID,
            "controller": True,
            "blockOwnerDeletion": True,
        }
        assert child["metadata"]["namespace"] == "team-a"


def test_image_is_the_runs_own_or_the_operators_default(cfg: OperatorConfig) -> None:
    assert container(builders.pod(build(), 1, cfg))["image"] == "registry.example/optrun-runtime:test"
    spec = {**copy.deepcopy(SPEC), "image": "registry.example/custom:1"}
    assert container(builders.pod(build(spec), 1, cfg))["image"] == "registry.example/custom:1"


def test_tolerations_are_the_operator_defaults_then_the_runs_without_duplicates(cfg: OperatorConfig) -> None:
    spec = copy.deepcopy(SPEC)
    spec["scheduling"] = {
        "tolerations": [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            {"key": "team", "operator": "Equal", "value": "a", "effect": "NoSchedule"},
        ],
        "priorityClassName": "gpu-batch",
        "nodeSelector": {"pool": "a100"},
    }
    pod = builders.pod(build(spec), 1, cfg)
    assert pod["spec"]["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "team", "operator": "Equal", "value": "a", "effect": "NoSchedule"},
    ]
    assert pod["spec"]["priorityClassName"] == "gpu-batch"
    assert pod["spec"]["nodeSelector"] == {"pool": "a100", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}


def test_pod_gets_the_rest_of_the_runs_deadline_only_when_given(cfg: OperatorConfig) -> None:
    assert "activeDeadlineSeconds" not in builders.pod(build(), 1, cfg)["spec"]
    assert builders.pod(build(), 1, cfg, active_deadline_seconds=42)["spec"]["activeDeadlineSeconds"] == 42
    # Even a deadline that has just passed gives a valid pod (the reconcile fails the run anyway).
    assert builders.pod(build(), 1, cfg, active_deadline_seconds=0)["spec"]["activeDeadlineSeconds"] == 1


def test_configmap_holds_the_whole_run_with_defaults_and_the_runtime_reads_it_back(
    cfg: OperatorConfig,
) -> None:
    cm = builders.configmap(build(), cfg)
    assert cm["immutable"] is True
    doc = yaml.safe_load(cm["data"]["run.yaml"])
    assert doc["metadata"] == {"name": "demo", "namespace": "team-a"}
    assert doc["spec"]["training"]["learningRate"] == 3.0e-4  # a default, written out
    assert parse_manifest(doc) == build().spec


def test_attempt_numbers_start_at_one(cfg: OperatorConfig) -> None:
    with pytest.raises(ValueError, match="attempt: 0"):
        builders.pod(build(), 0, cfg)


def test_a_succeeded_run_s_result_is_kept_in_an_immutable_configmap_it_owns(cfg: OperatorConfig) -> None:
    run = build()
    cm = builders.result_configmap(run, '{"decision":"GO"}')
    assert cm["metadata"]["name"] == builders.result_configmap_name("demo") == "demo-result"
    assert cm["immutable"] is True and cm["data"] == {builders.RESULT_FILE: '{"decision":"GO"}'}
    assert cm["metadata"]["ownerReferences"][0]["uid"] == UID
    assert cm["metadata"]["labels"][builders.LABEL_RUN_UID] == UID
    assert builders.is_result_configmap(cm) and not builders.is_result_configmap(
        builders.configmap(run, None)
    )  # type: ignore[arg-type]


def test_a_baseline_run_is_mounted_optional_and_named_to_the_runtime(cfg: OperatorConfig) -> None:
    from optrun.api.result import BASELINE_ENV

    plain = builders.pod(build(), 1, cfg)
    assert "baseline" not in {v["name"] for v in plain["spec"]["volumes"]}
    assert BASELINE_ENV not in {e["name"] for e in container(plain)["env"]}
    spec = copy.deepcopy(SPEC)
    spec["acceptance"] = {"baseline": {"run": "earlier"}}
    pod = builders.pod(build(spec), 1, cfg)
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    # Optional: a baseline that has not succeeded (no earlier-result yet) must not keep the pod
    # from starting; the runtime fails baseline.no-regression instead.
    assert volumes["baseline"] == {
        "name": "baseline",
        "configMap": {"name": "earlier-result", "optional": True},
    }
    mounts = {m["name"]: m for m in container(pod)["volumeMounts"]}
    assert mounts["baseline"] == {"name": "baseline", "mountPath": builders.BASELINE_DIR, "readOnly": True}
    env = {e["name"]: e.get("value") for e in container(pod)["env"]}
    assert env[BASELINE_ENV] == f"{builders.BASELINE_DIR}/{builders.RESULT_FILE}"
    # A baseline report.json is the runtime's own file: nothing to mount.
    spec["acceptance"] = {"baseline": {"report": "/var/lib/optrun/earlier.json"}}
    assert "baseline" not in {v["name"] for v in builders.pod(build(spec), 1, cfg)["spec"]["volumes"]}
