# The kubernetes client types every status field Optional and takes typed models where tests
# pass plain dicts (which it accepts): these checks would only add noise here.
# mypy: disable-error-code="union-attr,arg-type,index,no-untyped-call"
"""The test control plane behaves as a user's cluster does (issue 3's "done when").

Each test talks to the real kube-apiserver v1.20.2, kube-controller-manager and kube-scheduler;
pods run as local processes under the node agent (tests/support/nodeagent.py).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch
from kubernetes.client.exceptions import ApiException

from tests.support import assets as assets_mod
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]

# Serves its own environment and mounted ConfigMap file as JSON, on its pod IP only.
HTTP_SERVER = textwrap.dedent("""
    import http.server, json, os
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({
                "podName": os.environ["POD_NAME"], "podIP": os.environ["POD_IP"],
                "greeting": os.environ["GREETING"],
                "file": open("/etc/app/greeting.txt").read(),
                "namespace": open("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read(),
            }).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass
    print("serving on", os.environ["POD_IP"], flush=True)
    http.server.HTTPServer((os.environ["POD_IP"], 8080), Handler).serve_forever()
""")

# Checkpoints on SIGTERM: writes its termination message, exits 3.
GRACEFUL = textwrap.dedent("""
    import signal, sys, time
    def on_term(*_):
        open("/dev/termination-log", "w").write("caught SIGTERM; checkpoint saved")
        sys.exit(3)
    signal.signal(signal.SIGTERM, on_term)
    print("ready", flush=True)
    while True:
        time.sleep(0.1)
""")

# Notes SIGTERM and carries on, until SIGKILL.
STUBBORN = textwrap.dedent("""
    import signal, time
    def on_term(*_):
        print("SIGTERM received, ignoring it", flush=True)
    signal.signal(signal.SIGTERM, on_term)
    open("/dev/termination-log", "w").write("still running when killed")
    print("ready", flush=True)
    while True:
        time.sleep(0.1)
""")


def python_pod(name: str, script: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "containers": [{"name": "main", "image": "optrun/test", "command": ["python", "-c", script]}],
            **spec,
        },
    }


def pod_logs(core: k8s.CoreV1Api, namespace: str, name: str) -> str:
    """The container's log through the API server (which asks the node agent's kubelet endpoint)."""
    return str(core.read_namespaced_pod_log(name, namespace))


def delete_and_watch(core: k8s.CoreV1Api, namespace: str, name: str, grace: int) -> tuple[k8s.V1Pod, float]:
    """Delete a pod and follow it to the end: its last reported state, and how long that took."""
    version = core.read_namespaced_pod(name, namespace).metadata.resource_version
    started = time.monotonic()
    core.delete_namespaced_pod(name, namespace, grace_period_seconds=grace)
    last = None
    for event in k8s_watch.Watch().stream(
        core.list_namespaced_pod,
        namespace,
        resource_version=version,
        field_selector=f"metadata.name={name}",
        timeout_seconds=grace + 30,
    ):
        last = event["object"]
        if event["type"] == "DELETED":
            return last, time.monotonic() - started
    raise AssertionError(f"pod {namespace}/{name} was not removed within {grace + 30}s; last: {last}")


def process_runs(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (a killed orphan waits for init to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def assert_process_gone(pid: int) -> None:
    assert not process_runs(pid), f"process {pid} still runs"


# ---- the API server --------------------------------------------------------------------------


def test_server_reports_v1_20_2(kube: Any) -> None:
    assert k8s.VersionApi(kube).get_code().git_version == "v1.20.2"


CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.test.optrun.io"},
    "spec": {
        "group": "test.optrun.io",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["size"],
                                "properties": {
                                    "size": {"type": "integer", "minimum": 1, "maximum": 8},
                                    "color": {"type": "string", "enum": ["red", "blue"], "default": "red"},
                                },
                            }
                        },
                    }
                },
            }
        ],
    },
}


def test_crd_applies_and_the_api_server_rejects_a_resource_that_violates_its_schema(
    kube: Any, kubectl: Any, namespace: str, tmp_path: Path
) -> None:
    manifest = tmp_path / "crd.yaml"
    manifest.write_text(yaml.safe_dump(CRD))
    kubectl("apply", "-f", str(manifest))
    kubectl("wait", "--for=condition=Established", "crd/widgets.test.optrun.io", "--timeout=30s")
    objects = k8s.CustomObjectsApi(kube)

    def create(spec: dict[str, Any]) -> Any:
        body = {
            "apiVersion": "test.optrun.io/v1",
            "kind": "Widget",
            "metadata": {"generateName": "w-"},
            "spec": spec,
        }
        return objects.create_namespaced_custom_object("test.optrun.io", "v1", namespace, "widgets", body)

    # The CRD's REST endpoint may lag `Established` by a moment.
    created = wait_for(lambda: create({"size": 2}), message="a valid Widget to be accepted")
    assert created["spec"] == {"size": 2, "color": "red"}, "the schema default applies"

    with pytest.raises(ApiException) as rejected:
        create({"size": 20, "color": "green"})
    assert rejected.value.status == 422
    message = json.loads(rejected.value.body)["message"]
    assert "spec.size: Invalid value: 20: spec.size in body should be less than or equal to 8" in message
    assert 'spec.color: Unsupported value: "green"' in message


# ---- the scheduler and the node agent --------------------------------------------------------


def test_deployment_pod_is_scheduled_runs_and_serves_its_env_and_configmap_at_its_pod_ip(
    kube: Any, namespace: str, node_agent: Any
) -> None:
    core, apps = k8s.CoreV1Api(kube), k8s.AppsV1Api(kube)
    core.create_namespaced_config_map(
        namespace,
        {
            "metadata": {"name": "app-config"},
            "data": {"greeting": "hello from a ConfigMap", "greeting.txt": "hello from a mounted file"},
        },
    )
    container = {
        "name": "web",
        "image": "optrun/test",
        "command": ["python", "-c", HTTP_SERVER],
        "ports": [{"name": "http", "containerPort": 8080}],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "app-config", "key": "greeting"}}},
        ],
        "volumeMounts": [{"name": "config", "mountPath": "/etc/app", "readOnly": True}],
        "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
    }
    apps.create_namespaced_deployment(
        namespace,
        {
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {
                        "containers": [container],
                        "volumes": [
                            {
                                "name": "config",
                                "configMap": {
                                    "name": "app-config",
                                    "items": [{"key": "greeting.txt", "path": "greeting.txt"}],
                                },
                            }
                        ],
                    },
                },
            },
        },
    )
    wait_for(
        lambda: (
            apps.read_namespaced_deployment(name="web", namespace=namespace).status.available_replicas == 1
        ),
        message="the Deployment to become available (readiness probe passing)",
    )
    (pod,) = core.list_namespaced_pod(namespace, label_selector="app=web").items
    name = pod.metadata.name

    assert pod.status.phase == "Running"
    assert pod.spec.node_name in {n.name for n in node_agent.nodes}
    scheduled = wait_for(
        lambda: [
            e
            for e in core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}").items
            if e.reason == "Scheduled"
        ]
    )
    assert (scheduled[0].reporting_component or scheduled[0].source.component) == "default-scheduler"
    assert pod.status.pod_ip.startswith("127.") and pod.status.pod_ip != "127.0.0.1"

    answer = requests.get(f"http://{pod.status.pod_ip}:8080/", timeout=5).json()
    assert answer == {
        "podName": name,
        "podIP": pod.status.pod_ip,
        "greeting": "hello from a ConfigMap",
        "file": "hello from a mounted file",
        "namespace": namespace,
    }
    assert f"serving on {pod.status.pod_ip}" in pod_logs(core, namespace, name)
    assert not Path("/etc/app/greeting.txt").exists(), "the mount is the pod process's alone"


def test_pod_asking_for_more_gpus_than_any_node_has_stays_pending_unschedulable(
    kube: Any, namespace: str, node_agent: Any
) -> None:
    core = k8s.CoreV1Api(kube)
    too_many = max(n.gpus for n in node_agent.nodes) + 1
    pod = python_pod("greedy", "print('never runs')")
    pod["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": str(too_many)}}
    core.create_namespaced_pod(namespace, pod)

    def unschedulable() -> Any:
        status = core.read_namespaced_pod("greedy", namespace).status
        return next(
            (c for c in status.conditions or [] if c.type == "PodScheduled" and c.reason == "Unschedulable"),
            None,
        )

    condition = wait_for(unschedulable, message="the scheduler to mark the pod Unschedulable")
    assert condition.status == "False"
    assert "Insufficient nvidia.com/gpu" in condition.message
    assert core.read_namespaced_pod("greedy", namespace).status.phase == "Pending"


def test_gpu_pod_lands_on_the_node_with_the_requested_gpu_product(kube: Any, namespace: str) -> None:
    core = k8s.CoreV1Api(kube)
    pod = python_pod(
        "a100",
        "print('on an A100')",
        restartPolicy="Never",
        nodeSelector={"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB"},
    )
    pod["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "2"}}
    core.create_namespaced_pod(namespace, pod)
    wait_for(lambda: core.read_namespaced_pod("a100", namespace).status.phase == "Succeeded")
    assert core.read_namespaced_pod("a100", namespace).spec.node_name == "gpu-node-1"
    assert pod_logs(core, namespace, "a100") == "on an A100\n"


def test_deleting_a_running_pod_sends_sigterm_and_reports_its_exit_code_and_termination_message(
    kube: Any, namespace: str, node_agent: Any
) -> None:
    core = k8s.CoreV1Api(kube)
    core.create_namespaced_pod(namespace, python_pod("graceful", GRACEFUL, terminationGracePeriodSeconds=30))
    wait_for(lambda: pod_logs(core, namespace, "graceful") == "ready\n", message="the process to be ready")
    pid = node_agent.container_pid(namespace, "graceful", "main")

    last, elapsed = delete_and_watch(core, namespace, "graceful", grace=30)

    terminated = last.status.container_statuses[0].state.terminated
    assert terminated.exit_code == 3
    assert terminated.message == "caught SIGTERM; checkpoint saved"
    assert terminated.reason == "Error"
    assert elapsed < 10, "a process that exits on SIGTERM does not wait for the grace period"
    assert_process_gone(pid)


def test_a_process_that_ignores_sigterm_is_killed_after_the_grace_period(
    kube: Any, namespace: str, node_agent: Any
) -> None:
    core = k8s.CoreV1Api(kube)
    core.create_namespaced_pod(namespace, python_pod("stubborn", STUBBORN))
    wait_for(lambda: pod_logs(core, namespace, "stubborn") == "ready\n", message="the process to be ready")
    pid = node_agent.container_pid(namespace, "stubborn", "main")

    last, elapsed = delete_and_watch(core, namespace, "stubborn", grace=2)

    terminated = last.status.container_statuses[0].state.terminated
    assert terminated.exit_code == 137, "128 + SIGKILL"
    assert terminated.message == "still running when killed"
    assert 2 <= elapsed < 10
    assert "SIGTERM received, ignoring it" in node_agent.container_log(namespace, "stubborn", "main")
    assert_process_gone(pid)


def test_failing_container_reports_its_log_tail_as_termination_message(kube: Any, namespace: str) -> None:
    core = k8s.CoreV1Api(kube)
    pod = python_pod(
        "crash",
        "import sys; print('about to fail', flush=True); sys.exit('boom: bad input')",
        restartPolicy="Never",
    )
    pod["spec"]["containers"][0]["terminationMessagePolicy"] = "FallbackToLogsOnError"
    core.create_namespaced_pod(namespace, pod)
    wait_for(lambda: core.read_namespaced_pod("crash", namespace).status.phase == "Failed")
    terminated = core.read_namespaced_pod("crash", namespace).status.container_statuses[0].state.terminated
    assert terminated.exit_code == 1
    assert terminated.message == "about to fail\nboom: bad input\n"


def test_in_cluster_client_in_a_pod_reaches_the_api_server_with_its_service_account(
    kube: Any, namespace: str
) -> None:
    """What the operator does when Helm installs it: load_incluster_config() in a pod."""
    core = k8s.CoreV1Api(kube)
    script = textwrap.dedent("""
        from kubernetes import client, config
        config.load_incluster_config()
        print(client.VersionApi().get_code().git_version, flush=True)
        try:
            client.CoreV1Api().list_namespaced_secret("kube-system")
        except client.ApiException as err:
            print(err.status, flush=True)
    """)
    core.create_namespaced_pod(namespace, python_pod("in-cluster", script, restartPolicy="Never"))
    wait_for(
        lambda: core.read_namespaced_pod("in-cluster", namespace).status.phase == "Succeeded", timeout=60
    )
    assert pod_logs(core, namespace, "in-cluster") == "v1.20.2\n403\n", (
        "authenticated as default SA, not admin"
    )


def test_secret_env_and_volumes_emptydir_and_a_provisioned_claim_reach_the_process(
    kube: Any, namespace: str
) -> None:
    core = k8s.CoreV1Api(kube)
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": "creds"}, "stringData": {"password": "s3cret"}}
    )
    core.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": "checkpoints"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
        },
    )
    writer = textwrap.dedent("""
        import os
        assert os.environ["PASSWORD"] == open("/etc/creds/password").read() == "s3cret"
        open("/scratch/x", "w").write("scratch")
        open("/checkpoints/step-100", "w").write(os.environ["POD_NAME"])
    """)
    reader = "print(open('/checkpoints/step-100').read(), flush=True)"

    def pod(name: str, script: str) -> dict[str, Any]:
        body = python_pod(
            name,
            script,
            restartPolicy="Never",
            volumes=[
                {"name": "creds", "secret": {"secretName": "creds"}},
                {"name": "scratch", "emptyDir": {}},
                {"name": "checkpoints", "persistentVolumeClaim": {"claimName": "checkpoints"}},
            ],
        )
        body["spec"]["containers"][0].update(
            env=[
                {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            ],
            volumeMounts=[
                {"name": "creds", "mountPath": "/etc/creds", "readOnly": True},
                {"name": "scratch", "mountPath": "/scratch"},
                {"name": "checkpoints", "mountPath": "/checkpoints"},
            ],
        )
        return body

    def phase(name: str) -> str:
        return str(core.read_namespaced_pod(name, namespace).status.phase)

    core.create_namespaced_pod(namespace, pod("writer", writer))
    wait_for(lambda: phase("writer") in ("Succeeded", "Failed"), timeout=60)
    assert phase("writer") == "Succeeded", pod_logs(core, namespace, "writer")
    claim = core.read_namespaced_persistent_volume_claim("checkpoints", namespace)
    assert claim.status.phase == "Bound", "bound by the real PV controller"
    core.create_namespaced_pod(namespace, pod("reader", reader))
    wait_for(lambda: phase("reader") == "Succeeded")
    assert pod_logs(core, namespace, "reader") == "writer\n", "the claim outlives the pod that wrote it"


def test_container_that_fails_once_is_restarted_and_its_last_state_reported(
    kube: Any, namespace: str
) -> None:
    core = k8s.CoreV1Api(kube)
    script = textwrap.dedent("""
        import os, sys
        if not os.path.exists("/state/tried"):
            open("/state/tried", "w").close()
            sys.exit(7)
    """)
    pod = python_pod("flaky", script, restartPolicy="OnFailure", volumes=[{"name": "state", "emptyDir": {}}])
    pod["spec"]["containers"][0]["volumeMounts"] = [{"name": "state", "mountPath": "/state"}]
    core.create_namespaced_pod(namespace, pod)
    wait_for(lambda: core.read_namespaced_pod("flaky", namespace).status.phase == "Succeeded")
    status = core.read_namespaced_pod("flaky", namespace).status.container_statuses[0]
    assert status.restart_count == 1
    assert status.last_state.terminated.exit_code == 7
    assert status.state.terminated.exit_code == 0


# ---- the controller manager ------------------------------------------------------------------


def test_deleting_an_owner_deletes_what_it_owns(kube: Any, namespace: str) -> None:
    core = k8s.CoreV1Api(kube)
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    reference = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "owned", "ownerReferences": [reference]}}
    )
    core.create_namespaced_secret(namespace, {"metadata": {"name": "owned", "ownerReferences": [reference]}})

    core.delete_namespaced_config_map("owner", namespace)

    def gone(read: Any) -> bool:
        try:
            read("owned", namespace)
        except ApiException as err:
            return bool(err.status == 404)
        return False

    wait_for(
        lambda: gone(core.read_namespaced_config_map) and gone(core.read_namespaced_secret),
        message="the garbage collector to delete the owned objects",
    )


def test_service_account_bound_to_a_narrow_role_can_do_only_what_the_role_allows(
    kube: Any, cluster: Any, namespace: str
) -> None:
    core, rbac = k8s.CoreV1Api(kube), k8s.RbacAuthorizationV1Api(kube)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "narrow"}})
    rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "configmap-reader"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}],
        },
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "narrow-reads-configmaps"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "configmap-reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "narrow", "namespace": namespace}],
        },
    )
    as_narrow = k8s_config.new_client_from_config(
        config_file=str(cluster.service_account_kubeconfig(namespace, "narrow"))
    )
    narrow = k8s.CoreV1Api(as_narrow)
    try:
        # The authorizer sees a new binding a moment after it is written.
        wait_for(lambda: narrow.list_namespaced_config_map(namespace), message="the binding to take effect")

        def refused(call: Any, *args: Any) -> int:
            with pytest.raises(ApiException) as err:
                call(*args)
            return int(err.value.status)

        assert refused(narrow.create_namespaced_config_map, namespace, {"metadata": {"name": "x"}}) == 403
        assert refused(narrow.list_namespaced_secret, namespace) == 403
        assert refused(narrow.list_namespaced_config_map, "kube-system") == 403
        assert refused(narrow.list_namespaced_pod, namespace) == 403
    finally:
        as_narrow.close()


# ---- setup, warm start and teardown ----------------------------------------------------------


def test_assets_script_is_fast_when_everything_is_cached(assets: Any) -> None:
    started = time.monotonic()
    subprocess.run(["bash", str(assets_mod.ASSETS_SCRIPT)], check=True, capture_output=True, timeout=60)
    assert time.monotonic() - started < 5


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_hack_cluster_starts_warm_in_under_20s_and_down_leaves_no_process_or_port(
    assets: Any, tmp_path: Path
) -> None:
    """The developer command, from a fresh cache that points at the built binaries
    (OPTRUN_KUBE_ASSETS, OPTRUN_TOOLS): up, a running pod, down, nothing left."""
    env = {
        **os.environ,
        "OPTRUN_CACHE": str(tmp_path / "cache"),
        "OPTRUN_KUBE_ASSETS": str(assets.kube_apiserver.parent),
        "OPTRUN_TOOLS": str(assets.kubectl.parent),
    }
    command = [str(REPO_ROOT / "hack" / "cluster")]
    state_dir = tmp_path / "cache" / "cluster-dev"
    try:
        started = time.monotonic()
        subprocess.run([*command, "up"], env=env, check=True, capture_output=True, timeout=120)
        warm_start = time.monotonic() - started
        assert warm_start < 20, f"warm start took {warm_start:.1f}s"
        assert subprocess.run([*command, "status"], env=env, capture_output=True).returncode == 0

        state = json.loads((state_dir / "state.json").read_text())
        pids = [p["pid"] for p in state["processes"].values()]
        ports = list(state["ports"].values())
        kubeconfig = str(state_dir / "admin.kubeconfig")
        assert set(state["processes"]) == {
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "node-agent",
        }
        subprocess.run(
            [
                str(assets.kubectl),
                "--kubeconfig",
                kubeconfig,
                "run",
                "sleeper",
                "--image=x",
                "--restart=Never",
                "--command",
                "--",
                "sleep",
                "600",
            ],
            check=True,
            capture_output=True,
        )
        pid_file = wait_for(
            lambda: next((state_dir / "node-agent" / "pods").glob("default_sleeper_*/sleeper/pid"), None),
            message="the sleeper pod to start",
        )
        pids.append(int(pid_file.read_text()))
    finally:
        subprocess.run([*command, "down"], env=env, capture_output=True, timeout=120)

    for pid in pids:
        assert_process_gone(pid)
    assert not [p for p in ports if _listening(p)]
    assert not state_dir.exists()
    assert not Path(state["etcd_dir"]).exists()
