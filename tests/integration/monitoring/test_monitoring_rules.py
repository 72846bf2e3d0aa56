"""The chart's alert rules under Prometheus's own tool: `promtool check rules` on the rendered
PrometheusRule, and `promtool test rules` (alerts_test.yaml) showing each alert fire on its cause
(an injected non-finite loss, a stalled run, a NO_GO decision, a dead operator) and only then,
with its annotations, the runbook link included; and each runbook link leads to a section of
docs/runbooks.md."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.chart.helmtool import CHART, REPO, Helm

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent
RUNBOOKS = REPO / "docs" / "runbooks.md"
# The thresholds alerts_test.yaml is written against (its header repeats them).
RULE_VALUES: dict[str, Any] = {
    "metrics": {
        "prometheusRule": {
            "enabled": True,
            "alertLabels": {"team": "ml"},
            "gateTripStorm": {"trips": 3, "window": "10m"},
            "noProgress": {"seconds": 600, "for": "5m"},
            "noGo": {"window": "1h"},
            "operatorDown": {"for": "5m"},
        }
    }
}


@pytest.fixture
def rules_dir(assets: Any, tmp_path: Path) -> Path:
    """tmp_path with rules.yaml (the rendered PrometheusRule's groups) and alerts_test.yaml."""
    # helm template needs no cluster: the kubeconfig is never read.
    docs = Helm(assets.helm, tmp_path / "unused.kubeconfig").template(
        RULE_VALUES, release="optrun", namespace="optrun-system"
    )
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule["spec"], sort_keys=False))
    shutil.copy(HERE / "alerts_test.yaml", tmp_path / "alerts_test.yaml")
    return tmp_path


def _promtool(assets: Any, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(assets.promtool), *args], capture_output=True, text=True, cwd=cwd, timeout=60)


def test_promtool_check_rules_accepts_the_rendered_alerts(assets: Any, rules_dir: Path) -> None:
    result = _promtool(assets, "check", "rules", "rules.yaml", cwd=rules_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 4 rules found" in result.stdout


def test_promtool_unit_tests_show_each_alert_firing_on_its_cause_and_only_then(
    assets: Any, rules_dir: Path
) -> None:
    result = _promtool(assets, "test", "rules", "alerts_test.yaml", cwd=rules_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = yaml.safe_load((rules_dir / "alerts_test.yaml").read_text())
    alerts = {t["alertname"] for group in tested["tests"] for t in group["alert_rule_test"]}
    rendered = yaml.safe_load((rules_dir / "rules.yaml").read_text())
    defined = {r["alert"] for g in rendered["groups"] for r in g["rules"]}
    assert alerts == defined, f"alerts without a promtool test: {defined - alerts}"
    # promtool compares every annotation of a firing alert, so an alert seen firing in a test has
    # had its runbook_url checked; one that is only ever expected quiet has not.
    firing = {
        t["alertname"]
        for group in tested["tests"]
        for t in group["alert_rule_test"]
        if any("runbook_url" in a.get("exp_annotations", {}) for a in t["exp_alerts"])
    }
    assert firing == defined, f"alerts never tested firing with their runbook link: {defined - firing}"


def test_promtool_unit_tests_fail_when_an_alert_loses_its_cause(assets: Any, rules_dir: Path) -> None:
    # The tests above can fail: with the storm threshold out of reach, the storm test must break.
    rules = yaml.safe_load((rules_dir / "rules.yaml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule["alert"] == "OptrunGateTripStorm":
                rule["expr"] = rule["expr"].replace(">= 3", ">= 300")
    (rules_dir / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    result = _promtool(assets, "test", "rules", "alerts_test.yaml", cwd=rules_dir)
    assert result.returncode != 0 and "OptrunGateTripStorm" in result.stdout + result.stderr


def _github_anchor(heading: str) -> str:
    """The fragment GitHub gives a Markdown heading: lower case, punctuation dropped, spaces as '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_links_its_runbook_to_a_section_of_docs_runbooks(rules_dir: Path) -> None:
    rendered = yaml.safe_load((rules_dir / "rules.yaml").read_text())
    rules = [r for g in rendered["groups"] for r in g["rules"]]
    anchors = {_github_anchor(h) for h in re.findall(r"^#{2,3} (.+)$", RUNBOOKS.read_text(), re.M)}
    home = yaml.safe_load((CHART / "Chart.yaml").read_text())["home"]
    default = yaml.safe_load((CHART / "values.yaml").read_text())["metrics"]["prometheusRule"]["runbookUrl"]
    # The default names this repository's file: the chart's home, a branch, docs/runbooks.md.
    assert re.fullmatch(re.escape(home) + r"/blob/[\w.-]+/docs/runbooks\.md", default), default
    problems = []
    for rule in rules:
        url = rule["annotations"].get("runbook_url", "")
        base, _, anchor = url.partition("#")
        if base != default:
            problems.append(f"{rule['alert']}: runbook_url {url!r} does not start with {default}#")
        elif anchor not in anchors:
            problems.append(f"{rule['alert']}: #{anchor} is no heading of docs/runbooks.md {sorted(anchors)}")
    assert rules and not problems, "\n".join(problems)


def test_the_runbook_base_url_is_a_value(assets: Any, tmp_path: Path) -> None:
    values = {
        "metrics": {"prometheusRule": {"enabled": True, "runbookUrl": "https://wiki.example.com/optrun"}}
    }
    docs = Helm(assets.helm, tmp_path / "unused.kubeconfig").template(values)
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    urls = [r["annotations"]["runbook_url"] for g in rule["spec"]["groups"] for r in g["rules"]]
    assert urls and all(u.startswith("https://wiki.example.com/optrun#optrun") for u in urls), urls
