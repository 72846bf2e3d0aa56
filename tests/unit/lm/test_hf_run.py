"""`optrun run` on a user's own Hugging Face model and JSONL data, as a user runs it (a child
process), for the Llama, Qwen2 and Mistral families: every stage runs on that one model, in
the lineage order, the run ends with a decision, and the artifact loads with
`AutoModelForCausalLM.from_pretrained` and gives the held-out loss the report names.

The manifest is small (a few steps per stage) so that three families fit in CI; the full
example is examples/hf-local.yaml.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from optrun.api.result import Result
from optrun.api.v1alpha1 import DatasetSource
from optrun.runtime.data import Corpus
from optrun.runtime.lm import evaluate, hf
from optrun.runtime.metrics import PIPELINE

EXIT_FOR = {"GO": 0, "CONDITIONAL_GO": 3, "NO_GO": 4}

MANIFEST = """\
apiVersion: optrun.io/v1alpha1
kind: OptimizationRun
metadata: {{name: mine}}
spec:
  workload:
    model: {{path: {model}}}
    dataset: {{path: {data}, format: jsonl, textField: text}}
    sequenceLength: 32
    batchSize: 8
  optimizations:
    kernels: {{enabled: true, mode: auto}}
    compression: {{enabled: true, codec: int8, target: weights}}
    kvCache: {{enabled: true, dtype: int8, batchSizes: [1, 4], contextLengths: [64]}}
  training: {{epochs: 1, stepsPerEpoch: 12, learningRate: 3.0e-3, warmupSteps: 2, evalBatches: 2,
             targetAccuracy: 0.0, checkpoint: {{everySteps: 6, keep: 2}}}}
  rlvr: {{enabled: true, steps: 3, groupSize: 4, promptsPerStep: 4, warmupSteps: 10,
         warmupTargetAccuracy: null, evalProblems: 20, replayBatchSize: 2}}
  acceptance: {{repeats: 3}}
  resources: {{gpus: 0}}
"""


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_a_users_hf_model_goes_through_every_stage_to_a_decision_and_an_artifact(
    hf_dirs: dict[str, Path], jsonl_dataset: Path, tmp_path: Path, family: str
) -> None:
    manifest = tmp_path / "run.yaml"
    manifest.write_text(MANIFEST.format(model=hf_dirs[family], data=jsonl_dataset))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPTRUN_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-m", "optrun.cli", "run", str(manifest), "--output", str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert done.returncode in EXIT_FOR.values(), done.stderr[-3000:]
    result = Result.model_validate(json.loads((out / "report.json").read_text()))
    assert done.returncode == EXIT_FOR[result.decision.value]
    details = result.details

    # Every stage ran (none skipped, none crashed), in the lineage order.
    assert list(details["stages"]) == [s for s in PIPELINE if s != "report"]
    assert {k: v["status"] for k, v in details["stages"].items()} == dict.fromkeys(details["stages"], "ran")
    chain = details["lineage"]
    assert [link["stage"] for link in chain] == [
        "baseline",
        "kernels",
        "train",
        "rlvr",
        "compression",
        "kvcache",
        "artifact",
    ]
    for before, after in itertools.pairwise(chain):
        assert after["received"] == before["handedOn"], (before, after)
    assert chain[2]["received"] != chain[2]["handedOn"]  # training changed the weights
    assert chain[4]["received"] != chain[4]["handedOn"]  # compression quantized them
    assert details["model"]["family"] == family and details["data"]["split"] == "sha256"

    tests = {t.name: t for t in result.tests}
    for name in (
        "infra.lineage-unbroken",
        "infra.artifact-reloads",
        "infra.checkpoint-restores",
        "kernels.parity",
        "kvcache.parity",
        "compression.gate",
    ):
        assert tests[name].passed, tests[name].reason

    # The artifact: from_pretrained loads it, and its held-out loss is the one the report names.
    assert result.artifact is not None and Path(result.artifact.path) == out / "model"
    import transformers

    loaded = transformers.AutoModelForCausalLM.from_pretrained(out / "model", local_files_only=True)
    model = hf.HFCausalLM(loaded, hf.load_tokenizer(str(out / "model"), None))
    corpus = Corpus.build(DatasetSource(path=str(jsonl_dataset)), model.tokenizer, sequence_length=32)
    loss = evaluate(model, corpus.eval_batches(32, 8, 2), torch.device("cpu"))["loss"]
    assert abs(loss - result.artifact.held_out_loss) / result.artifact.held_out_loss < 1e-4
    meta = json.loads((out / "model" / "optrun-artifact.json").read_text())
    assert meta["decision"] == result.decision.value
    assert "model" in (out / "report.md").read_text().lower()
