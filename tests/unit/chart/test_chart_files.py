"""The chart's files checked without a cluster or a binary: values and their schema, the CRD
copies, the RBAC rules, and the dashboard and alerts against the metrics the code exports.

Rendering, linting and installing are in tests/integration/chart (they need helm and the
control plane)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from optrun.operator import metrics as operator_metrics
from optrun.operator import rbac
from optrun.runtime.metrics import Metrics

REPO = Path(__file__).resolve().parents[3]
CHART = REPO / "charts" / "optrun"
VALUES = CHART / "values.yaml"
SCHEMA = CHART / "values.schema.json"
DASHBOARD = CHART / "files" / "dashboards" / "optrun.json"
RULES_TEMPLATE = CHART / "templates" / "monitoring-prometheusrule.yaml"

KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w.-]*):(\s|$)")


def _schema() -> dict[str, Any]:
    return dict(json.loads(SCHEMA.read_text()))


def _declared_keys(lines: list[str]) -> Iterator[tuple[int, list[str]]]:
    """(line index, key path) of every mapping key in values.yaml outside list items."""
    stack: list[tuple[int, str]] = []
    in_list_at: int | None = None
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(line.lstrip(" "))
        if in_list_at is not None and indent > in_list_at:
            continue  # inside a list item: data, described by the list's key
        in_list_at = None
        if stripped.startswith("- "):
            in_list_at = indent - 1
            continue
        m = KEY_LINE.match(line)
        if not m:
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = [k for _, k in stack] + [m["key"]]
        stack.append((indent, m["key"]))
        yield i, path


def _schema_node(schema: dict[str, Any], path: list[str]) -> dict[str, Any] | None:
    """The schema of `path`, or None when the path lies inside a free-form object."""
    node = schema
    for key in path:
        props = node.get("properties")
        if props is None:
            return None
        node = props[key]
    return node


def test_every_values_key_the_schema_declares_has_a_comment_above_it() -> None:
    lines = VALUES.read_text().splitlines()
    schema = _schema()
    uncommented = []
    for i, path in _declared_keys(lines):
        parent = _schema_node(schema, path[:-1])
        if parent is None or "properties" not in parent:
            continue  # a key inside a free-form Kubernetes object (resources, securityContext)
        previous = next(line for line in reversed(lines[:i]) if line.strip())
        if not previous.strip().startswith("#"):
            uncommented.append(".".join(path))
    assert not uncommented, f"values.yaml keys without a comment above them: {uncommented}"


def test_values_schema_declares_every_key_of_values_yaml_and_no_other() -> None:
    values = yaml.safe_load(VALUES.read_text())
    schema = _schema()
    problems: list[str] = []

    def walk(value: Any, node: dict[str, Any], where: str) -> None:
        if not isinstance(value, dict) or "properties" not in node:
            return
        if node.get("additionalProperties") is not False:
            problems.append(f"{where or '<root>'}: additionalProperties is not false")
        declared = node["properties"]
        for key in sorted(set(value) - set(declared)):
            problems.append(f"{where}.{key}: in values.yaml, not in the schema")
        for key in sorted(set(declared) - set(value)):
            problems.append(f"{where}.{key}: in the schema, not in values.yaml (no documented default)")
        for key, sub in declared.items():
            if "description" not in sub and "properties" not in sub:
                problems.append(f"{where}.{key}: no description in the schema")
            if key in value:
                walk(value[key], sub, f"{where}.{key}")

    walk(values, schema, "")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "chart_path, repository_path",
    [
        ("files/crds/optrun.io_optimizationruns.yaml", "crds/optrun.io_optimizationruns.yaml"),
        ("crds/kopf-peering.yaml", "crds/kopf-peering.yaml"),
    ],
)
def test_chart_crds_are_the_repository_crds_so_they_cannot_drift(
    chart_path: str, repository_path: str
) -> None:
    # Symbolic links: helm reads (and `helm package` copies) the target, so there is one copy, the
    # generated crds/ file (tests/unit/api checks that one against the models).
    assert (CHART / chart_path).resolve() == (REPO / repository_path).resolve()


def test_chart_rbac_rules_are_exactly_the_operator_rules() -> None:
    text = (CHART / "templates" / "_rbac.tpl").read_text()
    block = re.search(r'{{- define "optrun.rules" -}}\n(.*?){{- end }}', text, re.S)
    assert block, "_rbac.tpl has no optrun.rules block"
    chart_rules = yaml.safe_load(block.group(1))
    operator_rules = [{k: r[k] for k in ("apiGroups", "resources", "verbs")} for r in rbac.RULES]
    assert chart_rules == operator_rules


# --- the dashboard and the alerts -------------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def _panels() -> list[dict[str, Any]]:
    return [p for p in _dashboard()["panels"] if p["type"] != "row"]


def test_dashboard_panels_have_unique_ids_a_question_and_prometheus_queries() -> None:
    dashboard = _dashboard()
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in _panels():
        assert panel.get("title") and panel.get("description"), f"panel {panel['id']}: title and description"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), f"{panel['title']}: duplicate refIds"
        for target in panel["targets"]:
            assert target["expr"].strip(), f"{panel['title']}: empty query"


def test_dashboard_panels_fit_the_grid_without_overlapping() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in _dashboard()["panels"]:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, f"{panel['title']}: outside the 24 columns"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_chart_readme_answers_every_dashboard_panel_and_explains_every_alert() -> None:
    readme = (CHART / "README.md").read_text()
    for panel in _panels():
        assert panel["title"].split(" (")[0] in readme, f"README says nothing of panel {panel['title']!r}"
    for alert in re.findall(r"- alert: (\w+)", RULES_TEMPLATE.read_text()):
        assert re.search(rf"^\| {alert} ", readme, re.M), f"README's alert table lacks {alert}"


def _exported_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name a registry can export, labelled children or not."""
    suffixes = {
        "counter": ["_total", "_created"],
        "histogram": ["_bucket", "_sum", "_count", "_created"],
        "info": ["_info"],
        "gauge": [""],
        "stateset": [""],
        "unknown": [""],
    }
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + s for s in suffixes[family.type])
    return names


def _queries() -> dict[str, str]:
    """Where each PromQL expression lives -> the expression (dashboard targets and variables, alert rules)."""
    found = {f"panel {p['title']!r} {t['refId']}": t["expr"] for p in _panels() for t in p["targets"]}
    for var in _dashboard()["templating"]["list"]:
        if var["type"] == "query":
            found[f"variable {var['name']}"] = var["query"]["query"]
    for name, expr in re.findall(
        r"- alert: (\w+)\n\s+expr: \|\n((?:\s{12}.*\n)+)", RULES_TEMPLATE.read_text()
    ):
        found[f"alert {name}"] = expr
    return found


def test_dashboard_and_alerts_read_only_metrics_that_the_runtime_or_operator_export() -> None:
    registry = CollectorRegistry()
    runtime = Metrics()
    registry.register(operator_metrics.RunsByPhase(lambda: []))
    exported = (
        _exported_names(runtime.registry)
        | _exported_names(operator_metrics.REGISTRY)
        | _exported_names(registry)
    )
    queries = _queries()
    assert any(k.startswith("alert ") for k in queries) and any(k.startswith("panel ") for k in queries)
    unknown = {}
    for where, expr in queries.items():
        # Label names in matchers and `by (...)` are not metrics; optrun_stage is both (an Enum).
        for name in re.findall(r"\b(optrun_[a-z0-9_]+)\b(?!\s*[=!]~?\s*\")", expr):
            if name not in exported:
                unknown[where] = name
    assert not unknown, f"queries read metrics nothing exports: {unknown}"


@pytest.mark.parametrize("metric", ["DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED"])
def test_dashboard_reads_gpu_figures_from_the_dcgm_exporter(metric: str) -> None:
    assert any(metric in expr for expr in _queries().values())
