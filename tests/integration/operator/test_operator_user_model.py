"""A user's Hugging Face model and dataset on a PersistentVolumeClaim, run by the operator on the
real control plane: the claim is mounted read-only at the path the spec names, the runtime pod
loads the model from it (never downloading), and the run ends in a decision; a model path that
is not there ends the run with a result that names the field, without retries.

The claim's contents are written the way a platform team's volume would hold them: a directory
save_pretrained wrote, and a JSONL file (optrun.runtime.lm.example, as `optrun example-model`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from optrun.runtime.lm.example import make_model, write_dataset
from tests.integration.operator.conftest import Runs, pvc, tiny_spec

pytestmark = pytest.mark.integration


def user_volume(node_agent: Any, namespace: str, claim: str) -> Path:
    """The directory the node agent provisions for `claim` (what the PersistentVolume holds)."""
    path = Path(node_agent.state_dir) / "pvcs" / namespace / claim
    path.mkdir(parents=True, exist_ok=True)
    return path


def hf_spec(model_path: str, claim: str) -> dict[str, Any]:
    return tiny_spec(
        workload={
            "model": {"path": model_path},
            "dataset": {"path": "/models/data/train.jsonl", "format": "jsonl", "textField": "text"},
            "sequenceLength": 32,
            "batchSize": 4,
        },
        volumes=[{"name": "models", "claimName": claim, "mountPath": "/models"}],
        resources={"gpus": 0, "cpu": "1", "memory": "2Gi"},
    )


@pytest.mark.slow
def test_a_hf_model_on_a_claim_runs_to_a_decision(
    start_operator: Any, runs: Runs, kube: Any, namespace: str, node_agent: Any
) -> None:
    claim = pvc(kube, namespace, "models")
    volume = user_volume(node_agent, namespace, claim)
    make_model(volume / "llama", "llama")
    write_dataset(volume / "data" / "train.jsonl")
    before = {p: p.stat().st_mtime_ns for p in volume.rglob("*")}
    start_operator(namespace)
    runs.create("mine", hf_spec("/models/llama", claim))

    status = runs.wait_phase("mine", "Succeeded", "Failed", timeout=300)
    assert status["phase"] == "Succeeded", status["message"]
    assert status["decision"] in ("GO", "CONDITIONAL_GO", "NO_GO")
    (pod,) = runs.pods("mine")
    mounts = {m.mount_path: m for m in pod.spec.containers[0].volume_mounts}
    assert mounts["/models"].read_only is True
    log = node_agent.container_log(namespace, "mine-attempt-1", "runtime")
    assert "stage kernels" in log and "stage artifact" in log, log[-3000:]
    # The run wrote its artifact to its own volume and nothing to the user's claim.
    written = list(node_agent.pod_dir(namespace, "mine-attempt-1").rglob("optrun-artifact.json"))
    assert len(written) == 1 and (written[0].parent / "model.safetensors").exists(), written
    assert {p: p.stat().st_mtime_ns for p in volume.rglob("*")} == before


def test_a_model_path_that_is_not_on_the_claim_is_named_in_the_result(
    start_operator: Any, runs: Runs, kube: Any, namespace: str, node_agent: Any
) -> None:
    claim = pvc(kube, namespace, "models")
    volume = user_volume(node_agent, namespace, claim)
    write_dataset(volume / "data" / "train.jsonl")
    start_operator(namespace)
    runs.create("missing", hf_spec("/models/nope", claim))

    status = runs.wait_phase("missing", "Succeeded", "Failed", timeout=120)
    assert status["decision"] == "NO_GO"
    assert status["attempts"] == 1  # a bad source is no reason to retry
    failures = {f["name"]: f for f in status["acceptance"]["failures"]}
    assert (
        "spec.workload.model.path: /models/nope does not exist" in failures["infra.sources-valid"]["reason"]
    )
