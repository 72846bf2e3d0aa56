"""The core acceptance tests (optrun.runtime.checks) on a real, short CPU run: each passes on a
healthy run and fails on the defect it exists to catch."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from optrun.api.result import Category
from optrun.runtime import checks, orchestrator
from optrun.runtime.acceptance import SUITE
from optrun.runtime.context import RunContext
from optrun.runtime.metrics import Metrics
from optrun.runtime.orchestrator import LogObserver, RunOptions
from optrun.runtime.training.loop import evaluate
from tests.unit.runtime.runtime_support import run_context, small_spec


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunContext]:
    """One short healthy run (2 epochs of 6 steps) shared by the module's read-only checks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ctx = run_context(small_spec(), tmp_path_factory.mktemp("run"))
    ctx.results["metrics"] = Metrics(ctx.output_dir / "metrics.jsonl")
    s = ctx.spec
    ctx.results["baseline"] = evaluate(
        ctx.model_factory(),
        ctx.corpus.eval_batches(s.workload.sequence_length, s.workload.batch_size, s.training.eval_batches),
        ctx.device,
    )
    orchestrator.train(ctx, ctx.model_factory(), RunOptions(output_dir=ctx.output_dir), LogObserver())
    torch.set_num_threads(threads)
    yield ctx


def variant(ctx: RunContext, **train: object) -> RunContext:
    """A copy of the context whose train results differ as given (the original stays intact)."""
    results = dict(ctx.results)
    results["train"] = {**ctx.results["train"], **train}
    return dataclasses.replace(ctx, results=results)


def test_core_checks_are_registered_with_their_categories() -> None:
    names = set(SUITE.names())
    for name, category, critical in [
        ("infra.hardware-detected", Category.CRITICAL_INFRASTRUCTURE, True),
        ("infra.checkpoint-restores", Category.CRITICAL_INFRASTRUCTURE, True),
        ("safety.nan-loss-caught-and-recovered", Category.SAFETY, True),
        ("safety.persistent-fault-fails-the-gate", Category.SAFETY, False),
        ("e2e.training-completed", Category.END_TO_END, True),
        ("stability.weights-finite", Category.STABILITY, True),
        ("tuning.fixed-seed-reproducibility", Category.TUNING, False),
    ]:
        assert name in names
        test = next(t for t in SUITE.applicable(small_spec()) if t.name == name)
        assert (test.category, test.critical) == (category, critical)


def test_healthy_run_passes_the_infrastructure_and_end_to_end_checks(trained: RunContext) -> None:
    for check in (
        checks.hardware_detected,
        checks.precision_supported,
        checks.checkpoint_restores,
        checks.metrics_exported,
        checks.run_gates,
        checks.training_completed,
        checks.loss_decreased,
        checks.weights_finite,
        checks.gradient_flow,
    ):
        result = check(trained)
        assert result.passed, f"{check.__name__}: {result.reason}"


def test_injected_faults_are_caught_on_a_scratch_copy(trained: RunContext) -> None:
    before = {k: v.clone() for k, v in trained.model.state_dict().items()}
    checkpoints = sorted(p.name for p in (trained.output_dir / "checkpoints").iterdir())
    for check in (
        checks.nan_loss_recovered,
        checks.exploding_recovered,
        checks.persistent_fault_fails,
        checks.vanishing_caught,
    ):
        result = check(trained)
        assert result.passed, f"{check.__name__}: {result.reason}"
    # The real run is never touched: same weights, same checkpoints.
    for name, value in trained.model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert sorted(p.name for p in (trained.output_dir / "checkpoints").iterdir()) == checkpoints


def test_same_seed_scratch_runs_are_reproducible(trained: RunContext) -> None:
    result = checks.reproducibility(trained)
    assert result.passed, result.reason
    assert result.measured == 0.0  # fp32 on one CPU thread: bitwise equal


def test_checkpoint_check_passes_on_the_real_run(trained: RunContext) -> None:
    result = checks.checkpoint_restores(trained)
    assert result.passed, result.reason
    assert "moved the weights" in result.reason


def test_checkpoint_check_fails_when_the_checkpoint_does_not_hold_the_trained_model(
    trained: RunContext, tmp_path: Path
) -> None:
    from optrun.runtime.training.checkpoint import CheckpointStore

    store = CheckpointStore(trained.output_dir / "checkpoints", keep=trained.spec.training.checkpoint.keep)
    found = store.latest()
    assert found is not None
    # The same checkpoint, with weights that are not the ones it recorded its evaluation for.
    model = trained.model_factory()
    store.restore(found, model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    CheckpointStore(tmp_path / "checkpoints", keep=2).save(found.step, found.meta, model=model)
    result = checks.checkpoint_restores(dataclasses.replace(trained, output_dir=tmp_path))
    assert not result.passed
    assert f"{found.path.name} (step {found.step}) in a fresh model: held-out loss" in result.reason


def test_checkpoint_check_fails_without_checkpoints(trained: RunContext, tmp_path: Path) -> None:
    ctx = dataclasses.replace(trained, output_dir=tmp_path)
    assert not checks.checkpoint_restores(ctx).passed


def test_weights_check_fails_on_a_non_finite_weight(trained: RunContext) -> None:
    ctx = dataclasses.replace(trained, model=copy.deepcopy(trained.model))
    with torch.no_grad():
        next(ctx.model.parameters())[0] = float("nan")
    assert not checks.weights_finite(ctx).passed


def test_run_gates_check_fails_when_a_gate_failed(trained: RunContext) -> None:
    ctx = variant(trained, gate_failed="nan_loss", gate_message="nan_loss at step 3 (policy fail)")
    result = checks.run_gates(ctx)
    assert not result.passed
    assert "nan_loss" in result.reason


def test_training_completed_fails_on_a_short_run(trained: RunContext) -> None:
    result = checks.training_completed(variant(trained, epochs=1))
    assert not result.passed
    assert result.measured == 1


def test_target_accuracy_is_judged_against_the_spec(trained: RunContext) -> None:
    assert checks.target_accuracy(variant(trained, final_accuracy=0.36)).passed
    assert not checks.target_accuracy(variant(trained, final_accuracy=0.2)).passed


def test_convergence_smoothness_fails_on_a_rising_held_out_loss(trained: RunContext) -> None:
    falling = [{"step": i, "loss": 3.0 - 0.1 * i, "accuracy": 0.1} for i in range(5)]
    assert checks.convergence_smoothness(variant(trained, evals=falling)).passed
    rising = [*falling, {"step": 5, "loss": 2.6 * 1.2, "accuracy": 0.1}]
    result = checks.convergence_smoothness(variant(trained, evals=rising))
    assert not result.passed
    assert result.measured == pytest.approx(0.2)


def test_step_time_check_flags_a_slow_tail(trained: RunContext) -> None:
    steady = [0.01] * 20
    assert checks.step_time_steady(variant(trained, step_seconds=steady)).passed
    tail = [0.01] * 16 + [0.1] * 4
    assert not checks.step_time_steady(variant(trained, step_seconds=tail)).passed


def test_loss_decreased_fails_when_training_made_it_worse(trained: RunContext) -> None:
    worse = trained.results["baseline"]["loss"] + 1.0
    assert not checks.loss_decreased(variant(trained, final_loss=worse)).passed


def test_lineage_is_measured_on_the_models_not_taken_from_the_record(tmp_path: Path) -> None:
    ctx = run_context(small_spec(training={"epochs": 1}), tmp_path)
    ctx.results["metrics"] = Metrics()
    ctx.model = ctx.model_factory()
    stages = orchestrator._Stages(LogObserver(), ctx.results["metrics"], ctx.results)
    with stages.on_lineage("baseline", ctx):
        pass
    with stages.on_lineage("train", ctx):
        orchestrator.train(ctx, ctx.model, RunOptions(output_dir=tmp_path), LogObserver())
    ctx.trained = ctx.model
    result = checks.lineage_unbroken(ctx)
    assert result.passed, result.reason

    # Something between the stage and the judge (an acceptance test, the speedup matrix) wrote
    # into the judged model: the record still reads as a chain, the model does not.
    assert ctx.model is not None
    with torch.no_grad():
        ctx.model.norm.weight.mul_(2.0)
    result = checks.lineage_unbroken(ctx)
    assert not result.passed
    assert "the judged model is not the one train handed on" in result.reason


def test_hardware_check_fails_on_a_cpu_whose_blas_computes_in_reduced_precision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a CPU the matmul is judged against the exact product, not against the CPU itself: a
    BLAS that rounds its inputs to bf16 (as a misconfigured fast-math library may) fails."""
    ctx = run_context(small_spec(), tmp_path)
    healthy = checks.hardware_detected(ctx)
    assert healthy.passed, healthy.reason
    assert isinstance(healthy.measured, dict) and healthy.measured["matmulError"] < 1e-5
    mm = torch.mm

    def reduced(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return mm(a.bfloat16().float(), b.bfloat16().float())

    monkeypatch.setattr(torch, "mm", reduced)
    broken = checks.hardware_detected(ctx)
    assert not broken.passed
    assert "fp32 matmul on cpu is" in broken.reason and "off the exact product" in broken.reason
