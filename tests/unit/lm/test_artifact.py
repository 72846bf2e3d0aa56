"""The artifact: the judged model on disk, loaded back the standard way with the same loss.

A Hugging Face model, quantized by optrun, is written; `AutoModelForCausalLM.from_pretrained`
loads the directory (its float weights are the dequantized ones the quantized layers compute
with) and gives the held-out loss of the model in memory; optrun's loader rebuilds the int8
layers from their stored codes with the same loss. The built-in model goes the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from optrun.api.v1alpha1 import ModelSource, OptimizationRunSpec
from optrun.runtime import artifact, compression
from optrun.runtime.compression.quantized_linear import QuantizedLinear
from optrun.runtime.context import RunContext
from optrun.runtime.data import Corpus
from optrun.runtime.hardware import detect
from optrun.runtime.lm import evaluate, hf
from optrun.runtime.model import build_model

CPU = torch.device("cpu")


def context(spec: OptimizationRunSpec, model: torch.nn.Module, corpus: Corpus, out: Path) -> RunContext:
    device, hardware = detect("cpu")
    return RunContext(
        spec=spec,
        device=device,
        hardware=hardware,
        corpus=corpus,
        model_factory=lambda: model,
        output_dir=out,
        model=model,
    )


def spec_for(model: object) -> OptimizationRunSpec:
    return OptimizationRunSpec.model_validate(
        {
            "workload": {"model": model, "sequenceLength": 32, "batchSize": 4},
            "optimizations": {"compression": {"enabled": True, "codec": "int8"}},
            "training": {"evalBatches": 2},
        }
    )


def test_a_quantized_hf_model_reloads_with_from_pretrained_and_the_same_held_out_loss(
    hf_dirs: dict[str, Path], tmp_path: Path
) -> None:
    import transformers

    source = ModelSource(path=str(hf_dirs["qwen2"]))
    model = hf.load(source, precision="fp32", device=CPU)
    corpus = Corpus.build("pydoc", model.tokenizer)
    ctx = context(spec_for({"path": source.path}), model, corpus, tmp_path)
    ctx.model = compression.apply(ctx, model)  # the compression stage, as the run calls it
    compressed = ctx.results["compression"]["weights"]["compressedTensors"]
    assert compressed > 0
    info = artifact.write(ctx, tmp_path / "model")

    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model", local_files_only=True)
    reloaded = hf.HFCausalLM(plain, hf.load_tokenizer(str(tmp_path / "model"), None))
    batches = ctx.eval_batches()
    loss = evaluate(reloaded, batches, CPU)["loss"]
    assert abs(loss - info["heldOutLoss"]) / info["heldOutLoss"] < 1e-4
    assert info["reloadedHeldOutLoss"] == pytest.approx(loss, rel=1e-6)

    restored = artifact.load(tmp_path / "model")
    assert sum(isinstance(m, QuantizedLinear) for m in restored.modules()) == compressed
    assert abs(evaluate(restored, batches, CPU)["loss"] - info["heldOutLoss"]) / info["heldOutLoss"] < 1e-4
    meta = json.loads((tmp_path / "model" / artifact.META).read_text())
    assert meta["format"] == "hf-safetensors" and len(meta["quantizedLayers"]) == compressed
    assert any(line.startswith("compression: int8 weight-only") for line in meta["optimizations"])
    # The quantized payload is the memory saving: int8 codes and scales, far below the float weights.
    assert info["quantizedBytes"] < 0.4 * sum(
        p.numel() * 4 for n, p in model.named_parameters() if "layers" in n
    )


def test_the_built_in_model_reloads_with_optruns_loader(tmp_path: Path) -> None:
    model = build_model("tiny-lm")
    ctx = context(spec_for("tiny-lm"), model, Corpus.build("pydoc"), tmp_path)
    info = artifact.write(ctx, tmp_path / "model")
    assert info["format"] == "optrun-safetensors" and info["quantizedBytes"] is None
    restored = artifact.load(tmp_path / "model")
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(restored(x), model.eval()(x))
