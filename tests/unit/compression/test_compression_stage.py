"""The compression stage end to end: `apply` on a run context, what it records, the transform it
registers, and the acceptance tests it adds to the suite."""

from __future__ import annotations

import pytest
import torch

from optrun.api.v1alpha1 import OptimizationRunSpec
from optrun.runtime import compression
from optrun.runtime.acceptance import SUITE
from optrun.runtime.compression import acceptance  # noqa: F401  (registers the tests)
from optrun.runtime.compression.quantized_linear import QuantizedLinear
from optrun.runtime.context import RunContext
from optrun.runtime.data import Corpus
from optrun.runtime.hardware import detect
from optrun.runtime.model import build_model

CORPUS = Corpus.build("pydoc")


def _ctx(tmp_path, **compression_cfg) -> RunContext:
    spec = OptimizationRunSpec.model_validate(
        {
            "workload": {"model": "tiny-lm", "sequenceLength": 32, "batchSize": 4},
            "optimizations": {"compression": {"enabled": True, **compression_cfg}},
        }
    )
    device, hw = detect("cpu")

    def factory() -> torch.nn.Module:
        torch.manual_seed(1234)
        return build_model("tiny-lm")

    return RunContext(
        spec=spec, device=device, hardware=hw, corpus=CORPUS, model_factory=factory, output_dir=tmp_path
    )


def _checks(ctx: RunContext) -> dict[str, object]:
    tests = [t for t in SUITE.applicable(ctx.spec) if t.name.startswith("compression.")]
    return {t.name: t.fn(ctx) for t in tests}


def test_weights_target_returns_a_quantized_copy_and_registers_the_transform(tmp_path):
    ctx = _ctx(tmp_path, codec="int8", target="weights")
    model = ctx.model_factory()
    qmodel = compression.apply(ctx, model)
    assert qmodel is not model and isinstance(qmodel.layers[0].ffn.w1, QuantizedLinear)
    assert type(model.layers[0].ffn.w1) is torch.nn.Linear
    res = ctx.results["compression"]
    assert res["gate"] == {"trips": 0, "tensors": 15, "failed": False}
    w = res["weights"]
    assert w["memory"]["quantizedBytes"] < w["memory"]["floatBytes"] / 2.5
    assert all(t["error"] <= 0.02 and t["sqnr_db"] > 30 for t in w["tensors"])
    assert abs(w["parity"]["perplexityRise"]) < 0.01
    assert isinstance(ctx.transforms["compression"](model).output, QuantizedLinear)
    assert "gradients" not in res


def test_weights_target_passes_its_acceptance_tests(tmp_path):
    # int4 in groups of 32 moves each weight of the untrained tiny model by up to ~0.1 and its
    # logits by 0.163 (errors add up through the layers): a bound of 0.2 holds for both.
    ctx = _ctx(tmp_path, codec="int4", target="weights", maxReconstructionError=0.2, groupSize=32)
    # As the orchestrator hands it on: the trained float model in, the quantized model judged.
    ctx.trained = ctx.model_factory()
    ctx.model = compression.apply(ctx, ctx.trained)
    checks = _checks(ctx)
    assert set(checks) == {
        "compression.gate",
        "compression.weights.error_bound",
        "compression.weights.ratio",
        "compression.weights.inference_parity",
    }
    failed = {k: c.reason for k, c in checks.items() if not c.passed}
    assert not failed
    # Measured on the two models' logits, not read back from the gate.
    error = checks["compression.weights.error_bound"].measured
    assert isinstance(error, dict) and 0.1 < error["logitError"] <= 0.2


def test_a_bound_no_tensor_meets_fails_the_gate_and_its_acceptance_test(tmp_path):
    ctx = _ctx(tmp_path, codec="int4", target="weights", maxReconstructionError=0.01)
    qmodel = compression.apply(ctx, ctx.model_factory())
    assert not any(isinstance(m, QuantizedLinear) for m in qmodel.modules())
    assert ctx.results["compression"]["gate"] == {
        "trips": 15,
        "tensors": 15,
        "failed": True,
    }
    check = _checks(ctx)["compression.gate"]
    assert not check.passed and "the gate failed" in check.reason


@pytest.mark.slow
def test_gradients_target_runs_two_gloo_processes_and_passes_its_acceptance_tests(tmp_path):
    ctx = _ctx(tmp_path, codec="int8", target="gradients", gradientSteps=3)
    model = ctx.model_factory()
    assert compression.apply(ctx, model) is model
    g = ctx.results["compression"]["gradients"]
    assert set(g["hooks"]) == {"allreduce", "int8"} and g["steps"] == 3 and g["worldSize"] == 2
    assert 3.5 < g["bytesRatio"] < 4.0
    assert g["gate"]["tensors"] == 3 * len(list(model.parameters())) and not g["gate"]["failed"]
    assert "compression" not in ctx.transforms  # nothing to apply to inference
    checks = _checks(ctx)
    assert set(checks) == {
        "compression.gate",
        "compression.gradients.bytes_ratio",
        "compression.gradients.loss_parity",
    }
    assert all(c.passed for c in checks.values()), {k: c.reason for k, c in checks.items()}


def test_compression_tests_apply_only_when_enabled():
    spec = OptimizationRunSpec.model_validate({"workload": {"model": "tiny-lm"}})
    assert not [t for t in SUITE.applicable(spec) if t.name.startswith("compression.")]


def test_a_stage_that_left_nothing_fails_its_tests_with_the_reason(tmp_path):
    ctx = _ctx(tmp_path, codec="int8", target="weights")
    ctx.results["compression"] = {"error": "RuntimeError: boom"}
    with pytest.raises(RuntimeError, match="left no gate: RuntimeError: boom"):
        _checks(ctx)
