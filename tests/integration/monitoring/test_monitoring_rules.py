"""The chart's alert rules under Prometheus's own tool: `promtool check rules` on the rendered
PrometheusRule, and `promtool test rules` (alerts_test.yaml) showing each alert fire on its cause
(an injected non-finite loss, a stalled run, a NO_GO decision, a dead operator) and only then."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.chart.helmtool import Helm

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent
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
