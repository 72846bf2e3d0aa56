"""A real Prometheus (Debian's 2.42) for the monitoring tests, and the part of prometheus-operator
it needs: turning the chart's ServiceMonitor and PodMonitor into scrape configurations.

prometheus-operator is not here, and its Kubernetes service discovery would not work either: the
node agent's pods have 127.x addresses, which the API server refuses in Endpoints. So
`MonitorTargets` does what the two would do together, from the monitors the chart installed:
it selects pods (PodMonitor) or a Service's pods (ServiceMonitor) by the monitors' selectors and
namespace selectors, resolves the named ports, and writes file-based service discovery files
carrying the same `__meta_kubernetes_*` labels Kubernetes discovery would; each scrape job gets
the relabelings prometheus-operator generates (namespace, pod, container, service, endpoint,
job) followed by the monitor's own `relabelings`. A pod shows up in Prometheus within a polling
interval of appearing, and disappears (its series going stale) when it ends.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests
import yaml

from tests.support.kubeapi import KubeApi
from tests.support.waiting import wait_for

log = logging.getLogger(__name__)

JSON = dict[str, Any]


def _sanitize(name: str) -> str:
    """A Kubernetes label name as Prometheus discovery spells it in __meta_* labels."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def _snake(key: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()


def _relabel(rule: JSON) -> JSON:
    """A monitor's RelabelConfig (camelCase) as Prometheus configuration (snake_case)."""
    out = {_snake(k): v for k, v in rule.items()}
    if "action" in out:
        out["action"] = str(out["action"]).lower()
    return out


def _selects(selector: JSON, labels: dict[str, str]) -> bool:
    if selector.get("matchExpressions"):
        raise NotImplementedError("matchExpressions: the chart's monitors use matchLabels only")
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def _in_namespaces(monitor: JSON, namespace: str) -> bool:
    ns_selector = monitor["spec"].get("namespaceSelector") or {}
    if ns_selector.get("any"):
        return True
    names = ns_selector.get("matchNames") or [monitor["metadata"]["namespace"]]
    return namespace in names


def _pod_meta(pod: JSON, container: JSON, port: JSON) -> dict[str, str]:
    meta = {
        "__meta_kubernetes_namespace": pod["metadata"]["namespace"],
        "__meta_kubernetes_pod_name": pod["metadata"]["name"],
        "__meta_kubernetes_pod_ip": pod["status"].get("podIP", ""),
        "__meta_kubernetes_pod_phase": pod["status"].get("phase", ""),
        "__meta_kubernetes_pod_node_name": pod["spec"].get("nodeName", ""),
        "__meta_kubernetes_pod_container_name": container["name"],
        "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
        "__meta_kubernetes_pod_container_port_number": str(port["containerPort"]),
    }
    for key, value in (pod["metadata"].get("labels") or {}).items():
        meta[f"__meta_kubernetes_pod_label_{_sanitize(key)}"] = value
        meta[f"__meta_kubernetes_pod_labelpresent_{_sanitize(key)}"] = "true"
    return meta


def _live(pod: JSON) -> bool:
    # prometheus-operator drops pods that ended (phase Succeeded or Failed) and those without an IP.
    return bool(pod["status"].get("podIP")) and pod["status"].get("phase") not in ("Succeeded", "Failed")


def _named_ports(pod: JSON, name: str | int) -> Iterator[tuple[JSON, JSON]]:
    for container in pod["spec"]["containers"]:
        for port in container.get("ports") or []:
            if port.get("name") == name or port["containerPort"] == name:
                yield container, port


# What kube-prometheus-stack's Prometheus selects with the chart's default values
# (prometheus.prometheusSpec.{serviceMonitor,podMonitor,rule}SelectorNilUsesHelmValues: true, its
# templates/prometheus/prometheus.yaml, read at chart 88.5): the monitors and rules labelled
# `release: <its own release name>`, in every namespace (its namespace selectors are {}).
SELECTS = {  # a Prometheus object's selector -> the resource and kind it selects
    "serviceMonitorSelector": ("servicemonitors", "ServiceMonitor"),
    "podMonitorSelector": ("podmonitors", "PodMonitor"),
    "ruleSelector": ("prometheusrules", "PrometheusRule"),
}


def kube_prometheus_stack_selectors(release: str) -> dict[str, JSON]:
    """The selectors of the Prometheus object kube-prometheus-stack `release` creates by default."""
    return {name: {"matchLabels": {"release": release}} for name in SELECTS}


def label_selector(selector: JSON) -> str:
    """A metav1.LabelSelector as the API server's labelSelector parameter."""
    parts = [f"{k}={v}" for k, v in (selector.get("matchLabels") or {}).items()]
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], ",".join(expr.get("values") or [])
        parts.append(
            {"In": f"{key} in ({values})", "NotIn": f"{key} notin ({values})", "Exists": key}.get(
                op, f"!{key}"
            )
        )
    return ",".join(parts)


def selected_by(api: KubeApi, selectors: dict[str, JSON], namespace: str) -> list[JSON]:
    """The ServiceMonitors, PodMonitors and PrometheusRules in `namespace` that a Prometheus with
    these selectors picks up, selected by the API server as prometheus-operator has it do."""
    found: list[JSON] = []
    for name, selector in selectors.items():
        resource, kind = SELECTS[name]
        path = f"/apis/monitoring.coreos.com/v1/namespaces/{namespace}/{resource}"
        items = api.get(path, labelSelector=label_selector(selector))["items"]
        found += [{**item, "kind": kind} for item in items]  # a list's items carry no kind
    return found


class MonitorTargets:
    """Scrape jobs for the given ServiceMonitors and PodMonitors, kept up to date in SD files."""

    def __init__(self, api: KubeApi, monitors: list[JSON], sd_dir: Path, poll: float = 0.25) -> None:
        self.api, self.monitors, self.sd_dir, self.poll = api, monitors, sd_dir, poll
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._written: dict[Path, str] = {}

    def _jobs(self) -> Iterator[tuple[JSON, int, JSON]]:
        for monitor in self.monitors:
            key = "endpoints" if monitor["kind"] == "ServiceMonitor" else "podMetricsEndpoints"
            for i, endpoint in enumerate(monitor["spec"][key]):
                yield monitor, i, endpoint

    @staticmethod
    def job_name(monitor: JSON, i: int) -> str:
        kind = "serviceMonitor" if monitor["kind"] == "ServiceMonitor" else "podMonitor"
        return f"{kind}/{monitor['metadata']['namespace']}/{monitor['metadata']['name']}/{i}"

    def _sd_file(self, monitor: JSON, i: int) -> Path:
        return self.sd_dir / (re.sub(r"[^a-zA-Z0-9_.-]", "_", self.job_name(monitor, i)) + ".json")

    def scrape_configs(self) -> list[JSON]:
        configs = []
        for monitor, i, endpoint in self._jobs():
            name = monitor["metadata"]["name"]
            ns = monitor["metadata"]["namespace"]
            relabel: list[JSON] = [
                {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
                {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            ]
            if monitor["kind"] == "ServiceMonitor":
                relabel += [
                    {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
                    # The job is the Service's name (or the value of its `jobLabel` label).
                    {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job"},
                ]
                if monitor["spec"].get("jobLabel"):
                    label = _sanitize(monitor["spec"]["jobLabel"])
                    relabel.append(
                        {
                            "source_labels": [f"__meta_kubernetes_service_label_{label}"],
                            "target_label": "job",
                            "regex": "(.+)",
                        }
                    )
            else:
                relabel.append({"target_label": "job", "replacement": f"{ns}/{name}"})
            relabel.append({"target_label": "endpoint", "replacement": str(endpoint["port"])})
            relabel += [_relabel(r) for r in endpoint.get("relabelings") or []]
            config: JSON = {
                "job_name": self.job_name(monitor, i),
                "metrics_path": endpoint.get("path", "/metrics"),
                "file_sd_configs": [{"files": [str(self._sd_file(monitor, i))], "refresh_interval": "1s"}],
                "relabel_configs": relabel,
                "honor_labels": bool(endpoint.get("honorLabels", False)),
            }
            if endpoint.get("interval"):
                config["scrape_interval"] = endpoint["interval"]
            if endpoint.get("scrapeTimeout"):
                config["scrape_timeout"] = endpoint["scrapeTimeout"]
            if endpoint.get("metricRelabelings"):
                config["metric_relabel_configs"] = [_relabel(r) for r in endpoint["metricRelabelings"]]
            configs.append(config)
        return configs

    def _targets(self, monitor: JSON, endpoint: JSON, pods: list[JSON], services: list[JSON]) -> list[JSON]:
        groups = []
        if monitor["kind"] == "PodMonitor":
            for pod in pods:
                if not (_live(pod) and _in_namespaces(monitor, pod["metadata"]["namespace"])):
                    continue
                if not _selects(monitor["spec"]["selector"], pod["metadata"].get("labels") or {}):
                    continue
                for container, port in _named_ports(pod, endpoint["port"]):
                    address = f"{pod['status']['podIP']}:{port['containerPort']}"
                    groups.append({"targets": [address], "labels": _pod_meta(pod, container, port)})
            return groups
        for service in services:
            meta = service["metadata"]
            if not _in_namespaces(monitor, meta["namespace"]):
                continue
            if not _selects(monitor["spec"]["selector"], meta.get("labels") or {}):
                continue
            for service_port in service["spec"].get("ports") or []:
                if service_port.get("name") != endpoint["port"]:
                    continue
                target_port = service_port.get("targetPort", service_port["port"])
                # The Endpoints controller's part: the Service's ready-or-not pods, by its selector.
                selector = {"matchLabels": service["spec"].get("selector") or {}}
                for pod in pods:
                    if pod["metadata"]["namespace"] != meta["namespace"] or not _live(pod):
                        continue
                    if not _selects(selector, pod["metadata"].get("labels") or {}):
                        continue
                    for container, port in _named_ports(pod, target_port):
                        labels = _pod_meta(pod, container, port)
                        labels["__meta_kubernetes_service_name"] = meta["name"]
                        for key, value in (meta.get("labels") or {}).items():
                            labels[f"__meta_kubernetes_service_label_{_sanitize(key)}"] = value
                        labels["__meta_kubernetes_endpoint_port_name"] = str(service_port.get("name", ""))
                        address = f"{pod['status']['podIP']}:{port['containerPort']}"
                        groups.append({"targets": [address], "labels": labels})
        return groups

    def refresh(self) -> None:
        pods = self.api.get("/api/v1/pods")["items"]
        services = self.api.get("/api/v1/services")["items"]
        for monitor, i, endpoint in self._jobs():
            text = json.dumps(self._targets(monitor, endpoint, pods, services), sort_keys=True)
            path = self._sd_file(monitor, i)
            if self._written.get(path) != text:
                tmp = path.with_suffix(".tmp")
                tmp.write_text(text)
                os.replace(tmp, path)  # atomic: Prometheus never reads half a file
                self._written[path] = text

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception as err:  # the API server may be briefly busy; the next poll retries
                log.warning("target refresh failed: %s", err)
            self._stop.wait(self.poll)

    def __enter__(self) -> MonitorTargets:
        self.sd_dir.mkdir(parents=True, exist_ok=True)
        self.refresh()
        self._thread = threading.Thread(target=self._loop, name="monitor-targets", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)


class PrometheusError(AssertionError):
    """A query Prometheus refused or failed; the message carries its error."""


class Prometheus:
    """One Prometheus process on a free 127.0.0.1 port, with its own TSDB in `workdir`."""

    def __init__(self, binary: Path, workdir: Path, port: int) -> None:
        self.binary, self.workdir, self.port = binary, workdir, port
        self.url = f"http://127.0.0.1:{port}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._session = requests.Session()
        self._session.trust_env = False

    @property
    def log(self) -> Path:
        return self.workdir / "prometheus.log"

    def start(self, config: JSON, rule_groups: list[JSON] | None = None) -> Prometheus:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if rule_groups:
            rules = self.workdir / "rules.yaml"
            rules.write_text(yaml.safe_dump({"groups": rule_groups}, sort_keys=False))
            config = {**config, "rule_files": [str(rules)]}
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        with open(self.log, "wb") as out:
            self._proc = subprocess.Popen(
                [
                    str(self.binary),
                    f"--config.file={self.workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        wait_for(self._ready, timeout=60, message=lambda: f"Prometheus ready; log:\n{self.tail()}")
        return self

    def _ready(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self._proc.returncode}:\n{self.tail()}")
        return self._session.get(f"{self.url}/-/ready", timeout=2).status_code == 200

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, 15)
        try:
            self._proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, 9)
            self._proc.wait(5)

    def api(self, path: str, **params: Any) -> Any:
        response = self._session.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
        body = response.json()
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[JSON]:
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return list(self.api("query", **params)["result"])

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[JSON]:
        return list(
            self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step:g}")[
                "result"
            ]
        )

    def label_values(self, label: str, match: str) -> list[str]:
        return sorted(self.api(f"label/{label}/values", **{"match[]": match}))

    def targets(self) -> list[JSON]:
        return list(self.api("targets")["activeTargets"])


def wait_until_scraped(prom: Prometheus, expr: str, timeout: float = 60) -> list[JSON]:
    return wait_for(lambda: prom.query(expr), timeout=timeout, message=f"Prometheus to have {expr}")


def now() -> float:
    return time.time()
