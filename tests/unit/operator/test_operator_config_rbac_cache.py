"""The operator's configuration, its RBAC rules as data, and the cache it keeps over kopf's indexes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from optrun.api.errors import ManifestError
from optrun.operator import config, rbac
from optrun.operator.controller import Cache, freshest


def test_flags_beat_the_environment_which_beats_the_defaults() -> None:
    cfg, verbose = config.load(
        ["--runtime-image", "img:flag", "--scrape-interval-seconds", "2.5"],
        {"OPTRUN_OPERATOR_RUNTIME_IMAGE": "img:env", "OPTRUN_OPERATOR_NAMESPACES": '["a", "b"]'},
    )
    assert cfg.runtime_image == "img:flag"
    assert cfg.scrape_interval_seconds == 2.5
    assert cfg.namespaces == ["a", "b"] and not cfg.clusterwide
    assert cfg.runtime_metrics_port == 9090 and not verbose


def test_a_single_namespace_may_be_given_bare_and_no_namespace_means_all() -> None:
    assert config.load([], {"OPTRUN_OPERATOR_NAMESPACES": "team-a"})[0].namespaces == ["team-a"]
    assert config.load([], {})[0].clusterwide


def test_a_bad_value_is_an_error_naming_the_option_and_what_is_allowed() -> None:
    with pytest.raises(ManifestError) as err:
        config.load(["--scrape-interval-seconds", "0", "--peering-mode", "sometimes"], {})
    text = str(err.value)
    assert "operator.scrape_interval_seconds" in text and "> 0" in text
    assert "operator.peering_mode" in text


def test_every_rbac_rule_says_why_and_nothing_dangerous_is_granted() -> None:
    granted = {(g, r) for rule in rbac.RULES for g in rule["apiGroups"] for r in rule["resources"]}
    for rule in rbac.RULES:
        assert len(rule["why"]) > 40, rule
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]
        for verb in rule["verbs"]:
            assert verb in rule["why"], (verb, rule)
    assert ("", "secrets") not in granted
    assert not {r for _, r in granted if r.startswith("pods/")}
    assert not {g for g, _ in granted if g.startswith("rbac.")}


def test_rbac_manifests_bind_a_cluster_role_or_one_role_per_watched_namespace() -> None:
    docs = rbac.manifests(
        name="optrun-operator", namespace="optrun-system", service_account="optrun-operator"
    )
    assert [d["kind"] for d in docs] == ["ServiceAccount", "ClusterRole", "ClusterRoleBinding"]
    assert docs[1]["rules"][0] == {
        "apiGroups": ["optrun.io"],
        "resources": ["optimizationruns"],
        "verbs": ["get", "list", "watch", "patch", "delete"],
    }
    docs = rbac.manifests(name="op", namespace="ops", service_account="op", watch_namespaces=["a", "b"])
    assert [(d["kind"], d["metadata"].get("namespace")) for d in docs] == [
        ("ServiceAccount", "ops"),
        ("Role", "a"),
        ("RoleBinding", "a"),
        ("Role", "b"),
        ("RoleBinding", "b"),
    ]


def pod(name: str, rv: int, phase: str = "Running") -> dict:
    return {"metadata": {"name": name, "resourceVersion": str(rv)}, "status": {"phase": phase}}


def test_freshest_is_the_highest_resource_version() -> None:
    a, b = {"metadata": {"resourceVersion": "9"}}, {"metadata": {"resourceVersion": "10"}}
    assert freshest(a, None, b) is b
    assert freshest(None) is None


def test_a_pod_the_operator_created_shows_until_the_index_catches_up() -> None:
    cache = Cache()
    cache.remember_pod("uid", pod("p-1", 5, "Pending"))
    assert cache.pods("uid", [])["p-1"][0]["status"]["phase"] == "Pending"
    merged = cache.pods("uid", [pod("p-1", 7)])
    assert merged["p-1"][0]["status"]["phase"] == "Running"
    assert cache.pods("uid", []) == {}  # the index had it: the own copy is dropped


def test_the_last_state_of_a_deleted_pod_outlives_its_index_entry() -> None:
    cache = Cache()
    cache.remember_pod("uid", pod("p-1", 9, "Failed"), deleted=True)
    (state, deleted) = cache.pods("uid", [])["p-1"]
    assert deleted and state["status"]["phase"] == "Failed"
    cache.forget("uid")
    assert cache.pods("uid", []) == {}


def test_the_operator_command_refuses_a_bad_setting_naming_it() -> None:
    optrun = Path(sys.executable).parent / "optrun"
    env = {**os.environ, "OPTRUN_OPERATOR_SCRAPE_INTERVAL_SECONDS": "-1"}
    result = subprocess.run([str(optrun), "operator"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "operator.scrape_interval_seconds" in result.stderr
