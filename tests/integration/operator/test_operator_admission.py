"""Refused at the door: `optrun operator` run as docs/operator.md says for a developer's machine
(`--webhook managed`, the default) registers and serves its validating webhook, and kubectl 1.33
gets the same field-named lines as `optrun validate` on the 1.20 API server, which has no strict
field validation of its own: a misspelt field, a broken cross-field rule, and an immutable field
of a started run. What may change (suspend, deadline, TTL) is admitted."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s

from tests.integration.operator.conftest import OPTRUN, Runs, tiny_spec
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration


def manifest(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "optrun.io/v1alpha1",
        "kind": "OptimizationRun",
        "metadata": {"name": name},
        "spec": spec,
    }


def apply(
    kubectl: Any, tmp_path: Path, namespace: str, doc: dict[str, Any]
) -> subprocess.CompletedProcess[str]:
    path = tmp_path / f"{doc['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return kubectl("apply", "-n", namespace, "-f", str(path), check=False)  # type: ignore[no-any-return]


def validate(tmp_path: Path, doc: dict[str, Any]) -> str:
    """What `optrun validate` says about the same manifest."""
    path = tmp_path / "local.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = subprocess.run([str(OPTRUN), "validate", str(path)], capture_output=True, text=True, check=False)
    assert out.returncode == 2, out
    return out.stdout + out.stderr


def webhooks(kube: Any, name: str) -> list[Any]:
    try:
        config = k8s.AdmissionregistrationV1Api(kube).read_validating_webhook_configuration(name)
    except k8s.ApiException:
        return []
    return list(config.webhooks or [])


def test_kubectl_apply_of_a_bad_run_fails_naming_the_field_with_the_operator_run_locally(
    start_operator: Any, runs: Runs, kube: Any, kubectl: Any, namespace: str, tmp_path: Path
) -> None:
    operator = start_operator(namespace, webhook="managed")
    name = f"{namespace}.optrun.io"
    (hook,) = wait_for(
        lambda: webhooks(kube, name), timeout=30, message="the operator to register its webhook"
    )
    assert hook.client_config.url.startswith("https://127.0.0.1:")
    assert hook.failure_policy == "Fail" and hook.side_effects == "None"

    misspelt = tiny_spec(workload={"batchSize": 16}, resources={"gpus": 16})
    misspelt["training"]["epochz"] = 2
    weights = tiny_spec(acceptance={"weights": {"passRate": 0.5}})
    order = tiny_spec(acceptance={"targetPassRate": 0.8, "minimumPassRate": 0.9})
    for bad, field, why in (
        (misspelt, "spec.training.epochz", "unknown field; allowed: epochs"),
        (weights, "spec.acceptance.weights", "weights must sum to 1.0"),
        (order, "spec.acceptance", "minimumPassRate must not exceed targetPassRate"),
    ):
        doc = manifest("bad", bad)
        out = apply(kubectl, tmp_path, namespace, doc)
        assert out.returncode != 0, f"kubectl apply admitted {field}: {out.stdout}"
        assert "denied the request" in out.stderr and field in out.stderr and why in out.stderr, out.stderr
        # The same field and wording `optrun validate` prints for the file (the value shown may
        # differ: the webhook sees it with the API server's defaults filled in).
        local = validate(tmp_path, doc)
        assert field in local and why in local, local
    assert not runs.objects.list_namespaced_custom_object(
        "optrun.io", "v1alpha1", namespace, "optimizationruns"
    )["items"], "nothing was stored"

    # A good run is admitted and started (16 GPUs: it stays Pending, no runtime needed).
    good = manifest("good", tiny_spec(workload={"batchSize": 16}, resources={"gpus": 16}))
    out = apply(kubectl, tmp_path, namespace, good)
    assert out.returncode == 0, out.stderr
    wait_for(lambda: runs.status("good").get("attempts") == 1, message="the first attempt")

    # Once started, the training spec may not change; suspend, deadline and TTL may.
    edited = manifest(
        "good", tiny_spec(workload={"batchSize": 16}, resources={"gpus": 16}, training={"epochs": 3})
    )
    out = apply(kubectl, tmp_path, namespace, edited)
    assert (
        out.returncode != 0 and "spec.training.epochs: may not change once the run has started" in out.stderr
    )
    assert "suspend" in out.stderr, "the refusal says what may change"
    allowed = manifest(
        "good",
        tiny_spec(
            workload={"batchSize": 16},
            resources={"gpus": 16, "memory": "3Gi"},
            activeDeadlineSeconds=900,
            ttlSecondsAfterFinished=60,
        ),
    )
    out = apply(kubectl, tmp_path, namespace, allowed)
    assert out.returncode == 0, out.stderr
    assert "applies from the next attempt" in out.stderr  # the webhook's warning, shown by kubectl
    assert runs.get("good")["spec"]["activeDeadlineSeconds"] == 900
    wait_for(lambda: runs.status("good").get("observedGeneration") == 2, message="the edit acted on")

    # A clean exit takes the webhook out: an operator that is gone blocks nobody.
    operator.stop()
    assert operator.popen is not None and operator.popen.returncode == 0, operator.tail()
    wait_for(lambda: not webhooks(kube, name), timeout=20, message="the webhook taken out on exit")


def test_the_operator_refuses_to_start_a_managed_webhook_it_cannot_make_a_certificate_for(
    tmp_path: Path,
) -> None:
    env = {"PATH": str(tmp_path), "OPTRUN_OPERATOR_WEBHOOK": "managed", "HOME": str(tmp_path)}
    out = subprocess.run([str(OPTRUN), "operator"], capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 2, out
    assert "webhook: no certificate" in out.stderr and "--webhook-cert-dir" in out.stderr
