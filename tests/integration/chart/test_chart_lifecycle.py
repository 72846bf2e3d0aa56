"""The chart's lifecycle on the real control plane: `helm install` -> the operator pod, run by the
node agent with the chart's ServiceAccount token, becomes Ready -> a run (the quickstart, shrunk
to seconds) reaches a decision -> `helm upgrade` with changed values rolls the operator, and the
new operator finishes the run's deletion -> `helm uninstall` leaves no operator object behind,
and keeps the CRD as asked."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.chart.helmtool import REPO, Helm, free_port, merged, node_agent_values
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

CRD = "optimizationruns.optrun.io"


def shrunk_quickstart(name: str) -> dict[str, Any]:
    """examples/quickstart.yaml cut to a few seconds of CPU: the same manifest, each stage off
    or minimal, one GPU asked for so the chart's GPU product label takes part in scheduling."""
    run: dict[str, Any] = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    run["metadata"]["name"] = name
    spec = run["spec"]
    spec["workload"].update(sequenceLength=16, batchSize=2)
    spec["optimizations"] = {
        "kernels": {"enabled": False},
        "compression": {"enabled": False},
        "kvCache": {"enabled": False},
    }
    spec["training"] = {
        "epochs": 1,
        "stepsPerEpoch": 8,
        "warmupSteps": 2,
        "evalBatches": 1,
        "targetAccuracy": 0.0,
        "checkpoint": {"everySteps": 4, "keep": 1},
    }
    spec["rlvr"] = {"enabled": False}
    spec["acceptance"] = {"repeats": 1, "targetPassRate": 0.85, "minimumPassRate": 0.7}
    spec["resources"] = {"gpus": 1, "gpuProduct": "NVIDIA-H100-80GB-HBM3", "cpu": "1", "memory": "2Gi"}
    return run


def _json(kubectl: Any, *args: str) -> Any:
    return json.loads(kubectl(*args, "-o", "json").stdout)


def _operator_pods(kubectl: Any, namespace: str, release: str) -> list[dict[str, Any]]:
    selector = f"app.kubernetes.io/instance={release},app.kubernetes.io/component=operator"
    return list(_json(kubectl, "get", "pods", "-n", namespace, "-l", selector)["items"])


def _ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return not pod["metadata"].get("deletionTimestamp") and any(
        c["type"] == "Ready" and c["status"] == "True" for c in conditions
    )


@pytest.fixture
def release(namespace: str) -> Iterator[str]:
    yield f"optrun-{uuid.uuid4().hex[:6]}"


def test_install_run_to_a_decision_upgrade_rolls_the_operator_and_uninstall_cleans_up(
    assets: Any, cluster: Any, kubectl: Any, node_agent: Any, namespace: str, release: str, tmp_path: Path
) -> None:
    helm = Helm(assets.helm, cluster.kubeconfig)
    port = free_port()  # the webhook's: container port and Service port alike (see _webhook)
    values = merged(
        node_agent_values(namespace),
        {"crds": {"enabled": True, "keep": True}, "webhook": {"port": port, "servicePort": port}},
    )
    # What a 1.21+ API server labels every namespace with; the webhook selects the watched ones by it.
    kubectl("label", "namespace", namespace, f"kubernetes.io/metadata.name={namespace}", "--overwrite")
    helm.install(release, namespace, values)
    try:
        _lifecycle(helm, kubectl, node_agent, namespace, release, values, tmp_path)
    finally:
        helm.uninstall(release, namespace, check=False)


def _webhook(kubectl: Any, ns: str, release: str, port: int, tmp: Path, operator_log: Any) -> None:
    """kubectl apply of a bad run fails naming the field, through the chart's webhook configuration,
    Service and certificate. The node agent runs pods in the host's network and has no Service
    proxy, so the test stands in for kube-proxy: the chart's Service is replaced by an ExternalName
    one (the API server resolves those itself) pointing at the host, on the port the operator pod
    listens on; the API server still verifies the chart's certificate for <service>.<ns>.svc."""
    service = f"{release}-webhook"
    config = _json(kubectl, "get", "validatingwebhookconfiguration", f"{release}-{ns}")
    (hook,) = config["webhooks"]
    assert hook["clientConfig"]["service"] == {
        "name": service,
        "namespace": ns,
        "path": "/validate-run",
        "port": port,
    }
    assert hook["clientConfig"]["caBundle"] and hook["failurePolicy"] == "Fail"
    kubectl("delete", "service", service, "-n", ns)
    external = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": service, "namespace": ns},
        "spec": {
            "type": "ExternalName",
            "externalName": "localhost",
            "ports": [{"name": "webhook", "port": port}],
        },
    }
    kubectl("apply", "-f", "-", input=json.dumps(external))
    bad = shrunk_quickstart("misspelt")
    bad["spec"]["training"]["epochz"] = 2
    path = tmp / "misspelt.yaml"
    path.write_text(yaml.safe_dump(bad))

    def refused() -> str | None:  # the denial, once the operator serves the webhook
        out = kubectl("apply", "-n", ns, "-f", str(path), check=False)
        assert out.returncode != 0, "the misspelt run was admitted"
        return out.stderr if "denied the request" in out.stderr else None

    denial = wait_for(
        refused, timeout=60, interval=1, message=lambda: "the webhook's denial; " + operator_log()
    )
    assert "spec.training.epochz: unknown field; allowed: epochs" in denial, denial
    order = shrunk_quickstart("disordered")
    order["spec"]["acceptance"].update(targetPassRate=0.8, minimumPassRate=0.9)
    path.write_text(yaml.safe_dump(order))
    out = kubectl("apply", "-n", ns, "-f", str(path), check=False)
    assert out.returncode != 0 and "minimumPassRate must not exceed targetPassRate" in out.stderr, out.stderr
    kubectl("delete", "service", service, "-n", ns)  # the next `helm upgrade` puts the chart's back


def _lifecycle(
    helm: Helm, kubectl: Any, node_agent: Any, ns: str, release: str, values: dict[str, Any], tmp: Path
) -> None:
    def one_ready_operator() -> Any:  # the object, or None: not yet
        pods = _operator_pods(kubectl, ns, release)
        return pods[0] if len(pods) == 1 and _ready(pods[0]) else None

    def operator_log() -> str:
        pods = _operator_pods(kubectl, ns, release)
        try:
            return str(node_agent.container_log(ns, pods[-1]["metadata"]["name"], "operator"))[-3000:]
        except (IndexError, FileNotFoundError):
            return f"no operator log; pods: {[p['metadata']['name'] for p in pods]}"

    first = wait_for(
        one_ready_operator, timeout=90, message=lambda: "a Ready operator pod; " + operator_log()
    )

    # Run by the node agent as the chart's ServiceAccount, whose token is the only credential it has.
    account = f"{release}"
    assert first["spec"]["serviceAccountName"] == account
    assert first["spec"]["nodeName"] in {n.name for n in node_agent.nodes}
    mounts = first["spec"]["containers"][0]["volumeMounts"]
    assert any(m["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount" for m in mounts)
    subject = f"system:serviceaccount:{ns}:{account}"

    def can(verb: str, resource: str) -> bool:
        return bool(
            kubectl("auth", "can-i", verb, resource, "-n", ns, "--as", subject, check=False).stdout.strip()
            == "yes"
        )

    assert can("create", "pods") and can("patch", "optimizationruns.optrun.io/status")
    assert not can("get", "secrets") and not can("create", "deployments.apps")  # least privilege

    _webhook(kubectl, ns, release, values["webhook"]["port"], tmp, operator_log)

    # A run: the quickstart, shrunk.
    manifest = tmp / "run.yaml"
    manifest.write_text(yaml.safe_dump(shrunk_quickstart("quickstart")))
    kubectl("apply", "-n", ns, "-f", str(manifest))

    def ended() -> Any:  # the object, or None: not yet
        status = _json(kubectl, "get", "optrun", "quickstart", "-n", ns).get("status") or {}
        return status if status.get("decision") or status.get("phase") == "Failed" else None

    status = wait_for(
        ended, timeout=180, interval=1, message=lambda: "a decision; operator log:\n" + operator_log()
    )
    assert status.get("decision") in {"GO", "CONDITIONAL_GO", "NO_GO"}, (
        f"no decision: {status.get('message')}"
    )
    assert status["acceptance"]["collected"] > 0
    (runtime_pod,) = _json(kubectl, "get", "pods", "-n", ns, "-l", "optrun.io/run=quickstart")["items"]
    node = _json(kubectl, "get", "node", runtime_pod["spec"]["nodeName"])
    assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"

    # helm upgrade with changed values rolls the operator: a new pod with the new settings.
    upgraded = merged(values, {"operator": {"scrapeIntervalSeconds": 2}, "podAnnotations": {"rolled": "yes"}})
    helm.upgrade(release, ns, upgraded)

    def rolled() -> Any:  # the object, or None: not yet
        pod = one_ready_operator()
        return pod if pod and pod["metadata"]["uid"] != first["metadata"]["uid"] else None

    second = wait_for(rolled, timeout=90, message=lambda: "the rolled operator pod; " + operator_log())
    env = {e["name"]: e.get("value") for e in second["spec"]["containers"][0]["env"]}
    assert env["OPTRUN_OPERATOR_SCRAPE_INTERVAL_SECONDS"] == "2"
    assert second["metadata"]["annotations"]["rolled"] == "yes"

    # The new operator is the one at work: deleting the run completes (its children go with it).
    kubectl("delete", "optrun", "quickstart", "-n", ns, "--wait=true", "--timeout=60s")
    wait_for(
        lambda: (
            not _json(kubectl, "get", "pods,configmaps", "-n", ns, "-l", "optrun.io/run=quickstart")["items"]
        ),
        # The 1.20 garbage collector discovers a resource type created after it started on a
        # 30 s resync: the session's cluster has the CRD from the start (tests/support/fixtures.py),
        # an attached one may be newer than the CRD the chart just installed.
        timeout=90,
        message="the run's children to be garbage-collected",
    )

    helm.uninstall(release, ns)
    selector = f"app.kubernetes.io/instance={release}"

    def leftovers() -> list[str]:
        kinds = (
            "deployments,replicasets,pods,services,serviceaccounts,roles,rolebindings,configmaps,kopfpeerings"
        )
        found = _json(kubectl, "get", kinds, "-n", ns, "-l", selector)["items"]
        found += _json(kubectl, "get", "clusterroles,clusterrolebindings", "-l", selector)["items"]
        return [f"{o['kind']}/{o['metadata']['name']}" for o in found]

    wait_for(lambda: not leftovers(), timeout=60, message=lambda: f"no operator objects; left: {leftovers()}")
    kept = _json(kubectl, "get", "crd", CRD)
    assert kept["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert helm.run("status", release, "-n", ns, check=False).returncode != 0
