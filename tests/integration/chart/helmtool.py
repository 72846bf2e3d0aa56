"""helm and kubectl around the optrun chart, for the chart and monitoring integration tests.

`Helm` runs the real helm 4 binary (tests/support/assets.py) against the test cluster's admin
kubeconfig; values are passed as YAML files, like a user's `-f values.yaml`. `node_agent_values`
holds the values every install on the test cluster needs, each with the node agent's reason.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from tests.support.waiting import wait_for

REPO = Path(__file__).resolve().parents[3]
CHART = REPO / "charts" / "optrun"
MONITORING_CRDS = REPO / "tests" / "fixtures" / "monitoring-crds.yaml"
CERT_MANAGER_CRDS = REPO / "tests" / "fixtures" / "cert-manager-crds.yaml"
KOPF_CRDS = CHART / "crds" / "kopf-peering.yaml"


class Yaml12Loader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where `1e-08` (no dot) is a string; helm's toYaml writes floats so."""


Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?[eE][-+]?[0-9]+|[0-9]+\.[0-9]*|\.[0-9]+)$"),
    list("-+0123456789."),
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_agent_values(namespace: str) -> dict[str, Any]:
    """Values for an install on the test cluster, and why each differs from the default.

    The node agent runs every pod in the host's network namespace and the operator binds its
    ports on all addresses, so two operator processes cannot run at once: one replica, replaced
    by Recreate (a surge pod would find its ports taken). Free ports keep the operator and the
    runtime clear of anything else on this machine. The operator watches only `namespace` (not cluster-wide), so
    runs that other tests leave in the shared cluster are never picked up."""
    return {
        "replicaCount": 1,
        "updateStrategy": {"type": "Recreate", "rollingUpdate": None},
        "ports": {"metrics": free_port(), "health": free_port()},
        "operator": {
            "clusterWide": False,
            "namespaces": [namespace],
            "runtime": {"metricsPort": free_port()},
            # Looks at live runs often, so a tiny run is judged within seconds of its end.
            "scrapeIntervalSeconds": 1,
        },
    }


def merged(base: Mapping[str, Any], *overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge of values (later wins; None deletes the key, as in helm)."""
    out: dict[str, Any] = dict(base)
    for override in overrides:
        for key, value in override.items():
            if value is None:
                out[key] = None
            elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
                out[key] = merged(out[key], value)
            else:
                out[key] = value
    return out


@dataclasses.dataclass
class Helm:
    binary: Path
    kubeconfig: Path

    def run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.binary), "--kubeconfig", str(self.kubeconfig), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def _values_args(self, values: Mapping[str, Any] | None) -> Iterator[str]:
        if values:
            # Left for the OS to clean: helm reads it after this generator has moved on.
            with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="values-", delete=False) as f:
                yaml.safe_dump(dict(values), f)
            yield from ("-f", f.name)

    def template(
        self,
        values: Mapping[str, Any] | None = None,
        *,
        release: str = "optrun",
        namespace: str = "optrun-system",
        kube_version: str | None = None,
    ) -> list[dict[str, Any]]:
        """The rendered objects; `kube_version` renders for that API server (as `helm install` does
        for the cluster it talks to), else for helm's default (a recent one)."""
        args = ["--kube-version", kube_version] if kube_version else []
        out = self.run(
            "template", release, str(CHART), "--namespace", namespace, *args, *self._values_args(values)
        )
        return [d for d in yaml.load_all(out.stdout, Loader=Yaml12Loader) if d]

    def notes(self, values: Mapping[str, Any] | None = None, *, namespace: str = "optrun-system") -> str:
        """NOTES.txt as `helm install` prints it, rendered without a cluster (a client dry run)."""
        out = self.run(
            "install",
            "optrun",
            str(CHART),
            "--dry-run=client",
            "--namespace",
            namespace,
            *self._values_args(values),
        )
        assert "\nNOTES:\n" in out.stdout, out.stdout
        return out.stdout.split("\nNOTES:\n", 1)[1]

    def install(
        self, release: str, namespace: str, values: Mapping[str, Any]
    ) -> subprocess.CompletedProcess[str]:
        # --take-ownership: the test cluster is shared, and other tests (or an earlier release
        # with crds.keep) may have left the OptimizationRun CRD without this release's ownership
        # annotations; a user adopting a CRD applied by kubectl does the same.
        return self.run(
            "install",
            release,
            str(CHART),
            "--namespace",
            namespace,
            "--take-ownership",
            *self._values_args(values),
        )

    def upgrade(
        self, release: str, namespace: str, values: Mapping[str, Any]
    ) -> subprocess.CompletedProcess[str]:
        return self.run("upgrade", release, str(CHART), "--namespace", namespace, *self._values_args(values))

    def uninstall(
        self, release: str, namespace: str, *, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.run(
            "uninstall", release, "--namespace", namespace, "--wait", "--timeout", "60s", check=check
        )


def apply_crds(kubectl: Any, *paths: Path) -> None:
    """Create or update CRDs and wait until each is Established (its REST endpoint serves).

    `--validate=false`, as the docs tell users of API servers before 1.25 (this control plane is
    1.20): the generated CRD carries CEL rules (x-kubernetes-validations), which kubectl's
    validation against such a server's OpenAPI refuses (server-side apply refuses them too),
    while a client-side apply without validation lets the server drop the field it does not know."""
    for path in paths:
        kubectl("apply", "--validate=false", "-f", str(path))
    names = [d["metadata"]["name"] for p in paths for d in yaml.safe_load_all(p.read_text()) if d]

    def established(name: str) -> bool:
        jsonpath = "jsonpath={.status.conditions[?(@.type=='Established')].status}"
        return bool(kubectl("get", "crd", name, "-o", jsonpath).stdout == "True")

    for name in names:
        wait_for(functools.partial(established, name), message=f"CRD {name} to be Established")
