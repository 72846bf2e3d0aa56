"""pytest fixtures for tests on the real control plane (integration and e2e).

Registered for the whole suite by `tests/conftest.py` (`pytest_plugins`), so that integration
and e2e tests in one session share one cluster. Nothing starts until a test asks for it, so
unit tests never pay for a control plane.

Session scope:
  assets      tests.support.assets.Assets: paths of kube-*, etcd, kubectl, helm, prometheus, promtool
  cluster     tests.support.cluster.Cluster, started, with the node agent running DEFAULT_NODES
  node_agent  NodeAgentView: where the agent keeps pod logs, volumes and pids
  kube        kubernetes.client.ApiClient with the admin kubeconfig
  kubectl     run kubectl (1.33) against the cluster: kubectl("get", "pods", "-n", ns) -> CompletedProcess
Function scope:
  namespace   a fresh namespace whose `default` ServiceAccount has its token (pods can be
              created at once); deleted afterwards

OPTRUN_TEST_CLUSTER=DIR (or `dev`, for `hack/cluster up`'s) makes `cluster` attach to a running
cluster instead of starting one, and leave it running: handy while iterating on a test.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from optrun.api import crd as crd_mod
from tests.support import assets as assets_mod
from tests.support import cluster as cluster_mod
from tests.support import nodeagent
from tests.support.waiting import wait_for


@dataclasses.dataclass(frozen=True)
class NodeAgentView:
    """The node agent's files, for tests that look behind the API (logs, pids, volumes)."""

    state_dir: Path
    nodes: tuple[nodeagent.NodeSpec, ...]

    def pod_dir(self, namespace: str, name: str) -> Path:
        """The directory of the newest pod `namespace/name` (pods are keyed by uid too)."""
        dirs = sorted(
            (self.state_dir / "pods").glob(f"{namespace}_{name}_*"), key=lambda p: p.stat().st_mtime
        )
        if not dirs:
            raise FileNotFoundError(f"no pod {namespace}/{name} ran on the node agent")
        return dirs[-1]

    def container_log(self, namespace: str, name: str, container: str, restart: int = 0) -> str:
        return (self.pod_dir(namespace, name) / container / f"{restart}.log").read_text(errors="replace")

    def container_pid(self, namespace: str, name: str, container: str) -> int:
        """The pid (and process group) of the container's latest process."""
        return int((self.pod_dir(namespace, name) / container / "pid").read_text())


@pytest.fixture(scope="session")
def assets() -> assets_mod.Assets:
    try:
        return assets_mod.load()
    except assets_mod.AssetsUnavailable as err:
        pytest.fail(str(err), pytrace=False)


@pytest.fixture(scope="session")
def cluster(assets: assets_mod.Assets) -> Iterator[cluster_mod.Cluster]:
    reuse = os.environ.get("OPTRUN_TEST_CLUSTER")
    if reuse:
        workdir = cluster_mod.dev_dir() if reuse == "dev" else Path(reuse)
        attached = cluster_mod.Cluster.attach(workdir)
        if "node-agent" not in attached.processes:
            attached.start_node_agent()
        yield attached
        return
    started = cluster_mod.Cluster(assets=assets)
    try:
        # The OptimizationRun CRD before the controller manager: its garbage collector then
        # collects a deleted run's pods and ConfigMaps at once (see Cluster.start).
        started.start(crds=[crd_mod.crd()])
        started.start_node_agent()
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="session")
def node_agent(cluster: cluster_mod.Cluster) -> NodeAgentView:
    config = nodeagent.AgentConfig(**json.loads((cluster.workdir / "node-agent.json").read_text()))
    return NodeAgentView(
        state_dir=Path(config.state_dir), nodes=tuple(nodeagent.NodeSpec(**n) for n in config.nodes)
    )


@pytest.fixture(scope="session")
def kube(cluster: cluster_mod.Cluster) -> Iterator[Any]:
    from kubernetes import config

    client = config.new_client_from_config(config_file=str(cluster.kubeconfig))  # type: ignore[no-untyped-call]
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def kubectl(cluster: cluster_mod.Cluster, assets: assets_mod.Assets) -> Any:
    def run(*args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(assets.kubectl), "--kubeconfig", str(cluster.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    return run


@pytest.fixture
def namespace(request: pytest.FixtureRequest, cluster: cluster_mod.Cluster) -> Iterator[str]:
    base = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{base}-{uuid.uuid4().hex[:6]}"
    api = cluster.api()
    api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    def default_account_has_token() -> bool:
        account = api.get_or_none(f"/api/v1/namespaces/{name}/serviceaccounts/default")
        return bool(account and account.get("secrets"))

    wait_for(default_account_has_token, message=f"the default ServiceAccount of {name}")
    yield name
    api.delete(f"/api/v1/namespaces/{name}")
