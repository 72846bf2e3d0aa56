"""Fixtures for the operator's integration tests: the CRDs, the operator as a real process acting as
its own ServiceAccount with only the chart's RBAC rules, and small helpers over the runs.

  operator_crds   the OptimizationRun CRD (generated from optrun/api now, so it carries every
                  status field this checkout writes) and crds/kopf-peering.yaml, Established
  start_operator  start_operator(namespace, **settings) -> OperatorProcess: `optrun operator`
                  watching `namespace`, as ServiceAccount optrun-operator bound to a Role made
                  of optrun.operator.rbac.RULES and nothing else; stopped after the test
  runs            Runs(namespace): create a tiny run, read it, wait for a phase, list its pods
                  and Events

The runtime pods run the real `optrun runtime` under the node agent, where all pods share the
host's network: the operator tells each runtime to listen on its own pod IP.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from optrun.api import crd as crd_mod
from optrun.operator import rbac
from tests.support.kubeapi import ApiError, KubeApi
from tests.support.waiting import wait_for

REPO_ROOT = Path(__file__).resolve().parents[3]
OPTRUN = Path(sys.executable).parent / "optrun"
GROUP, VERSION, PLURAL = "optrun.io", "v1alpha1", "optimizationruns"
SERVICE_ACCOUNT = "optrun-operator"

# The smallest run that exercises every stage the operator sees: a few seconds of CPU training.
TINY_SPEC: dict[str, Any] = {
    "workload": {"model": "tiny-lm", "sequenceLength": 32, "batchSize": 4},
    "optimizations": {
        "kernels": {"enabled": False, "mode": "eager"},
        "compression": {"enabled": False},
        "kvCache": {"enabled": False},
    },
    "rlvr": {"enabled": False},
    "training": {
        "epochs": 1,
        "stepsPerEpoch": 20,
        "warmupSteps": 2,
        "targetAccuracy": 0.0,
        "evalBatches": 1,
        "checkpoint": {"everySteps": 5, "keep": 2},
    },
    "acceptance": {"repeats": 1, "targetPassRate": 0.85, "minimumPassRate": 0.7},
    "resources": {"gpus": 1, "cpu": "1", "memory": "2Gi"},
    "backoffLimit": 2,
}


def tiny_spec(**changes: Any) -> dict[str, Any]:
    """TINY_SPEC with sections replaced or merged one level deep: tiny_spec(training={"epochs": 2})."""
    spec = copy.deepcopy(TINY_SPEC)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _apply(api: KubeApi, path: str, body: dict[str, Any]) -> None:
    try:
        api.create(path, body)
    except ApiError as err:
        if err.status != 409:
            raise
        current = api.get(f"{path}/{body['metadata']['name']}")
        body = {
            **body,
            "metadata": {**body["metadata"], "resourceVersion": current["metadata"]["resourceVersion"]},
        }
        api.replace(f"{path}/{body['metadata']['name']}", body)


@pytest.fixture(scope="session")
def operator_crds(cluster: Any) -> None:
    api = cluster.api()
    path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    docs = [crd_mod.crd(), *yaml.safe_load_all((REPO_ROOT / "crds" / "kopf-peering.yaml").read_text())]
    for doc in docs:
        _apply(api, path, doc)

    def established() -> bool:
        for doc in docs:
            got = api.get(f"{path}/{doc['metadata']['name']}")
            conds = {c["type"]: c["status"] for c in got.get("status", {}).get("conditions", [])}
            if conds.get("Established") != "True":
                return False
        return True

    wait_for(established, message="the CRDs to be Established")
    # The REST endpoint of a new CRD may lag Established by a moment.
    wait_for(lambda: api.get(f"/apis/{GROUP}/{VERSION}/{PLURAL}") is not None, message="the runs endpoint")


@dataclasses.dataclass
class OperatorProcess:
    """`optrun operator` as a child process in a session of its own."""

    argv: list[str]
    env: dict[str, str]
    log: Path
    metrics_port: int
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> OperatorProcess:
        assert self.popen is None or self.popen.poll() is not None, "already running"
        with open(self.log, "ab") as out:
            out.write(f"\n===== start {self.starts + 1} at {time.strftime('%H:%M:%S')} =====\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=REPO_ROOT,
            )
        self.starts += 1
        wait_for(self._serving, timeout=60, message=self.tail)
        return self

    def _serving(self) -> bool:
        if self.popen is not None and self.popen.poll() is not None:
            raise AssertionError(f"the operator exited with {self.popen.returncode}:\n{self.tail()}")
        return bool(self.metrics())

    def metrics(self) -> str:
        with requests.Session() as s:
            s.trust_env = False
            return s.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2).text

    def kill(self) -> None:
        """SIGKILL: no cleanup, no goodbye to the peers, as a crashed node would."""
        assert self.popen is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(20)
        except subprocess.TimeoutExpired:
            self.kill()

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def grant_operator_rbac(kube: Any, namespace: str, *, clusterwide: bool = False) -> None:
    """ServiceAccount optrun-operator with optrun.operator.rbac.RULES: a Role in `namespace`, or
    (clusterwide) a ClusterRole named after the namespace, bound to it."""
    core, rbac_api = k8s.CoreV1Api(kube), k8s.RbacAuthorizationV1Api(kube)
    docs = rbac.manifests(
        name=f"optrun-operator-{namespace}" if clusterwide else "optrun-operator",
        namespace=namespace,
        service_account=SERVICE_ACCOUNT,
        watch_namespaces=None if clusterwide else [namespace],
    )
    for doc in docs:
        kind = doc["kind"]
        if kind == "ServiceAccount":
            core.create_namespaced_service_account(namespace, doc)
        elif kind == "Role":
            rbac_api.create_namespaced_role(namespace, doc)
        elif kind == "RoleBinding":
            rbac_api.create_namespaced_role_binding(namespace, doc)
        elif kind == "ClusterRole":
            rbac_api.create_cluster_role(doc)
        elif kind == "ClusterRoleBinding":
            rbac_api.create_cluster_role_binding(doc)


def grant_managed_webhook_rbac(kube: Any, namespace: str) -> str:
    """What `--webhook managed` needs beyond RULES (rbac.MANAGED_WEBHOOK_RULES), as a ClusterRole
    bound to the operator's account; returns its name."""
    rbac_api = k8s.RbacAuthorizationV1Api(kube)
    name = f"optrun-webhook-{namespace}"[:63]
    rules = [{k: r[k] for k in ("apiGroups", "resources", "verbs")} for r in rbac.MANAGED_WEBHOOK_RULES]
    rbac_api.create_cluster_role({"metadata": {"name": name}, "rules": rules})
    rbac_api.create_cluster_role_binding(
        {
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": namespace}],
        }
    )
    return name


def revoke_cluster_rbac(kube: Any, namespace: str) -> None:
    rbac_api = k8s.RbacAuthorizationV1Api(kube)
    with contextlib.suppress(ApiException):
        rbac_api.delete_cluster_role_binding(f"optrun-operator-{namespace}")
    with contextlib.suppress(ApiException):
        rbac_api.delete_cluster_role(f"optrun-operator-{namespace}")
    for name in (f"optrun-webhook-{namespace}"[:63],):
        with contextlib.suppress(ApiException):
            rbac_api.delete_cluster_role_binding(name)
        with contextlib.suppress(ApiException):
            rbac_api.delete_cluster_role(name)
    with contextlib.suppress(ApiException):
        k8s.AdmissionregistrationV1Api(kube).delete_validating_webhook_configuration(
            f"{namespace}.optrun.io"[:253]
        )


@pytest.fixture
def start_operator(
    cluster: Any, kube: Any, operator_crds: None, tmp_path: Path
) -> Iterator[Callable[..., OperatorProcess]]:
    started: list[OperatorProcess] = []
    clusterwide_namespaces: list[str] = []

    def start(
        namespace: str,
        *,
        clusterwide: bool = False,
        grant: bool = True,
        name: str = "operator",
        api_server: str | None = None,
        **settings: Any,
    ) -> OperatorProcess:
        """`api_server`: the URL the operator's kubeconfig names instead of the API server's (a
        proxy in front of it, with a certificate the cluster CA signed)."""
        if grant:
            grant_operator_rbac(kube, namespace, clusterwide=clusterwide)
            if clusterwide or settings.get("webhook") == "managed":
                clusterwide_namespaces.append(namespace)
            if settings.get("webhook") == "managed":
                grant_managed_webhook_rbac(kube, namespace)
                # One configuration per test, named after its namespace (removed afterwards).
                settings.setdefault("webhook_configuration", f"{namespace}.optrun.io")
                settings.setdefault("webhook_port", free_port())
        kubeconfig = cluster.service_account_kubeconfig(
            namespace, SERVICE_ACCOUNT, tmp_path / f"{name}.kubeconfig"
        )
        if api_server is not None:
            doc = yaml.safe_load(kubeconfig.read_text())
            doc["clusters"][0]["cluster"]["server"] = api_server
            kubeconfig.write_text(yaml.safe_dump(doc))
        port = free_port()
        values = {
            "namespaces": "" if clusterwide else namespace,
            "scrape_interval_seconds": 1,
            "peering_mode": "standalone",
            "metrics_port": port,
            "health_port": 0,
            "live_gate_grace_seconds": 5,
            "runtime_startup_seconds": 60,
            # Pods share the host's network under the node agent: each runtime listens on its own IP.
            "runtime_metrics_address": "$(POD_IP)",
            "termination_grace_seconds": 15,
            # A test that asks for the webhook says so (webhook="managed"): it needs RBAC on
            # ValidatingWebhookConfigurations, which the operator's namespace Role cannot give.
            "webhook": "off",
            "retry_backoff_seconds": 1,
            **settings,
        }
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPTRUN_OPERATOR_")}
        env.update({f"OPTRUN_OPERATOR_{k.upper()}": str(v) for k, v in values.items()})
        env.update({"KUBECONFIG": str(kubeconfig), "PYTHONUNBUFFERED": "1"})
        env.pop("KUBERNETES_SERVICE_HOST", None)  # never mistake the test process for a pod
        proc = OperatorProcess(
            argv=[str(OPTRUN), "operator"], env=env, log=tmp_path / f"{name}.log", metrics_port=port
        )
        started.append(proc)
        # The authorizer sees a new binding a moment after it is written; the operator must not
        # start (and give up) before it does.
        wait_for(lambda: _can_list_runs(kubeconfig, namespace), message="the operator's RBAC to take effect")
        return proc.start()

    yield start
    for proc in started:
        proc.stop()
    for ns in clusterwide_namespaces:
        revoke_cluster_rbac(kube, ns)


def _can_list_runs(kubeconfig: Path, namespace: str) -> bool:
    from kubernetes import config as k8s_config

    client = k8s_config.new_client_from_config(config_file=str(kubeconfig))
    try:
        k8s.CustomObjectsApi(client).list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
        return True
    finally:
        client.close()


class Runs:
    """OptimizationRuns and their children in one namespace, through the official client."""

    def __init__(self, kube: Any, namespace: str) -> None:
        self.namespace = namespace
        self.objects = k8s.CustomObjectsApi(kube)
        self.core = k8s.CoreV1Api(kube)

    def create(self, name: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "OptimizationRun",
            "metadata": {"name": name},
            "spec": spec if spec is not None else tiny_spec(),
        }
        return self.objects.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)  # type: ignore[no-any-return]

    def get(self, name: str) -> dict[str, Any]:
        return self.objects.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)  # type: ignore[no-any-return]

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.objects.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name, {"spec": spec}
        )

    def delete(self, name: str) -> None:
        self.objects.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

    def status(self, name: str) -> dict[str, Any]:
        return self.get(name).get("status") or {}

    def conditions(self, name: str) -> dict[str, dict[str, Any]]:
        return {c["type"]: c for c in self.status(name).get("conditions", [])}

    def wait_phase(self, name: str, *phases: str, timeout: float = 120) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            st = self.status(name)
            return st if st.get("phase") in phases else None

        return wait_for(
            reached,
            timeout=timeout,
            message=lambda: f"run {name} to reach {phases}; status {self.status(name)}",
        )

    def pods(self, name: str) -> list[Any]:
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"optrun.io/run={name}").items
        return sorted(pods, key=lambda p: p.metadata.name)

    def events(self, name: str) -> list[Any]:
        items = self.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={name},involvedObject.kind=OptimizationRun"
        ).items
        return sorted(items, key=lambda e: e.metadata.creation_timestamp)

    def event_reasons(self, name: str) -> list[str]:
        return [e.reason for e in self.events(name)]

    def wait_events(self, name: str, *reasons: str, timeout: float = 15) -> list[str]:
        """The run's Event reasons, once all of `reasons` are among them (they are posted in the
        background, a moment after the status that caused them)."""

        def posted() -> list[str] | None:
            got = self.event_reasons(name)
            return got if set(reasons) <= set(got) else None

        return wait_for(
            posted,
            timeout=timeout,
            message=lambda: f"events {reasons} of {name}; have {self.event_reasons(name)}",
        )

    def wait_pod_phase(self, pod: str, *phases: str, timeout: float = 60) -> Any:
        def reached() -> Any:
            p = self.core.read_namespaced_pod(pod, self.namespace)
            return p if p.status.phase in phases else None

        return wait_for(reached, timeout=timeout, message=f"pod {pod} to reach {phases}")

    def wait_no_live_pods(self, timeout: float = 60) -> None:
        """Until no runtime pod in the namespace is still running."""

        def settled() -> bool:
            pods = self.core.list_namespaced_pod(self.namespace, label_selector="optrun.io/run").items
            return all(p.status.phase in ("Succeeded", "Failed") for p in pods)

        wait_for(settled, timeout=timeout, message="the namespace's runtime pods to finish")


@pytest.fixture
def runs(kube: Any, namespace: str) -> Iterator[Runs]:
    view = Runs(kube, namespace)
    yield view
    # Delete the runs first (an operator still running would answer a deleted pod with the next
    # attempt), releasing the operator's finalizer: with the operator stopped before the namespace
    # goes, a run holding it would keep the namespace Terminating for ever.
    for item in view.objects.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]:
        name = item["metadata"]["name"]
        with contextlib.suppress(ApiException):
            view.objects.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, {"metadata": {"finalizers": None}}
            )
        with contextlib.suppress(ApiException):
            view.delete(name)
    # Leave no runtime process behind to compete for the CPU with the next test.
    for pod in view.core.list_namespaced_pod(namespace, label_selector="optrun.io/run").items:
        with contextlib.suppress(ApiException):
            view.core.delete_namespaced_pod(pod.metadata.name, namespace, grace_period_seconds=0)
    wait_for(
        lambda: not view.core.list_namespaced_pod(namespace, label_selector="optrun.io/run").items,
        timeout=60,
        message="the runtime pods of this test to be gone",
    )


def pvc(
    kube: Any, namespace: str, name: str = "checkpoints", access_modes: tuple[str, ...] = ("ReadWriteOnce",)
) -> str:
    """A claim for checkpoints; the node agent provisions a directory that outlives each pod."""
    k8s.CoreV1Api(kube).create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": name},
            "spec": {"accessModes": list(access_modes), "resources": {"requests": {"storage": "1Gi"}}},
        },
    )
    return name
