"""The orchestrator's train stage and watchdog: a crashed attempt is retried from the checkpoint,
a failed gate becomes data (never a missing report), and a run that stops moving is reported."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from optrun.runtime import orchestrator
from optrun.runtime.context import RunContext
from optrun.runtime.lm.loading import model_factory
from optrun.runtime.metrics import Metrics
from optrun.runtime.orchestrator import LogObserver, RunOptions, Watchdog
from optrun.runtime.training.faults import InjectedFault
from tests.unit.runtime.runtime_support import run_context, small_spec


def train_stage(ctx: RunContext, attempts: int = 1) -> dict[str, object]:
    ctx.results["metrics"] = Metrics(ctx.output_dir / "metrics.jsonl")
    model = ctx.model_factory()
    orchestrator.train(ctx, model, RunOptions(output_dir=ctx.output_dir, attempts=attempts), LogObserver())
    return ctx.results["train"]


def logged(ctx: RunContext) -> list[dict[str, object]]:
    return [json.loads(line) for line in (ctx.output_dir / "metrics.jsonl").read_text().splitlines()]


def test_crashed_attempt_is_retried_from_the_checkpoint_and_completes(tmp_path: Path) -> None:
    ctx = run_context(small_spec(faults=[{"type": "exception", "atStep": 3}]), tmp_path)
    info = train_stage(ctx, attempts=2)
    assert info["attempts"] == 2
    assert "InjectedFault" in str(info["error"])
    assert info["steps"] == 12 and info["epochs"] == 2
    resumes = [e for e in logged(ctx) if e["event"] == "resume"]
    assert [e["step"] for e in resumes] == [2]
    assert ctx.model is not None
    assert all(bool(torch.isfinite(p).all()) for p in ctx.model.parameters())


def test_crash_on_the_last_attempt_propagates(tmp_path: Path) -> None:
    ctx = run_context(small_spec(faults=[{"type": "exception", "atStep": 3}]), tmp_path)
    with pytest.raises(InjectedFault):
        train_stage(ctx, attempts=1)


def test_failed_gate_is_recorded_as_data(tmp_path: Path) -> None:
    spec = small_spec(
        faults=[{"type": "nan-loss", "atStep": 2, "persistent": True}], safety={"maxRecoveries": 1}
    )
    ctx = run_context(spec, tmp_path)
    info = train_stage(ctx)
    assert info["gate_failed"] == "recovery_budget"
    assert "maxRecoveries 1" in str(info["gate_message"])
    assert info["trips"] == {"nan_loss": 2}
    assert info["recoveries"] == 2
    assert info["steps"] < 12
    # The result contract carries the gate as data (the operator's condition reason) and says why.
    result = orchestrator._result(ctx, [], [], {})
    assert result.safety.failed_gate == "recovery_budget"
    assert result.exit_reason.startswith("safety gate recovery_budget failed: ")
    assert "maxRecoveries 1" in result.exit_reason


def test_train_stage_reports_history_for_the_report(tmp_path: Path) -> None:
    ctx = run_context(small_spec(training={"epochs": 1}), tmp_path)
    info = train_stage(ctx)
    assert [s for s, _ in info["losses"]] == list(range(6))
    assert info["evals"][-1]["step"] == 6
    assert info["final_loss"] == info["evals"][-1]["loss"]
    assert len(info["step_seconds"]) == 6
    assert info["trips"] == {} and info["recoveries"] == 0


def test_model_factory_gives_the_same_weights_and_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    build = model_factory(small_spec(), torch.device("cpu"))
    torch.manual_seed(99)
    before = torch.get_rng_state()
    a, b = build(), build()
    assert torch.equal(torch.get_rng_state(), before)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


# -- watchdog ------------------------------------------------------------------------------------


def test_watchdog_reports_a_run_without_progress_once() -> None:
    metrics = Metrics()
    metrics.last_progress = time.time() - 120  # the last step was two minutes ago
    reported: list[float] = []
    seen = threading.Event()

    def on_hang(idle: float) -> None:
        reported.append(idle)
        seen.set()

    dog = Watchdog(metrics, timeout=0.4, on_hang=on_hang)  # checks every 0.1 s
    dog.start()
    try:
        assert seen.wait(10), "the watchdog never reported the hang"
        # The same stall is reported once, however many checks see it.
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            dog.done.wait(0.1)
        assert len(reported) == 1
        assert reported[0] >= 120
    finally:
        dog.done.set()
        dog.join(5)
    assert not dog.is_alive()


def test_watchdog_stays_quiet_while_the_run_progresses() -> None:
    metrics = Metrics()
    reported: list[float] = []
    dog = Watchdog(metrics, timeout=1.0, on_hang=reported.append)  # checks every 0.25 s
    dog.start()
    try:
        for step in range(30):  # a step every 0.05 s for 1.5 s: several checks, none idle for 1 s
            metrics.train_step(epoch=0, step=step, loss=1.0, lr=1e-3, seconds=0.01, tokens=64)
            dog.done.wait(0.05)
    finally:
        dog.done.set()
        dog.join(5)
    assert reported == []


@pytest.mark.parametrize("error", [RuntimeError("cuda error"), TypeError("bad call"), KeyError("missing")])
def test_crashed_optional_stage_is_recorded_not_fatal(tmp_path: Path, error: Exception) -> None:
    ctx = run_context(small_spec(), tmp_path)

    def stage() -> None:
        raise error

    orchestrator._optional(ctx, "rlvr", stage)
    assert ctx.results["rlvr"]["error"] == f"{type(error).__name__}: {error}"


def _memory_limit(monkeypatch: pytest.MonkeyPatch, rows: int) -> list[int]:
    """The tiny model's inference forward runs out of memory above `rows` rows (0: always), as a
    device too small for the evaluation batches would; returns the row counts it refused."""
    from optrun.runtime.model import TinyLM

    refused: list[int] = []
    forward = TinyLM.forward

    def limited(self: TinyLM, tokens: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if not self.training and kwargs.get("targets") is None and tokens.shape[0] > rows:
            refused.append(tokens.shape[0])
            raise torch.OutOfMemoryError(f"injected: {tokens.shape[0]} rows over a limit of {rows}")
        return forward(self, tokens, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(TinyLM, "forward", limited)
    return refused


def _run(tmp_path: Path) -> tuple[object, dict[str, object]]:
    spec = small_spec(training={"epochs": 1, "stepsPerEpoch": 4, "evalBatches": 1})
    result = orchestrator.execute(spec, RunOptions(output_dir=tmp_path))
    return result, json.loads((tmp_path / "report.json").read_text())


def test_out_of_memory_in_evaluation_backs_off_and_the_run_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Evaluation (the baseline's and the training's) meets a limit of 2 rows: it evaluates each
    # batch of 4 in halves, and the run ends in a report with the baseline measured.
    refused = _memory_limit(monkeypatch, rows=2)
    _result, doc = _run(tmp_path)
    assert 4 in refused
    assert doc["details"]["stages"]["baseline"]["status"] == "ran"
    assert doc["details"]["baseline"]["loss"] > 0
    tests = {t["name"]: t for t in doc["tests"]}
    assert tests["e2e.loss-decreased"]["passed"], tests["e2e.loss-decreased"]["reason"]
    assert tests["e2e.training-completed"]["passed"]


def test_out_of_memory_past_every_back_off_is_a_failed_test_in_a_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No evaluation fits at all: the baseline and the training's evaluations fail, and the run
    # still writes its report, the failures named in the tests that needed them.
    _memory_limit(monkeypatch, rows=0)
    _result, doc = _run(tmp_path)
    assert doc["details"]["stages"]["baseline"]["status"] == "failed"
    assert "OutOfMemoryError" in doc["details"]["stages"]["baseline"]["reason"]
    tests = {t["name"]: t for t in doc["tests"]}
    assert not tests["e2e.loss-decreased"]["passed"]
    assert "not measured" in tests["e2e.loss-decreased"]["reason"]
    assert not tests["e2e.training-completed"]["passed"]
    assert doc["decision"] == "NO_GO"


# Four steps reach a held-out accuracy of a few percent: the target is 0 unless a case sets it.
SHORT = {"epochs": 1, "stepsPerEpoch": 4, "evalBatches": 1, "targetAccuracy": 0.0}


def test_out_of_memory_in_the_optimizer_step_fails_the_oom_gate_and_the_run_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The third optimizer step of the run (its training's: nothing steps before) cannot allocate.
    step = torch.optim.AdamW.step
    calls: list[int] = []

    def limited(self: torch.optim.AdamW, *args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("injected: CUDA out of memory. Tried to allocate 2.00 GiB")
        return step(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.optim.AdamW, "step", limited)
    _result, doc = _run(tmp_path)
    assert doc["safety"]["failedGate"] == "oom" and doc["safety"]["trips"]["oom"] == 1
    tests = {t["name"]: t for t in doc["tests"]}
    gates = tests["safety.run-gates"]
    assert not gates["passed"] and "out of memory in the optimizer step at step 2" in gates["reason"]
    assert not tests["stability.no-out-of-memory-backoff"]["passed"]
    assert doc["decision"] == "NO_GO" and "safety.run-gates" in doc["decisionReason"]


def _no_memory_for_kv_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    """No KV cache fits the device: every module that makes one gets an out-of-memory error."""
    import importlib

    def none_fits(cfg: object, batch: int, max_len: int, *args: object, **kwargs: object) -> object:
        raise torch.OutOfMemoryError(f"injected: no room for a cache of {batch} x {max_len}")

    for name in ("", ".cache", ".generate", ".sweep"):
        monkeypatch.setattr(importlib.import_module(f"optrun.runtime.kvcache{name}"), "make_cache", none_fits)


def test_out_of_memory_in_the_kv_cache_stage_and_the_speedups_is_a_failed_test_in_a_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_memory_for_kv_caches(monkeypatch)
    spec = small_spec(
        training=SHORT,
        optimizations={"kvCache": {"enabled": True, "batchSizes": [1, 2], "contextLengths": [32]}},
        acceptance={"repeats": 2},
    )
    result = orchestrator.execute(spec, RunOptions(output_dir=tmp_path))
    assert result is not None
    doc = json.loads((tmp_path / "report.json").read_text())
    stages = doc["details"]["stages"]
    assert stages["kvcache"]["status"] == stages["speedups"]["status"] == "failed"
    assert "OutOfMemoryError" in stages["kvcache"]["reason"]
    tests = {t["name"]: t for t in doc["tests"]}
    for name in ("kvcache.parity", "speedup.kvcache"):
        assert not tests[name]["passed"] and "OutOfMemoryError" in tests[name]["reason"], tests[name]
    assert doc["decision"] == "NO_GO" and "kvcache.parity" in doc["decisionReason"]


# -- runs made to break -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sections", "failed", "also"),
    [
        pytest.param(
            # top-k keeping 1 % of each weight, with the gate off: the model is destroyed.
            {
                "optimizations": {
                    "kernels": {"enabled": False},
                    "compression": {
                        "enabled": True,
                        "codec": "topk",
                        "target": "weights",
                        "maxReconstructionError": 1.0,
                    },
                }
            },
            "compression.weights.inference_parity",
            (),
            id="destroyed-compression",
        ),
        pytest.param(
            {"training": {**SHORT, "targetAccuracy": 0.99}},
            "e2e.target-accuracy",
            (),
            id="unreachable-target",
        ),
        pytest.param(
            {
                "faults": [{"type": "nan-loss", "atStep": 1, "persistent": True}],
                "safety": {"maxRecoveries": 2},
            },
            "safety.run-gates",
            # No step trained: no epoch completed, and /metrics never showed a step.
            ("e2e.training-completed", "infra.metrics-exported"),
            id="wrecked-training",
        ),
    ],
)
def test_a_run_made_to_break_is_not_go_and_names_the_test_that_failed(
    tmp_path: Path, sections: dict[str, object], failed: str, also: tuple[str, ...]
) -> None:
    spec = small_spec(**{"training": SHORT, "acceptance": {"repeats": 2}, **sections})
    result = orchestrator.execute(spec, RunOptions(output_dir=tmp_path))
    assert result is not None
    doc = json.loads((tmp_path / "report.json").read_text())
    tests = {t["name"]: t for t in doc["tests"]}
    assert result.decision.value != "GO", result.decision_reason
    assert doc["decision"] == result.decision.value
    assert not tests[failed]["passed"] and tests[failed]["critical"]
    assert failed in result.decision_reason, result.decision_reason
    critical = {name for name, t in tests.items() if t["critical"] and not t["passed"]}
    assert critical <= {failed, *also}, {name: tests[name]["reason"] for name in critical}
