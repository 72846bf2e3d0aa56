"""The kernel stage as the orchestrator runs it: optimize(ctx, model) on a real run context, what
it records, and the acceptance tests it registers."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from optrun.runtime import (
    kernels,
    speedup,  # noqa: F401  (registers the speedup.* acceptance tests)
)
from optrun.runtime.acceptance import SUITE
from optrun.runtime.compression.quantized_linear import quantize_model
from optrun.runtime.context import RunContext
from optrun.runtime.kernels import acceptance, optimize
from optrun.runtime.kernels.modules import TritonRMSNorm
from optrun.runtime.kernels.ops._launch import TritonUnavailableError
from optrun.runtime.kernels.select import wait_for_background_compiles

Make = Callable[..., RunContext]


def test_auto_on_cpu_records_choices_times_and_what_was_swapped(make_context: Make) -> None:
    ctx = make_context()
    try:
        model = optimize(ctx, ctx.model_factory())
    finally:
        wait_for_background_compiles()  # an abandoned compile must not slow the next tests down
    info = ctx.results["kernels"]
    assert info["mode"] == "auto" and info["deviceClass"] == "cpu" and info["device"] == ctx.hardware.name
    assert set(info["choices"]) == {"rms_norm", "rope", "swiglu", "cross_entropy"}
    for op, c in info["choices"].items():
        assert c["choice"] in c["times"], op  # chosen from a measurement
        assert c["choice"] != "triton"
        assert "triton" in c["skipped"]
    assert sum(n for per in info["swapped"]["counts"].values() for n in per.values()) == 10
    assert "kernels" in ctx.transforms
    assert model is not None


def test_forced_triton_patches_the_model_and_passes_the_acceptance_checks(make_context: Make) -> None:
    ctx = make_context(optimizations={"kernels": {"enabled": True, "mode": "triton"}})
    model = kernels.run(ctx, ctx.model_factory())  # the stage: parity measured around the patching
    assert isinstance(model.norm, TritonRMSNorm)
    assert ctx.results["kernels"]["swapped"]["counts"]["swiglu"] == {"triton": 2}
    # Judged as the orchestrator hands it on: the quantized copy of the patched model.
    ctx.model = quantize_model(model, "int8", 0.02)[0]
    detection = acceptance.detection(ctx)
    assert detection.passed, detection.reason
    assert "forced by mode=triton" in detection.reason and "all 10 patched modules" in detection.reason
    # A judged model that lost its kernels (a fresh copy, unpatched) fails it, by module.
    ctx.model = ctx.model_factory()
    detection = acceptance.detection(ctx)
    assert not detection.passed
    assert "runs eager, selection chose triton (TritonRMSNorm)" in detection.reason
    parity = acceptance.parity(ctx)
    assert parity.passed, parity.reason
    assert 0 <= parity.measured < 1e-4  # fp32: the kernels agree with eager to rounding


@pytest.mark.slow  # a few training steps through the Triton interpreter
def test_training_with_triton_kernels_ends_at_the_loss_of_training_without(make_context: Make) -> None:
    ctx = make_context(optimizations={"kernels": {"enabled": True, "mode": "triton"}})
    optimize(ctx, ctx.model_factory())
    check = acceptance.compare_training(ctx, steps=3)
    assert check.passed, check.reason
    assert check.measured < acceptance.TRAINING_LOSS_RTOL[ctx.dtype]


def test_forcing_triton_on_a_cpu_without_the_interpreter_fails_the_stage_clearly(
    make_context: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    ctx = make_context(optimizations={"kernels": {"enabled": True, "mode": "triton"}})
    with pytest.raises(
        TritonUnavailableError, match=r"spec\.optimizations\.kernels\.mode: triton needs a CUDA device"
    ):
        optimize(ctx, ctx.model_factory())


def test_detection_fails_when_the_stage_did_not_run(make_context: Make) -> None:
    check = acceptance.detection(make_context())
    assert not check.passed and "did not run" in check.reason


def test_kernel_acceptance_tests_apply_only_when_kernels_are_enabled(make_context: Make) -> None:
    on = {t.name for t in SUITE.applicable(make_context().spec)}
    assert {"kernels.detection", "kernels.parity", "kernels.training-loss", "speedup.kernels"} <= on
    off = make_context(optimizations={"kernels": {"enabled": False}}).spec
    assert not {t.name for t in SUITE.applicable(off)} & {"kernels.detection", "speedup.kernels"}
