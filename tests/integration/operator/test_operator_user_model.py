"""A user's Hugging Face model and dataset on a PersistentVolumeClaim, run by the operator on the
real control plane: the claim is mounted read-only at the path the spec names, the runtime pod
loads the model from it (never downloading), and the run ends in a decision whose report names
the Llama on the claim, the stages that ran and those that were off (with why), and a lineage
on which training and compression changed that one model; a model path that is not there ends
the run with a result that names the field, without retries.

The claim's contents are written the way a platform team's volume would hold them: a directory
save_pretrained wrote, and a JSONL file (optrun.runtime.lm.example, as `optrun example-model`).
"""

from __future__ import annotations

import itertools
import json
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
        # Compression on: a second stage that changes the model, so the lineage shows it was
        # handed the trained model (kernels stay off: a CPU keeps eager anyway).
        optimizations={"compression": {"enabled": True, "codec": "int8", "target": "weights"}},
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
    # The report the pod wrote: the model judged is the Llama read from the claim, and the stage
    # list says what ran and what was off.
    pod_dir = node_agent.pod_dir(namespace, "mine-attempt-1")
    (report,) = pod_dir.rglob("report.json")
    details = json.loads(report.read_text())["details"]
    model = details["model"]
    assert (model["family"], model["source"], model["architecture"]) == (
        "llama",
        "/models/llama",
        "LlamaForCausalLM",
    )
    assert details["data"]["split"] == "sha256" and details["data"]["documents"]["train"] > 0
    stages = details["stages"]
    skipped = {name: s["reason"] for name, s in stages.items() if s["status"] == "skipped"}
    assert skipped == {
        "kernels": "spec.optimizations.kernels.enabled is false",
        "rlvr": "spec.rlvr.enabled is false",
        "kvcache": "spec.optimizations.kvCache.enabled is false",
    }
    assert {"baseline", "train", "compression", "artifact", "acceptance"} <= {
        name for name, s in stages.items() if s["status"] == "ran"
    }
    chain = details["lineage"]
    assert [link["stage"] for link in chain] == ["baseline", "train", "compression", "artifact"]
    for before_stage, after_stage in itertools.pairwise(chain):
        assert after_stage["received"] == before_stage["handedOn"]
    assert chain[1]["received"] != chain[1]["handedOn"]  # trained on the claim's data
    assert chain[2]["received"] != chain[2]["handedOn"]  # the trained model, quantized
    # The run wrote its artifact to its own volume and nothing to the user's claim.
    written = list(pod_dir.rglob("optrun-artifact.json"))
    assert len(written) == 1 and (written[0].parent / "model.safetensors").exists(), written
    meta = json.loads(written[0].read_text())
    assert (meta["family"], meta["source"], meta["decision"]) == (
        "llama",
        "/models/llama",
        status["decision"],
    )
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
