"""The chart as helm renders it: lint, the values schema, what the API server accepts (server-side
dry run) and keeps, and the rendered RBAC, operator configuration and CRD against the code they
must match; what kube-prometheus-stack's Prometheus selects, what the aggregated roles give
people, the PodDisruptionBudget, the explicit cluster-wide switch, the runtime pods' NetworkPolicy,
the webhook's certificate from cert-manager, and NOTES.txt.

The monitoring.coreos.com CRDs are not part of the test cluster; tests/fixtures/monitoring-crds.yaml
holds minimal structural schemas of ServiceMonitor, PodMonitor and PrometheusRule (see its header)
so that those objects are validated by the API server too, and their misspelt fields caught."""

from __future__ import annotations

import re
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from optrun.cli import load_manifest
from optrun.operator import builders, rbac
from optrun.operator import config as operator_config
from tests.integration.chart.helmtool import (
    CERT_MANAGER_CRDS,
    CHART,
    KOPF_CRDS,
    MONITORING_CRDS,
    REPO,
    Helm,
    Yaml12Loader,
    apply_crds,
    merged,
)
from tests.integration.monitoring.promstack import kube_prometheus_stack_selectors, selected_by
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

MONITORS = {
    "serviceMonitor": {"enabled": True},
    "podMonitor": {"enabled": True},
    "prometheusRule": {"enabled": True},
}
EVERY_OPTION: dict[str, Any] = {
    "monitoring": {"labels": {"release": "kps"}},
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"scrape": "operator"}},
        "podMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True, "alertLabels": {"team": "ml"}},
        "dashboard": {"enabled": True},
    },
    "commonLabels": {"team": "ml"},
    "operator": {"extraEnv": [{"name": "TZ", "value": "UTC"}], "verbose": True},
}


@pytest.fixture(scope="module")
def helm(assets: Any, cluster: Any) -> Helm:
    return Helm(assets.helm, cluster.kubeconfig)


def _kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_helm_lint_passes_with_the_defaults_and_with_every_option_on(helm: Helm, tmp_path: Path) -> None:
    helm.run("lint", "--strict", str(CHART))
    values = tmp_path / "every-option.yaml"
    values.write_text(yaml.safe_dump(EVERY_OPTION))
    helm.run(
        "lint",
        "--strict",
        str(CHART),
        "-f",
        str(values),
        "--set",
        "operator.clusterWide=false,operator.namespaces={a,b}",
    )


@pytest.mark.parametrize(
    "values, named",
    [
        ({"operator": {"namespace": ["ml"]}}, "namespace"),  # the key is `namespaces`
        ({"metrics": {"serviceMonitor": {"enable": True}}}, "enable"),
        ({"replicas": 2}, "replicas"),  # the key is `replicaCount`
        ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
        ({"metrics": {"prometheusRule": {"gateTripStorm": {"window": "ten minutes"}}}}, "window"),
        ({"operator": {"scrapeIntervalSeconds": 0}}, "scrapeIntervalSeconds"),
        ({"monitoring": {"label": {"release": "kps"}}}, "label"),  # the key is `labels`
        ({"podDisruptionBudget": {"maxUnavailable": 0}}, "maxUnavailable"),
        ({"operator": {"clusterWide": "yes"}}, "clusterWide"),
        ({"metrics": {"prometheusRule": {"runbookUrl": "docs/runbooks.md"}}}, "runbookUrl"),
    ],
)
def test_values_file_with_a_typo_or_a_bad_value_is_rejected_by_the_schema(
    helm: Helm, tmp_path: Path, values: dict[str, Any], named: str
) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    result = helm.run("template", "optrun", str(CHART), "-f", str(path), check=False)
    assert result.returncode != 0, f"helm accepted {values}"
    assert "schema" in result.stderr and named in result.stderr, result.stderr


def test_more_than_one_replica_without_peering_is_refused(helm: Helm) -> None:
    result = helm.run(
        "template", "optrun", str(CHART), "--set", "operator.peering.enabled=false", check=False
    )
    assert result.returncode != 0 and "peering" in result.stderr, result.stderr


def _leaves(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _leaves(value, (*path, key))
    elif isinstance(node, list) and node:
        for i, value in enumerate(node):
            yield from _leaves(value, (*path, i))
    else:
        yield path, node


def _at(node: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        node = node[key]
    return node


@pytest.mark.parametrize("watched", [None, "namespaced"], ids=["cluster-wide", "two-namespaces"])
def test_rendered_chart_applies_with_a_server_side_dry_run_and_keeps_every_field(
    helm: Helm, kubectl: Any, namespace: str, watched: str | None
) -> None:
    # What `helm install` does first (the chart's crds/ directory), and the monitoring CRDs a
    # cluster with prometheus-operator has.
    apply_crds(kubectl, KOPF_CRDS, MONITORING_CRDS)
    scope = {"clusterWide": False, "namespaces": [namespace, "default"]} if watched else {}
    values = dict(EVERY_OPTION, operator=scope)
    # Rendered for this API server, as `helm install` renders for the cluster it talks to.
    docs = helm.template(
        values, release="optrun-dry", namespace=namespace, kube_version=_server_version(kubectl)
    )
    kinds = sorted({d["kind"] for d in docs})
    expected = {"CustomResourceDefinition", "Deployment", "Service", "ServiceAccount", "ServiceMonitor"}
    expected |= {"PodMonitor", "PrometheusRule", "ConfigMap", "PodDisruptionBudget", "ClusterRole"}
    expected |= {"ValidatingWebhookConfiguration", "Secret"}  # the admission webhook
    expected |= {"NetworkPolicy"} if watched else set()  # in each watched namespace
    expected |= (
        {"Role", "RoleBinding", "KopfPeering"} if watched else {"ClusterRoleBinding", "ClusterKopfPeering"}
    )
    assert set(kinds) == expected
    _accepted_with_every_field(kubectl, docs)


def _accepted_with_every_field(kubectl: Any, docs: list[dict[str, Any]]) -> None:
    """A server-side dry run of `docs` succeeds and keeps every field sent."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump_all(docs, f)
        f.flush()
        out = kubectl("apply", "--dry-run=server", "-o", "yaml", "-f", f.name)
    accepted = yaml.load(out.stdout, Loader=Yaml12Loader)
    items = accepted["items"] if accepted.get("kind") == "List" else [accepted]
    assert len(items) == len(docs)
    # The API server prunes what a schema does not know (no strict field validation in 1.20):
    # every field sent must come back, or a template has a misspelt or misplaced field.
    for sent, kept in zip(docs, items, strict=True):
        assert (sent["kind"], sent["metadata"]["name"]) == (kept["kind"], kept["metadata"]["name"])
        for path, value in _leaves(sent):
            try:
                back = _at(kept, path)
            except (KeyError, IndexError, TypeError):
                raise AssertionError(
                    f"{sent['kind']} {sent['metadata']['name']}: the server dropped {path}"
                ) from None
            if value not in ({}, []) and not isinstance(value, float):
                assert str(back) == str(value), f"{sent['kind']} {path}: sent {value!r}, kept {back!r}"


def test_rendered_rbac_is_exactly_the_operator_rules_cluster_wide_or_per_namespace(helm: Helm) -> None:
    rules = [{k: r[k] for k in ("apiGroups", "resources", "verbs")} for r in rbac.RULES]
    cluster = helm.template()
    (role,) = [r for r in _kind(cluster, "ClusterRole") if r["metadata"]["name"] == "optrun"]
    assert role["rules"] == rules
    (binding,) = _kind(cluster, "ClusterRoleBinding")
    (account,) = _kind(cluster, "ServiceAccount")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "optrun-system"}
    ]

    scoped = helm.template({"operator": {"clusterWide": False, "namespaces": ["team-a", "team-b"]}})
    # Only the roles for people (aggregated into view and edit) are cluster-wide.
    assert {r["metadata"]["name"] for r in _kind(scoped, "ClusterRole")} == {"optrun-view", "optrun-edit"}
    assert not _kind(scoped, "ClusterRoleBinding")
    roles = _kind(scoped, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert all(r["rules"] == rules for r in roles)
    assert sorted(b["metadata"]["namespace"] for b in _kind(scoped, "RoleBinding")) == ["team-a", "team-b"]
    assert sorted(p["metadata"]["namespace"] for p in _kind(scoped, "KopfPeering")) == ["team-a", "team-b"]


def _operator_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    (deployment,) = _kind(docs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["optrun", "operator"]
    return {
        e["name"]: e["value"] for e in container["env"] if e["name"].startswith(operator_config.ENV_PREFIX)
    }


def test_rendered_operator_environment_is_a_valid_operator_configuration_with_the_chart_values(
    helm: Helm,
) -> None:
    values = {
        "operator": {
            "clusterWide": False,
            "namespaces": ["team-a"],
            "runtime": {
                "image": {"repository": "registry.local/optrun-runtime", "tag": "9.9.9"},
                "metricsPort": 9191,
            },
            "gpu": {
                "productLabel": "example.com/gpu-model",
                "tolerations": [{"key": "gpu", "operator": "Exists"}],
            },
            "scrapeIntervalSeconds": 2.5,
            "peering": {"name": "team-a-optrun", "lifetimeSeconds": 30},
        },
        "ports": {"metrics": 18000, "health": 18080},
    }
    env = _operator_env(helm.template(values))
    fields = {
        operator_config.ENV_PREFIX + name.upper() for name in operator_config.OperatorConfig.model_fields
    }
    assert set(env) <= fields, f"the chart sets variables the operator does not read: {set(env) - fields}"
    cfg, verbose = operator_config.load([], environ=env)
    assert cfg.namespaces == ["team-a"] and not cfg.clusterwide
    assert cfg.runtime_image == "registry.local/optrun-runtime:9.9.9"
    assert cfg.runtime_metrics_port == 9191
    assert cfg.gpu_product_label == "example.com/gpu-model"
    assert cfg.default_tolerations == [{"key": "gpu", "operator": "Exists"}]
    assert cfg.scrape_interval_seconds == 2.5
    assert (cfg.metrics_port, cfg.health_port) == (18000, 18080)
    assert (cfg.peering_name, cfg.peering_mode, cfg.peering_lifetime_seconds) == (
        "team-a-optrun",
        "mandatory",
        30,
    )
    assert not verbose

    # Every setting of the operator reaches it from the chart, but the one left per replica.
    left_at_default = {"PRIORITY"}  # peering priority: each replica's start time (config.py)
    missing = {f.removeprefix(operator_config.ENV_PREFIX) for f in fields - set(env)}
    assert missing == left_at_default, f"operator settings the chart cannot set: {missing - left_at_default}"

    standalone = _operator_env(
        helm.template({"replicaCount": 1, "operator": {"peering": {"enabled": False}}})
    )
    cfg, _ = operator_config.load([], environ=standalone)
    assert cfg.peering_mode == "standalone" and cfg.clusterwide


def test_rendered_crd_is_the_generated_crd_kept_on_uninstall_only_when_asked(helm: Helm) -> None:
    (rendered,) = _kind(helm.template(), "CustomResourceDefinition")
    # The generated file (tests/unit/api checks it against the models), read as helm reads it.
    generated = yaml.load(
        (REPO / "crds" / "optrun.io_optimizationruns.yaml").read_text(), Loader=Yaml12Loader
    )
    assert rendered["metadata"].pop("annotations") == {"helm.sh/resource-policy": "keep"}
    labels = rendered["metadata"].pop("labels")
    assert generated["metadata"].pop("labels").items() <= labels.items()
    generated["metadata"].pop("annotations", None)
    assert rendered == generated

    (not_kept,) = _kind(helm.template({"crds": {"keep": False}}), "CustomResourceDefinition")
    assert "helm.sh/resource-policy" not in (not_kept["metadata"].get("annotations") or {})
    assert not _kind(helm.template({"crds": {"enabled": False}}), "CustomResourceDefinition")


def _server_version(kubectl: Any) -> str:
    return str(yaml.safe_load(kubectl("version", "-o", "json").stdout)["serverVersion"]["gitVersion"])


# --- kube-prometheus-stack --------------------------------------------------------------------


@pytest.mark.parametrize(
    "kps_release, values",
    [
        # The chart's default monitoring.labels: a kube-prometheus-stack installed under its own name.
        ("kube-prometheus-stack", {}),
        ("kps", {"monitoring": {"labels": {"release": "kps"}}}),
        # An object's own labels win over monitoring.labels.
        ("prom-b", {"metrics": {m: {"labels": {"release": "prom-b"}} for m in MONITORS}}),
    ],
)
def test_kube_prometheus_stacks_default_selectors_pick_up_every_monitor_and_rule(
    helm: Helm, kubectl: Any, cluster: Any, namespace: str, kps_release: str, values: dict[str, Any]
) -> None:
    apply_crds(kubectl, MONITORING_CRDS)
    docs = helm.template(merged({"metrics": MONITORS}, values), namespace=namespace)
    monitors = [d for d in docs if d["kind"] in ("ServiceMonitor", "PodMonitor", "PrometheusRule")]
    assert sorted(m["kind"] for m in monitors) == ["PodMonitor", "PrometheusRule", "ServiceMonitor"]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump_all(monitors, f)
        f.flush()
        kubectl("apply", "-n", namespace, "-f", f.name)
    api = cluster.api()
    # The API server applies the selectors, as it does for prometheus-operator's list calls.
    picked = selected_by(api, kube_prometheus_stack_selectors(kps_release), namespace)
    assert sorted((m["kind"], m["metadata"]["name"]) for m in picked) == sorted(
        (m["kind"], m["metadata"]["name"]) for m in monitors
    )
    assert not selected_by(api, kube_prometheus_stack_selectors("another-prometheus"), namespace)


# --- RBAC for people, the cluster-wide switch -----------------------------------------------------


def _can(kubectl: Any, user: str, verb: str, namespace: str) -> bool:
    result = kubectl(
        "auth", "can-i", verb, "optimizationruns.optrun.io", "-n", namespace, "--as", user, check=False
    )
    return result.stdout.strip() == "yes"


def test_aggregated_roles_let_view_read_and_edit_change_runs_through_the_built_in_roles(
    helm: Helm, kubectl: Any, namespace: str
) -> None:
    # kubectl auth can-i resolves the resource through discovery: the CRD must be served.
    apply_crds(kubectl, REPO / "crds" / "optrun.io_optimizationruns.yaml")
    release = f"agg-{uuid.uuid4().hex[:6]}"
    roles = [d for d in helm.template(release=release) if d["kind"] == "ClusterRole"]
    people = [
        r for r in roles if r["metadata"]["name"] in (f"{release}-optrun-view", f"{release}-optrun-edit")
    ]
    assert len(people) == 2
    viewer, editor = f"viewer-{release}", f"editor-{release}"
    # Before the chart's roles exist, the built-in roles know nothing of OptimizationRuns.
    kubectl("create", "rolebinding", "viewer", "-n", namespace, "--clusterrole=view", f"--user={viewer}")
    kubectl("create", "rolebinding", "editor", "-n", namespace, "--clusterrole=edit", f"--user={editor}")
    assert not _can(kubectl, viewer, "list", namespace) and not _can(kubectl, editor, "create", namespace)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump_all(people, f)
        f.flush()
        kubectl("apply", "-f", f.name)
        try:
            # The controller manager's clusterrole-aggregation controller adds the rules.
            wait_for(
                lambda: (
                    _can(kubectl, viewer, "list", namespace) and _can(kubectl, editor, "create", namespace)
                ),
                message="the aggregated rules in the built-in view and edit roles",
            )
            for verb in ("get", "list", "watch"):
                assert _can(kubectl, viewer, verb, namespace) and _can(kubectl, editor, verb, namespace)
            for verb in ("create", "update", "patch", "delete", "deletecollection"):
                assert _can(kubectl, editor, verb, namespace), verb
                assert not _can(kubectl, viewer, verb, namespace), verb
            # The status is the operator's: nobody but it writes there.
            status = kubectl(
                "auth",
                "can-i",
                "patch",
                "optimizationruns.optrun.io",
                "--subresource=status",
                "-n",
                namespace,
                "--as",
                editor,
                check=False,
            )
            assert status.stdout.strip() == "no"
            # Granted per namespace, through the binding: nothing elsewhere.
            assert not _can(kubectl, editor, "create", "default")
        finally:
            kubectl("delete", "-f", f.name, "--wait=false")


@pytest.mark.parametrize(
    "operator, named",
    [
        ({"namespaces": ["team-a"]}, "operator.clusterWide=false"),  # clusterWide is true by default
        ({"clusterWide": False}, "operator.namespaces"),
    ],
)
def test_a_namespace_list_that_contradicts_the_cluster_wide_switch_is_refused(
    helm: Helm, tmp_path: Path, operator: dict[str, Any], named: str
) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump({"operator": operator}))
    result = helm.run("template", "optrun", str(CHART), "-f", str(path), check=False)
    assert result.returncode != 0 and named in result.stderr and "clusterWide" in result.stderr, result.stderr


def _rule_lines() -> list[str]:
    return [f"{', '.join(r['verbs'])} on {', '.join(r['resources'])}" for r in rbac.RULES]


def test_notes_of_a_cluster_wide_install_say_what_it_grants_in_every_namespace(helm: Helm) -> None:
    notes = helm.notes()
    assert "in EVERY namespace (operator.clusterWide=true)" in notes
    assert "ClusterRole optrun grants its ServiceAccount optrun-system/optrun" in notes
    for line in _rule_lines():  # every rule of optrun/operator/rbac.py, pods create/delete among them
        assert line in notes, f"NOTES do not list {line!r}:\n{notes}"
    assert "operator.clusterWide=false" in notes  # and how to narrow it

    scoped = helm.notes({"operator": {"clusterWide": False, "namespaces": ["team-a", "team-b"]}})
    assert "in the namespaces team-a, team-b" in scoped and "EVERY" not in scoped
    assert "Role optrun in each of those namespaces" in scoped
    assert all(line in scoped for line in _rule_lines())


# --- NOTES ------------------------------------------------------------------------------------------


def _notes_manifest(notes: str) -> tuple[str, str]:
    """(namespace, manifest) of the `kubectl apply -n NS -f - <<'EOF' ... EOF` in the NOTES."""
    m = re.search(r"^kubectl apply -n (\S+) -f - <<'EOF'\n(.*?)^EOF$", notes, re.S | re.M)
    assert m, f"NOTES carry no run to apply:\n{notes}"
    return m.group(1), m.group(2)


@pytest.mark.parametrize("watched", [None, ["team-a"]], ids=["cluster-wide", "one-namespace"])
def test_notes_work_from_the_chart_alone_their_run_is_valid_and_the_api_server_takes_it(
    helm: Helm, kubectl: Any, tmp_path: Path, namespace: str, watched: list[str] | None
) -> None:
    values = {"operator": {"clusterWide": False, "namespaces": watched}} if watched else {}
    notes = helm.notes(values)
    # No file the chart does not ship (the source tree's examples/ or crds/ as a path to apply).
    assert not re.search(r"-f (?!-)\S+", notes), notes
    run_namespace, manifest = _notes_manifest(notes)
    assert run_namespace == (watched[0] if watched else "default")  # where the operator looks
    path = tmp_path / "hello.yaml"
    path.write_text(manifest)
    name, spec = load_manifest(str(path))  # what `optrun validate` checks
    assert name == "hello-optrun" and spec.resources.gpus == 0
    apply_crds(kubectl, REPO / "crds" / "optrun.io_optimizationruns.yaml")
    out = kubectl("apply", "--dry-run=server", "-n", namespace, "-o", "yaml", "-f", str(path))
    assert yaml.safe_load(out.stdout)["spec"]["workload"]["model"] == "tiny-lm"


# --- PodDisruptionBudget ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kube_version, api_version",
    [("1.20.2", "policy/v1beta1"), ("1.21.0", "policy/v1"), ("1.33.0", "policy/v1")],
)
def test_a_pod_disruption_budget_keeps_a_replica_when_there_are_several(
    helm: Helm, kube_version: str, api_version: str
) -> None:
    docs = helm.template(kube_version=kube_version)
    (deployment,) = _kind(docs, "Deployment")
    (pdb,) = _kind(docs, "PodDisruptionBudget")
    assert deployment["spec"]["replicas"] == 2 and pdb["apiVersion"] == api_version
    assert pdb["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    assert pdb["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize(
    "values",
    [
        {"replicaCount": 1, "operator": {"peering": {"enabled": False}}},  # it would block every drain
        {"podDisruptionBudget": {"enabled": False}},
    ],
)
def test_no_pod_disruption_budget_for_one_replica_or_when_disabled(
    helm: Helm, values: dict[str, Any]
) -> None:
    assert not _kind(helm.template(values), "PodDisruptionBudget")


# --- NetworkPolicy ----------------------------------------------------------------------------------


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A matchLabels-only LabelSelector (all the chart writes) against an object's labels."""
    assert set(selector) <= {"matchLabels"}, selector
    return selector.get("matchLabels", {}).items() <= labels.items()


def _multi_node_pods(metrics_port: int) -> list[dict[str, Any]]:
    """The pods the operator makes for attempt 1 of a two-node run (optrun/operator/builders.py)."""
    body = {
        "apiVersion": "optrun.io/v1alpha1",
        "kind": "OptimizationRun",
        "metadata": {"name": "mn", "namespace": "team-a", "uid": "0b9c5a52-0000-4000-8000-000000000001"},
        "spec": {
            "workload": {"model": "tiny-lm"},
            "distributed": {"nodes": 2},
            "training": {"checkpoint": {"claimName": "ckpt"}},
        },
    }
    run = builders.Run.from_body(body)
    cfg = operator_config.OperatorConfig(runtime_image="r:1", runtime_metrics_port=metrics_port)
    return [builders.pod(run, 1, cfg, index=i) for i in range(2)]


# The labels prometheus-operator gives every Prometheus pod it runs (kube-prometheus-stack's too):
# pkg/prometheus/server/statefulset.go, podSelectorLabels.
PROMETHEUS_POD_LABELS = {
    "app.kubernetes.io/name": "prometheus",
    "app.kubernetes.io/managed-by": "prometheus-operator",
    "app.kubernetes.io/instance": "kps-kube-prometheus-stack-prometheus",
    "prometheus": "kps-kube-prometheus-stack-prometheus",
}


@pytest.mark.parametrize("pod_monitor", [False, True], ids=["no-podmonitor", "podmonitor"])
def test_the_network_policy_admits_the_operator_and_prometheus_to_the_metrics_port_and_a_runs_pods_to_each_other(
    helm: Helm, pod_monitor: bool
) -> None:
    values = {
        "operator": {
            "clusterWide": False,
            "namespaces": ["team-a", "team-b"],
            "runtime": {"metricsPort": 9191},
        },
        "metrics": {"podMonitor": {"enabled": pod_monitor}},
    }
    docs = helm.template(values, namespace="optrun-system")
    policies = _kind(docs, "NetworkPolicy")
    assert sorted(p["metadata"]["namespace"] for p in policies) == ["team-a", "team-b"]
    (deployment,) = _kind(docs, "Deployment")
    operator_labels = deployment["spec"]["template"]["metadata"]["labels"]
    pods = _multi_node_pods(9191)
    pod_labels = [p["metadata"]["labels"] for p in pods]
    for policy in policies:
        spec = policy["spec"]
        assert spec["policyTypes"] == ["Ingress"]  # egress (NCCL to its peers) is not restricted
        assert all(_matches(spec["podSelector"], labels) for labels in pod_labels)  # every runtime pod
        assert not _matches(spec["podSelector"], operator_labels)
        metrics_rule, peers_rule = spec["ingress"]

        # The metrics port, the one the runtime serves /metrics on (its port named "metrics").
        (metrics_port,) = [p for p in pods[0]["spec"]["containers"][0]["ports"] if p["name"] == "metrics"]
        assert metrics_rule["ports"] == [{"port": metrics_port["containerPort"], "protocol": "TCP"}]
        operator_peer, *others = metrics_rule["from"]
        assert operator_peer["namespaceSelector"] == {
            "matchLabels": {"kubernetes.io/metadata.name": "optrun-system"}
        }
        assert _matches(operator_peer["podSelector"], operator_labels)
        assert (
            operator_peer["podSelector"]["matchLabels"].items()
            <= deployment["spec"]["selector"]["matchLabels"].items()
        )
        if pod_monitor:
            (prometheus,) = others
            assert prometheus["namespaceSelector"] == {}  # wherever kube-prometheus-stack runs
            assert _matches(prometheus["podSelector"], PROMETHEUS_POD_LABELS)
            assert not _matches(prometheus["podSelector"], operator_labels)
        else:
            assert others == []  # nobody else to the metrics port

        # Every port between runtime pods of the namespace: pod 1 reaches pod 0's rendezvous
        # port (torchrun's c10d store) and the ports gloo and NCCL choose.
        assert "ports" not in peers_rule
        (peer,) = peers_rule["from"]
        assert set(peer) == {"podSelector"}  # no namespaceSelector: the policy's own namespace
        assert all(_matches(peer["podSelector"], labels) for labels in pod_labels)
        assert not _matches(peer["podSelector"], operator_labels)
        assert not _matches(peer["podSelector"], PROMETHEUS_POD_LABELS)


def test_network_policy_peers_can_be_narrowed_extended_or_dropped_by_values(helm: Helm) -> None:
    monitoring = {"kubernetes.io/metadata.name": "monitoring"}
    values: dict[str, Any] = {
        "operator": {"clusterWide": False, "namespaces": ["team-a"]},
        "metrics": {"podMonitor": {"enabled": True}},
        "networkPolicy": {
            # Merged into the default by helm: these labels narrow it to one Prometheus.
            "prometheusFrom": {
                "namespaceSelector": {"matchLabels": monitoring},
                "podSelector": {"matchLabels": {"prometheus": "main"}},
            },
            "extraFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}}],
        },
    }
    (policy,) = _kind(helm.template(values), "NetworkPolicy")
    _, prometheus, extra = policy["spec"]["ingress"][0]["from"]
    assert prometheus["namespaceSelector"] == {"matchLabels": monitoring}
    assert _matches(prometheus["podSelector"], {**PROMETHEUS_POD_LABELS, "prometheus": "main"})
    assert not _matches(prometheus["podSelector"], PROMETHEUS_POD_LABELS)  # another Prometheus
    assert extra == {"ipBlock": {"cidr": "10.0.0.0/8"}}
    # Dropped (null): only the operator and extraFrom reach the metrics port, and NOTES say so.
    values["networkPolicy"]["prometheusFrom"] = None
    (policy,) = _kind(helm.template(values), "NetworkPolicy")
    assert [sorted(peer) for peer in policy["spec"]["ingress"][0]["from"]] == [
        ["namespaceSelector", "podSelector"],
        ["ipBlock"],
    ]
    values["networkPolicy"]["extraFrom"] = []
    assert "The PodMonitor's Prometheus is not admitted" in helm.notes(values)


def test_a_cluster_wide_install_makes_a_network_policy_only_where_told_and_its_notes_say_so(
    helm: Helm,
) -> None:
    # The default: cluster-wide, no namespaces named. A NetworkPolicy is namespaced: none.
    assert not _kind(helm.template(), "NetworkPolicy")
    notes = helm.notes()
    assert "No NetworkPolicy was created" in notes
    assert "--set 'networkPolicy.namespaces={ml-team-a,ml-team-b}'" in notes

    told = {"networkPolicy": {"namespaces": ["ml-team-a", "ml-team-b"]}}
    policies = _kind(helm.template(told), "NetworkPolicy")
    assert sorted(p["metadata"]["namespace"] for p in policies) == ["ml-team-a", "ml-team-b"]
    notes = helm.notes(told)
    assert "No NetworkPolicy" not in notes
    assert "NetworkPolicy optrun-runtime (in ml-team-a, ml-team-b) admits" in notes
    assert "Runs in other namespaces get none." in notes

    # Switched off: no policy, and the NOTES say what the runtime pods need instead.
    off = {"networkPolicy": {"enabled": False, "namespaces": ["ml-team-a"]}}
    assert not _kind(helm.template(off), "NetworkPolicy")
    assert "networkPolicy.enabled is false" in helm.notes(off)


# --- the webhook's certificate ------------------------------------------------------------------------

CERT_MANAGER = {"webhook": {"certificate": {"source": "cert-manager", "validityDays": 90}}}
CLUSTER_ISSUER = {"kind": "ClusterIssuer", "name": "internal-ca", "group": "cert-manager.io"}


def _webhook_objects(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(the ValidatingWebhookConfiguration, the Service it calls, the Secret the operator serves with)."""
    (config,) = _kind(docs, "ValidatingWebhookConfiguration")
    (hook,) = config["webhooks"]
    service_ref = hook["clientConfig"]["service"]
    (service,) = [s for s in _kind(docs, "Service") if s["metadata"]["name"] == service_ref["name"]]
    assert service["metadata"]["namespace"] == service_ref["namespace"]
    (deployment,) = _kind(docs, "Deployment")
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "webhook-tls"]
    return config, service, volume["secret"]["secretName"]


@pytest.mark.parametrize("issuer", [None, CLUSTER_ISSUER], ids=["own-self-signed-issuer", "cluster-issuer"])
def test_the_webhook_certificate_from_cert_manager_names_the_service_and_has_its_ca_injected(
    helm: Helm, kubectl: Any, tmp_path: Path, namespace: str, issuer: dict[str, str] | None
) -> None:
    values = merged(CERT_MANAGER, {"webhook": {"certificate": {"issuerRef": issuer}}} if issuer else {})
    path = tmp_path / "cert-manager.yaml"
    path.write_text(yaml.safe_dump(values))
    helm.run("lint", "--strict", str(CHART), "-f", str(path))

    docs = helm.template(values, namespace=namespace)
    config, service, secret = _webhook_objects(docs)
    # cert-manager writes the Secret; helm makes none (it would fight cert-manager over it).
    assert not _kind(docs, "Secret")
    (certificate,) = _kind(docs, "Certificate")
    assert certificate["apiVersion"] == "cert-manager.io/v1"
    assert certificate["metadata"]["namespace"] == namespace
    spec = certificate["spec"]
    assert spec["secretName"] == secret  # the Secret the operator mounts
    name = service["metadata"]["name"]
    # Every name the API server may call the Service by; it calls <service>.<namespace>.svc.
    assert spec["dnsNames"] == [
        name,
        f"{name}.{namespace}",
        f"{name}.{namespace}.svc",
        f"{name}.{namespace}.svc.cluster.local",
    ]
    assert spec["commonName"] == f"{name}.{namespace}.svc"
    assert spec["duration"] == "2160h"  # validityDays 90
    # The cainjector fills caBundle from the Certificate's Secret: namespace/name of the Certificate.
    annotations = config["metadata"]["annotations"]
    assert annotations == {"cert-manager.io/inject-ca-from": f"{namespace}/{certificate['metadata']['name']}"}
    (hook,) = config["webhooks"]
    assert "caBundle" not in hook["clientConfig"]  # left to the cainjector, not a stale one from helm

    issuers = _kind(docs, "Issuer")
    if issuer is None:  # the chart's own self-signed Issuer, beside the Certificate
        (own,) = issuers
        assert own["metadata"]["namespace"] == namespace and own["spec"] == {"selfSigned": {}}
        assert spec["issuerRef"] == {"kind": "Issuer", "name": own["metadata"]["name"]}
    else:  # the user's issuer, as given; the chart makes none
        assert issuers == [] and spec["issuerRef"] == issuer

    # The API server takes both as they are (the fixture's schemas prune a misspelt field).
    apply_crds(kubectl, CERT_MANAGER_CRDS)
    _accepted_with_every_field(kubectl, [*issuers, certificate])


def test_the_self_signed_webhook_certificate_puts_its_ca_in_the_ca_bundle(helm: Helm) -> None:
    docs = helm.template()
    config, _, secret_name = _webhook_objects(docs)
    (secret,) = _kind(docs, "Secret")
    assert secret["metadata"]["name"] == secret_name and secret["type"] == "kubernetes.io/tls"
    assert set(secret["data"]) == {"tls.crt", "tls.key", "ca.crt"}
    (hook,) = config["webhooks"]
    assert hook["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
    assert "cert-manager.io/inject-ca-from" not in (config["metadata"].get("annotations") or {})
    assert not _kind(docs, "Certificate") and not _kind(docs, "Issuer")
