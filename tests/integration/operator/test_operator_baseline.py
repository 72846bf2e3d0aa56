"""spec.acceptance.baseline.run on the real control plane: a succeeded run's result is kept in
<run>-result, a later run of the namespace that names it compares with it (a regression fails
baseline.no-regression, in status), and one that names a run without a result still starts and
fails that test with the reason."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from optrun.api.result import Result
from tests.integration.operator.conftest import Runs, tiny_spec
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration


def result_configmap(core: k8s.CoreV1Api, namespace: str, run: str) -> Any:
    try:
        return core.read_namespaced_config_map(f"{run}-result", namespace)
    except ApiException as err:
        if err.status == 404:
            return None
        raise


@pytest.mark.slow
def test_a_run_compares_with_an_earlier_run_of_its_namespace_by_name(
    start_operator: Any, runs: Runs, namespace: str
) -> None:
    start_operator(namespace)
    first = runs.create("first")
    status = runs.wait_phase("first", "Succeeded", "Failed", timeout=180)
    assert status["phase"] == "Succeeded", status
    cm = wait_for(
        lambda: result_configmap(runs.core, namespace, "first"),
        timeout=30,
        message="the ConfigMap first-result",
    )
    assert cm.immutable is True
    (owner,) = cm.metadata.owner_references
    assert (owner.kind, owner.name, owner.uid) == ("OptimizationRun", "first", first["metadata"]["uid"])
    stored = Result.model_validate_json(cm.data["result.json"])
    assert stored.figures["training.finalLoss"] > 0  # the compact result keeps the figures

    # Fewer steps of the same seed: a worse model, which the comparison must catch.
    runs.create(
        "second",
        tiny_spec(training={"stepsPerEpoch": 4, "warmupSteps": 1}, acceptance={"baseline": {"run": "first"}}),
    )
    # A baseline that never ran: the optional mount lets the pod start; the test fails saying why.
    runs.create("orphan", tiny_spec(acceptance={"baseline": {"run": "never-ran"}}))
    for name in ("second", "orphan"):
        status = runs.wait_phase(name, "Succeeded", "Failed", timeout=240)
        assert status["phase"] == "Succeeded", status
    failures = {f["name"]: f for f in runs.status("second")["acceptance"]["failures"]}
    regression = failures["baseline.no-regression"]
    assert regression["category"] == "end-to-end" and regression["critical"] is False
    assert "figures regressed beyond tolerance against run: first: training.final" in regression["reason"]
    orphan = {f["name"]: f for f in runs.status("orphan")["acceptance"]["failures"]}
    assert orphan["baseline.no-regression"]["reason"] == (
        "baseline run: never-ran: never-ran has no stored result: it has not succeeded, or is no run of "
        "this namespace"
    )
    # Each succeeded run keeps its own result too.
    assert result_configmap(runs.core, namespace, "second") is not None
