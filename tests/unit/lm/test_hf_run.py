"""`optrun run` on a user's own Hugging Face model and JSONL data, as a user runs it (a child
process), for the Llama, Qwen2 and Mistral families: every stage runs on that one model, in
the lineage order, the run ends with a decision, and the artifact loads with
`AutoModelForCausalLM.from_pretrained` and gives the held-out loss the report names.

The manifest is small (a few steps per stage) so that three families fit in CI; the full
example is examples/hf-local.yaml. Every run here is a child on one thread (OMP_NUM_THREADS=1)
that pytest only waits for: the module starts them all at once, as many side by side as there
are cores, and each test judges its own.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from optrun.api.result import Result
from optrun.api.v1alpha1 import DatasetSource
from optrun.runtime.data import Corpus
from optrun.runtime.lm import evaluate, hf
from optrun.runtime.lm.example import FAMILIES
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


def run(manifest_text: str, tmp_path: Path, env: dict[str, str]) -> tuple[Result, Path]:
    """`optrun run` on the manifest in a child process; its result and output directory."""
    manifest = tmp_path / "run.yaml"
    manifest.write_text(manifest_text)
    out = tmp_path / "out"
    env = {**env, "OMP_NUM_THREADS": "1", "OPTRUN_CACHE": str(tmp_path / "cache")}
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
    return result, out


def stages_off(manifest_text: str) -> str:
    """The manifest with RLVR and the KV-cache sweep off."""
    manifest_text = manifest_text.replace("rlvr: {enabled: true", "rlvr: {enabled: false")
    return manifest_text.replace("kvCache: {enabled: true", "kvCache: {enabled: false")


@pytest.fixture(scope="module")
def runs(
    hf_dirs: dict[str, Path], jsonl_dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str], tuple[Result, Path]]]:
    """Every run of this module, started at once (a family's by its name, "stages-off" on Qwen2);
    the function waits for one and gives its result and output directory, or raises its failure."""
    manifests = {family: MANIFEST.format(model=hf_dirs[family], data=jsonl_dataset) for family in FAMILIES}
    manifests["stages-off"] = stages_off(manifests["qwen2"])
    # Built here, not in the worker threads: the tests' monkeypatch edits os.environ meanwhile.
    # TRITON_INTERPRET as the autouse fixture of conftest.py sets it for the tests themselves.
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    pool = ThreadPoolExecutor(max_workers=max(1, min(len(manifests), len(os.sched_getaffinity(0)))))
    futures = {
        name: pool.submit(run, text, tmp_path_factory.mktemp(name), env) for name, text in manifests.items()
    }
    try:
        yield lambda name: futures[name].result()
    finally:
        pool.shutdown(cancel_futures=True)  # a run no selected test waits for is not started


def section(md: str, title: str) -> str:
    assert f"\n## {title}\n" in md, f"report.md has no section {title!r}"
    return md.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_a_users_hf_model_goes_through_every_stage_to_a_decision_and_an_artifact(
    runs: Callable[[str], tuple[Result, Path]], jsonl_dataset: Path, family: str
) -> None:
    result, out = runs(family)
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
    assert chain[3]["received"] != chain[3]["handedOn"]  # GRPO changed them again, on the trained model
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
    artifact = result.artifact
    assert artifact is not None and Path(artifact.path) == out / "model"
    import transformers

    loaded = transformers.AutoModelForCausalLM.from_pretrained(out / "model", local_files_only=True)
    model = hf.HFCausalLM(loaded, hf.load_tokenizer(str(out / "model"), None))
    corpus = Corpus.build(DatasetSource(path=str(jsonl_dataset)), model.tokenizer, sequence_length=32)
    loss = evaluate(model, corpus.eval_batches(32, 8, 2), torch.device("cpu"))["loss"]
    assert artifact.held_out_loss is not None
    assert abs(loss - artifact.held_out_loss) / artifact.held_out_loss < 1e-4
    meta = json.loads((out / "model" / "optrun-artifact.json").read_text())
    assert meta["decision"] == result.decision.value

    # report.md names the artifact, its size and its held-out loss, and the quantized form.
    md = (out / "report.md").read_text()
    text = section(md, "Artifact")
    assert f"`{out / 'model'}` (hf-safetensors): {artifact.size_bytes:,} bytes" in text
    # The size is that of the files a standard loader reads (the quantized codes and optrun's
    # metadata aside).
    standard = [
        p
        for p in (out / "model").iterdir()
        if p.name not in ("quantized.safetensors", "optrun-artifact.json")
    ]
    assert artifact.size_bytes == sum(p.stat().st_size for p in standard)
    assert f"- Held-out loss: {artifact.held_out_loss:.4g} as written" in text
    assert "- Quantized form: int8 weight-only codes and scales of" in text
    assert f'AutoModelForCausalLM.from_pretrained("{out / "model"}")' in text
    # ...and the kernel table names every patched operation of the model.
    kernels = section(md, "Kernels")
    for op in ("rms_norm", "swiglu", "rope", "cross_entropy"):
        assert f"| {op} | " in kernels


@pytest.mark.slow
def test_a_stage_that_is_off_is_skipped_with_its_reason_and_is_not_on_the_lineage(
    runs: Callable[[str], tuple[Result, Path]],
) -> None:
    result, out = runs("stages-off")
    stages = result.details["stages"]
    assert stages["rlvr"] == {"status": "skipped", "reason": "spec.rlvr.enabled is false"}
    assert stages["kvcache"] == {"status": "skipped", "reason": "spec.optimizations.kvCache.enabled is false"}
    assert {k for k, v in stages.items() if v["status"] != "ran"} == {"rlvr", "kvcache"}
    chain = result.details["lineage"]
    assert [link["stage"] for link in chain] == ["baseline", "kernels", "train", "compression", "artifact"]
    for before, after in itertools.pairwise(chain):
        assert after["received"] == before["handedOn"], (before, after)
    assert {t.name: t.passed for t in result.tests}["infra.lineage-unbroken"]
    assert "rlvr" not in result.details and "kvcache" not in result.details  # nothing faked
    table = section((out / "report.md").read_text(), "Stages")
    assert "| rlvr | skipped |  | spec.rlvr.enabled is false |" in table
    assert "| kvcache | skipped |  | spec.optimizations.kvCache.enabled is false |" in table
