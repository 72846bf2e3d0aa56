"""Every acceptance test can fail: for each registered test, a broken run or a bad measurement
that it must fail, with a reason that names what it measured.

FAILING_CASES maps each test's name to a builder of a run context (real objects: the tiny
model, the pydoc corpus, a detected CPU, a Metrics registry; a stage's results fabricated where
the test judges what a stage recorded). A new test without an entry fails
`test_every_registered_test_has_a_failing_case`, so CI refuses a test that cannot fail.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from optrun.runtime.acceptance import SUITE
from optrun.runtime.compression.quantized_linear import quantize_model
from optrun.runtime.context import RunContext
from optrun.runtime.kernels.patcher import patch_model
from optrun.runtime.lm import fingerprint
from optrun.runtime.metrics import Metrics
from optrun.runtime.orchestrator import endpoint_url, load_suite
from optrun.runtime.speedup import PARTS, SPEEDUP_KEYS
from tests.unit.runtime.runtime_support import run_context, small_spec

load_suite()

Builder = Callable[[Path], RunContext]


def _ctx(tmp: Path, **sections: Any) -> RunContext:
    ctx = run_context(small_spec(**sections), tmp)
    ctx.results["metrics"] = Metrics()
    return ctx


def _with(results: dict[str, Any], **sections: Any) -> Builder:
    """A context whose stages recorded `results` (deep-copied per use)."""

    def build(tmp: Path) -> RunContext:
        ctx = _ctx(tmp, **sections)
        ctx.results.update(copy.deepcopy(results))
        return ctx

    return build


def _trained(ctx: RunContext) -> RunContext:
    ctx.trained = ctx.model = ctx.model_factory()
    return ctx


# -- infrastructure ---------------------------------------------------------------------------------


def hardware_misdetected(tmp: Path) -> RunContext:
    """Detection could not read the host's memory (its fallback is 0 bytes): the KV-cache budget,
    a quarter of it, would be nothing."""
    ctx = _ctx(tmp)
    ctx.hardware = ctx.hardware.model_copy(update={"memory_bytes": 0})
    return ctx


def precision_unsupported(tmp: Path) -> RunContext:
    ctx = _ctx(tmp, workload={"precision": "bf16"})
    ctx.hardware = ctx.hardware.model_copy(update={"dtypes": {**ctx.hardware.dtypes, "bf16": False}})
    return ctx


def training_on_a_copy(tmp: Path) -> RunContext:
    """The train stage took 6 optimizer steps on a copy and handed on the model it received."""
    ctx = _trained(_ctx(tmp))
    assert ctx.model is not None
    same = fingerprint(ctx.model)
    ctx.results["lineage"] = [
        {"stage": "baseline", "received": same, "handedOn": same},
        {"stage": "train", "received": same, "handedOn": same},
    ]
    ctx.results["train"] = {"steps": 6, "losses": [[step, 3.0 - 0.1 * step] for step in range(6)]}
    return ctx


def metrics_never_moved(tmp: Path) -> RunContext:
    """A registry nothing was recorded into, served on a live endpoint."""
    ctx = _ctx(tmp)
    port = ctx.results["metrics"].serve(0, "127.0.0.1")
    ctx.results["metrics_url"] = f"http://127.0.0.1:{port}/metrics"
    return ctx


# -- safety -----------------------------------------------------------------------------------------

NO_RECOVERY = {"maxRecoveries": 0}


def _nondeterministic(ctx: RunContext) -> RunContext:
    """A model factory that ignores the seed: every call draws new weights from the global RNG."""
    from optrun.runtime.model import build_model

    ctx.model_factory = lambda: build_model(ctx.spec.workload.model)
    return ctx


def gradient_cut(tmp: Path) -> RunContext:
    """A dead final norm: no gradient reaches the layers below it."""
    ctx = _trained(_ctx(tmp))
    assert ctx.trained is not None
    with torch.no_grad():
        ctx.trained.norm.weight.zero_()
    return ctx


class _QuadraticLoss(torch.nn.Module):
    """The tiny model whose loss repeats the whole batch once per row: cost grows with the
    square of the batch, so tokens per second fall as the batch grows."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return sum((self.inner.loss(x, y) for _ in range(x.shape[0])), torch.zeros(()))


def batch_slower(tmp: Path) -> RunContext:
    ctx = _ctx(tmp, workload={"batchSize": 8})
    factory = ctx.model_factory
    ctx.model_factory = lambda: _QuadraticLoss(factory())  # type: ignore[assignment,return-value]
    return ctx


# -- kernels ----------------------------------------------------------------------------------------


KERNELS = {"kernels": {"enabled": True}}


def kernels_lost(tmp: Path) -> RunContext:
    """Selection chose compiled norms and the patcher compiled them, but the judged model is a
    fresh copy that runs them eager (a rebuild that forgot ctx.transforms)."""
    ctx = _ctx(tmp, optimizations={"kernels": {"enabled": True, "mode": "compile"}})
    report = patch_model(ctx.model_factory(), {"rms_norm": "compile"})
    ctx.results["kernels"] = {
        "mode": "compile",
        "device": ctx.hardware.name,
        "choices": {op: {"choice": next(iter(c))} for op, c in report.counts().items()},
        "swapped": report.to_dict(),
    }
    ctx.model = ctx.model_factory()
    return ctx


def kernels_break_the_model(tmp: Path) -> RunContext:
    """A "kernel" transform that changes the maths (scales the head)."""
    ctx = _ctx(tmp, optimizations=KERNELS)

    def broken(m: torch.nn.Module) -> torch.nn.Module:
        with torch.no_grad():
            m.output.weight.mul_(10.0)
        return m

    ctx.transforms["kernels"] = broken
    return ctx


# -- compression ------------------------------------------------------------------------------------

INT8 = {"compression": {"enabled": True, "codec": "int8", "target": "weights"}}


def quantized_past_the_bound(tmp: Path) -> RunContext:
    """The judged model's layers quantized to int4 with the gate off (a bound of 1.0), in a run
    whose bound is 0.001: its logits move about 2 % (the tiny model), far past 0.001."""
    opt = {
        "compression": {
            "enabled": True,
            "codec": "int4",
            "target": "weights",
            "maxReconstructionError": 0.001,
        }
    }
    ctx = _trained(_ctx(tmp, optimizations=opt))
    assert ctx.trained is not None
    ctx.model, _report = quantize_model(ctx.trained, "int4", max_error=1.0)
    return ctx


def _gradients(**over: Any) -> dict[str, Any]:
    g = {
        "source": "comparison",
        "steps": 4,
        "bytesRatio": 1.0,
        "baselineLoss": 3.0,
        "compressedLoss": 4.5,
        "lossDifference": 0.5,
        "ranksAgree": True,
    }
    return {"compression": {"gradients": {**g, **over}}}


GRADIENTS = {"compression": {"enabled": True, "codec": "int8", "target": "gradients"}}

# -- kv cache ---------------------------------------------------------------------------------------


def _kv(dtype: str = "int8", **results: Any) -> Builder:
    same = {"bytes_per_token": 1024.0, "largest_batch": 100, "layout_bytes_per_token": 288.0}
    base = {
        "reference": "fp32",
        "capacity": {"fp32": dict(same), "fp16": dict(same), "int8": dict(same)},
        "capacity_context": 128,
    }
    return _with(
        {"kvcache": {**base, **results}}, optimizations={"kvCache": {"enabled": True, "dtype": dtype}}
    )


def _rlvr(**over: Any) -> Builder:
    r = {
        "improvement": 0.0,
        "min_improvement": 0.05,
        "pre_accuracy": 0.3,
        "post_accuracy": 0.3,
        "eval_problems": 64,
        "task": "addition",
        "warmup_steps": 10,
        "kl_max": 50.0,
        "kl_final": 40.0,
        "post_format_rate": 0.2,
        "curve": [{"step": 1, "loss": float("nan"), "kl": 0.1}],
        "heldout_lm": {
            "before": {"loss": 2.0},
            "after": {"loss": 4.0},
            "rise": 1.0,
            "replayCoefficient": 0.0,
        },
    }
    return _with({"rlvr": {**r, **over}}, rlvr={"enabled": True, "steps": 4})


# The optimizations each speedup key times (the spec's sections that enable them).
SPEEDUP_PARTS = {
    "kernels": KERNELS,
    "compression": INT8,
    "kvcache": {"kvCache": {"enabled": True}},
}


def _speedup(key: str) -> Builder:
    optimizations: dict[str, Any] = {}
    for part in PARTS[key]:
        optimizations.update(SPEEDUP_PARTS[part])
    return _with({"speedup_matrix": {"ratios": {key: [0.01, 0.011, 0.012]}}}, optimizations=optimizations)


FAILING_CASES: dict[str, Builder] = {
    "infra.hardware-detected": hardware_misdetected,
    "infra.precision-supported": precision_unsupported,
    "infra.checkpoint-restores": _ctx,  # a run that wrote no checkpoint
    "infra.lineage-unbroken": training_on_a_copy,
    "infra.artifact-reloads": _with(
        {
            "artifact": {
                "heldOutLoss": 2.0,
                "reloadedHeldOutLoss": 2.5,
                "path": "m",
                "format": "st",
                "sizeBytes": 1,
            }
        }
    ),
    "infra.metrics-exported": metrics_never_moved,
    "safety.run-gates": _with(
        {"train": {"gate_failed": "nan_loss", "gate_message": "3 recoveries", "recoveries": 3}}
    ),
    "safety.nan-loss-caught-and-recovered": lambda tmp: _ctx(tmp, safety=NO_RECOVERY),
    "safety.exploding-gradient-caught-and-recovered": lambda tmp: _ctx(tmp, safety=NO_RECOVERY),
    # Skipping a batch forever is no failure: the persistent fault is skipped, never failed.
    "safety.persistent-fault-fails-the-gate": lambda tmp: _ctx(tmp, safety={"maxRecoveries": 100}),
    "safety.no-hang": _with({"hangs": [{"gate": "hang", "idle_seconds": 312.0}]}),
    "stability.no-out-of-memory-backoff": _with({"train": {"oom_backoffs": 2}}),
    "safety.vanishing-gradient-caught": lambda tmp: _ctx(
        tmp, safety={"gradientFlow": {"minNorm": 0.0, "maxNorm": 1.0e6}}
    ),
    "e2e.training-completed": _with({"train": {"epochs": 1}}),
    "e2e.target-accuracy": _with({"train": {"final_accuracy": 0.01}}, training={"targetAccuracy": 0.5}),
    "e2e.loss-decreased": _with({"baseline": {"loss": 3.0}, "train": {"final_loss": 3.2}}),
    "stability.weights-finite": lambda tmp: _with_nan_weights(_trained(_ctx(tmp))),
    "stability.step-time-steady": _with({"train": {"step_seconds": [0.01] * 8 + [0.5, 0.6, 0.7]}}),
    "tuning.convergence-smoothness": _with({"train": {"evals": [{"loss": 2.0}, {"loss": 3.0}]}}),
    "tuning.fixed-seed-reproducibility": lambda tmp: _nondeterministic(_ctx(tmp)),
    "tuning.gradient-flow": gradient_cut,
    "tuning.batch-efficiency": batch_slower,
    "kernels.detection": kernels_lost,
    "kernels.parity": _with(
        {
            "kernels": {
                "parity": {
                    "passed": False,
                    "rtol": 1e-5,
                    "worstRelativeDifference": 0.3,
                    "reason": "logits differ by 30% from the unpatched model's",
                }
            }
        },
        optimizations=KERNELS,
    ),
    "kernels.training-loss": kernels_break_the_model,
    **{f"speedup.{key}": _speedup(key) for key in SPEEDUP_KEYS},
    "memory.kvcache": lambda tmp: _ctx(
        tmp,
        optimizations={"kvCache": {"enabled": True, "dtype": "fp32"}},
        acceptance={"objective": "memory"},
    ),
    "memory.weights": _with(
        {"compression": {"weights": {"memory": {"floatBytes": 1000, "quantizedBytes": 1000}}}},
        optimizations=INT8,
        acceptance={"objective": "memory"},
    ),
    "compression.gate": _with(
        {"compression": {"gate": {"trips": 5, "tensors": 5, "failed": True}}}, optimizations=INT8
    ),
    "compression.weights.error_bound": quantized_past_the_bound,
    "compression.weights.ratio": _with(
        {"compression": {"weights": {"compressedRatio": 1.0}}}, optimizations=INT8
    ),
    "compression.weights.inference_parity": _with(
        {"compression": {"weights": {"parity": {"perplexityRise": 0.8, "greedyAgreement": 0.4}}}},
        optimizations=INT8,
    ),
    "compression.gradients.bytes_ratio": _with(_gradients(), optimizations=GRADIENTS),
    "compression.gradients.loss_parity": _with(_gradients(), optimizations=GRADIENTS),
    "kvcache.parity": _kv(parity={"match_rate": 0.9, "tokens": 768, "reference": "fp32"}),
    "kvcache.memory-reduction": _kv(),
    "kvcache.token-agreement": _kv(
        agreement={"int8": {"teacher_forced": 0.9, "free_running": 0.6, "prefix": 0.3}}
    ),
    "kvcache.reconstruction-error": _kv(reconstruction_error={"int8": {"key": 0.08, "value": 0.01}}),
    "kvcache.throughput-scaling": _with(
        {
            "kvcache": {
                "throughput_scaling": {"int8": {"ratio": 0.9, "batch_low": 1, "batch_high": 8, "context": 48}}
            }
        },
        optimizations={"kvCache": {"enabled": True, "dtype": "int8", "batchSizes": [1, 8]}},
    ),
    "rlvr.reward-improvement": _rlvr(),
    "rlvr.kl-bounded": _rlvr(),
    "rlvr.format": _rlvr(),
    "rlvr.completed": _rlvr(),
    "rlvr.language-modelling-kept": _rlvr(),
}


def _with_nan_weights(ctx: RunContext) -> RunContext:
    assert ctx.trained is not None
    with torch.no_grad():
        next(ctx.trained.parameters())[0].fill_(float("nan"))
    return ctx


def test_every_registered_test_has_a_failing_case() -> None:
    assert set(FAILING_CASES) == set(SUITE.names())


@pytest.mark.parametrize("name", sorted(FAILING_CASES))
def test_the_test_fails_with_a_reason(name: str, tmp_path: Path) -> None:
    ctx = FAILING_CASES[name](tmp_path)
    try:
        # A case is a run that runs the test: one where the test is not collected proves nothing.
        assert SUITE.collects(name, ctx), f"{name}: the case's run does not run the test"
        check = SUITE.check(name, ctx)
    finally:
        ctx.results["metrics"].close()
    print(f"{name}: {check.reason}")
    assert check.passed is False, check.reason
    # Registry.check turns any exception into a failed check named "error: ...": a case that only
    # crashes the test proves nothing about what it measures.
    assert not check.reason.startswith("error:"), f"{name}: the case crashed the test: {check.reason}"
    assert len(check.reason) > 15, f"{name}: a reason a person understands, got {check.reason!r}"


def test_metrics_are_scraped_where_the_run_serves_them_not_on_loopback(tmp_path: Path) -> None:
    """A pod's runtime listens on its pod IP only (pods sharing one network namespace): the test
    scrapes that address, and passes once the figures moved (the case above shows it can fail)."""
    ctx = _ctx(tmp_path)
    metrics: Metrics = ctx.results["metrics"]
    metrics.train_step(epoch=0, step=3, loss=2.5, lr=1e-3, seconds=0.01, tokens=64)
    port = metrics.serve(0, "127.0.0.2")  # all of 127/8 is loopback on Linux; 127.0.0.1 is not bound
    ctx.results["metrics_url"] = endpoint_url("127.0.0.2", port)  # what the orchestrator records
    try:
        check = SUITE.check("infra.metrics-exported", ctx)
    finally:
        metrics.close()
    assert check.passed, check.reason
    assert "127.0.0.2" in check.reason and "step 3" in check.reason
    assert endpoint_url("0.0.0.0", 9090) == "http://127.0.0.1:9090/metrics"
    assert endpoint_url("fd00::5", 9090) == "http://[fd00::5]:9090/metrics"
