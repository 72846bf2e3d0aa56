"""The chart as helm renders it: lint, the values schema, what the API server accepts (server-side
dry run) and keeps, and the rendered RBAC, operator configuration and CRD against the code they
must match.

The monitoring.coreos.com CRDs are not part of the test cluster; tests/fixtures/monitoring-crds.yaml
holds minimal structural schemas of ServiceMonitor, PodMonitor and PrometheusRule (see its header)
so that those objects are validated by the API server too, and their misspelt fields caught."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from optrun.operator import config as operator_config
from optrun.operator import rbac
from tests.integration.chart.helmtool import (
    CHART,
    KOPF_CRDS,
    MONITORING_CRDS,
    REPO,
    Helm,
    Yaml12Loader,
    apply_crds,
)

pytestmark = pytest.mark.integration

EVERY_OPTION: dict[str, Any] = {
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "kps"}},
        "podMonitor": {"enabled": True, "labels": {"release": "kps"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "kps"}, "alertLabels": {"team": "ml"}},
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
    helm.run("lint", "--strict", str(CHART), "-f", str(values), "--set", "operator.namespaces={a,b}")


@pytest.mark.parametrize(
    "values, named",
    [
        ({"operator": {"namespace": ["ml"]}}, "namespace"),  # the key is `namespaces`
        ({"metrics": {"serviceMonitor": {"enable": True}}}, "enable"),
        ({"replicas": 2}, "replicas"),  # the key is `replicaCount`
        ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
        ({"metrics": {"prometheusRule": {"gateTripStorm": {"window": "ten minutes"}}}}, "window"),
        ({"operator": {"scrapeIntervalSeconds": 0}}, "scrapeIntervalSeconds"),
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
    values = dict(EVERY_OPTION, operator={"namespaces": [namespace, "default"]} if watched else {})
    # Rendered for the test server's version, as `helm install` renders for the server it talks to.
    docs = helm.template(values, release="optrun-dry", namespace=namespace, kube_version="1.20.2")
    kinds = sorted({d["kind"] for d in docs})
    expected = {"CustomResourceDefinition", "Deployment", "Service", "ServiceAccount", "ServiceMonitor"}
    expected |= {"PodMonitor", "PrometheusRule", "ConfigMap"}
    expected |= {"ValidatingWebhookConfiguration", "Secret"}  # the admission webhook
    expected |= {"NetworkPolicy"} if watched else set()  # in each watched namespace
    expected |= (
        {"Role", "RoleBinding", "KopfPeering"}
        if watched
        else {"ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering"}
    )
    assert set(kinds) == expected

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
    (role,) = _kind(cluster, "ClusterRole")
    assert role["rules"] == rules
    (binding,) = _kind(cluster, "ClusterRoleBinding")
    (account,) = _kind(cluster, "ServiceAccount")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "optrun-system"}
    ]

    scoped = helm.template({"operator": {"namespaces": ["team-a", "team-b"]}})
    assert not _kind(scoped, "ClusterRole") and not _kind(scoped, "ClusterRoleBinding")
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
