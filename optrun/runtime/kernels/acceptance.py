"""Acceptance tests of the kernel optimizer (names `kernels.*`; they apply when
spec.optimizations.kernels.enabled). The speedup range test is `speedup.kernels`, registered
with the other speedup keys in optrun.runtime.speedup.

- kernels.detection: selection recognised the model's operations, and every module the patcher
  swapped runs the chosen kernel in the model acceptance judges (looked up there, not taken
  from the stage's record).
- kernels.parity: the run's model, patched, computes the logits, loss and gradients it computed
  unpatched on a held-out batch, within `parity.MODEL_TOLERANCE` for the run's precision.
- kernels.training-loss: a short training run with the kernels ends at the same loss as the
  same run without them (same seed, same batches).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from optrun.api.result import Category, Expected
from optrun.api.v1alpha1 import OptimizationRunSpec
from optrun.runtime.acceptance import SUITE, Check
from optrun.runtime.context import RunContext
from optrun.runtime.metrics import Metrics

# Relative difference allowed between the final training losses with and without kernels, per
# compute dtype: fp32 runs agree to rounding amplified over a few steps; bf16 autocast runs
# round every matmul to 8 bits, and the two paths round differently.
TRAINING_LOSS_RTOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float16: 5e-3}
TRAINING_STEPS = 20


def kernels_enabled(spec: OptimizationRunSpec) -> bool:
    return spec.optimizations.kernels.enabled


def running(module: torch.nn.Module) -> str:
    """What a module of the model runs: a fused module's type (optrun's or Liger's kernels),
    "compile" (its forward swapped for the compiled one) or "eager"."""
    if getattr(module, "optrun_fused", False):
        return type(module).__name__
    return "compile" if "forward" in vars(module) else "eager"


@SUITE.test("kernels.detection", Category.CRITICAL_INFRASTRUCTURE, critical=True, applies=kernels_enabled)
def detection(ctx: RunContext) -> Check:
    """Selection recognised the model's operations, and the judged model runs what it chose:
    each module the patcher swapped is looked up in the model acceptance judges (after training,
    RLVR and compression), and what it runs is compared with the choice."""
    info = ctx.results.get("kernels")
    if not info:
        return Check(False, reason="kernel selection did not run (no results['kernels'])")
    choices = {op: c["choice"] for op, c in info.get("choices", {}).items()}
    if not choices:
        return Check(
            False, measured={}, reason="no operation of the model was recognised for kernel selection"
        )
    if ctx.model is None:
        return Check(False, measured=choices, reason="the run left no model to look at")
    patched = info.get("swapped", {}).get("modules", {})
    differ = []
    for path, entry in patched.items():
        want = entry["to"] if entry["choice"] in ("triton", "liger") else entry["choice"]
        try:
            got = running(ctx.model.get_submodule(path))
        except AttributeError:
            got = "nothing (no such module)"
        if got != want:
            named = f" ({want})" if want != entry["choice"] else ""
            differ.append(f"{path} runs {got}, selection chose {entry['choice']}{named}")
    how = "measured on the device" if info["mode"] == "auto" else f"forced by mode={info['mode']}"
    return Check(
        bool(patched) and not differ,
        measured={"choices": choices, "modules": len(patched), "differ": len(differ)},
        reason="; ".join(differ[:3]) + (f" (and {len(differ) - 3} more)" if len(differ) > 3 else "")
        if differ
        else f"{len(choices)} operations on {info['device']} ({how}): "
        + ", ".join(f"{op}={c}" for op, c in choices.items())
        + f"; all {len(patched)} patched modules of the judged model run their choice",
    )


@SUITE.test("kernels.parity", Category.END_TO_END, critical=True, applies=kernels_enabled)
def parity(ctx: RunContext) -> Check:
    """The patched model computes the logits, loss and gradients the unpatched model computed on
    a held-out batch, within `parity.MODEL_TOLERANCE` for the run's precision (measured by the
    kernels stage on the lineage's own model, before and after patching)."""
    p = (ctx.results.get("kernels") or {}).get("parity")
    if not p:
        return Check(False, reason="the kernel stage did not measure parity (it did not finish)")
    expected = Expected(max=p.get("rtol"))
    if not p["passed"]:
        return Check(False, measured=p.get("worstRelativeDifference"), expected=expected, reason=p["reason"])
    return Check(
        True,
        measured=p["worstRelativeDifference"],
        expected=expected,
        reason=f"logits ({p['tokens']} held-out tokens), loss and {p['gradients']} gradients within "
        f"{str(ctx.dtype).removeprefix('torch.')} tolerance (rtol {p['rtol']:g}, atol {p['atol']:g} of scale); "
        f"worst relative difference {p['worstRelativeDifference']:.2e}",
    )


def _short_run(ctx: RunContext, patched: bool, steps: int) -> float:
    from optrun.runtime.checks import scratch_spec
    from optrun.runtime.training.checkpoint import CheckpointStore
    from optrun.runtime.training.loop import Trainer

    spec = scratch_spec(ctx.spec, steps=steps)
    model = ctx.model_factory()
    if patched:
        model = ctx.transforms["kernels"](model)
    with tempfile.TemporaryDirectory(prefix="optrun-kernels-") as tmp:
        trainer = Trainer(spec, model, ctx.corpus, ctx.device, CheckpointStore(Path(tmp), keep=2), Metrics())
        trainer.fit()
    return float(trainer.losses[-1][1])


@SUITE.test("kernels.training-loss", Category.END_TO_END, applies=kernels_enabled)
def training_loss(ctx: RunContext) -> Check:
    return compare_training(ctx, TRAINING_STEPS)


def compare_training(ctx: RunContext, steps: int) -> Check:
    """Train `steps` steps from the same seed with and without the kernels; compare final losses."""
    if "kernels" not in ctx.transforms:
        return Check(False, reason="no kernels transform registered (the kernel stage did not finish)")
    base, fused = _short_run(ctx, False, steps), _short_run(ctx, True, steps)
    rtol = TRAINING_LOSS_RTOL[ctx.dtype]
    rel = abs(fused - base) / max(abs(base), 1e-12)
    return Check(
        rel <= rtol,
        measured=round(rel, 8),
        expected=Expected(max=rtol),
        reason=f"loss after {steps} steps: {fused:.6f} with kernels, {base:.6f} without "
        f"(relative difference {rel:.2e}, allowed {rtol:g})",
    )
