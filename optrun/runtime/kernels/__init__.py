"""The kernel optimizer: detect what runs fastest per operation on this device, patch the model.

Stage entry point `run(ctx, model)`: the model's logits, loss and gradients on a held-out batch
are measured before and after patching (parity, in results["kernels"]["parity"]); between them
`optimize(ctx, model)`: selection (`select.py`) measures, for the layers the
model really has and the shapes the run really uses, Triton kernels (`ops/`), torch.compile and
eager; the patcher (`patcher.py`) swaps the layers accordingly. Results go to
`ctx.results["kernels"]`:

    {"mode": "auto", "device": "<device name>", "deviceClass": "cpu",
     "choices": {op: {"choice": "triton|compile|eager", "times": {candidate: seconds},
                      "skipped": {candidate: why}, "path": ..., "signature": ..., "cached": bool}},
     "swapped": {"counts": {op: {choice: n}}, "modules": {path: {...}}},
     "seconds": <time the stage took>}

and the same transform is registered as `ctx.transforms["kernels"]` for the speedup matrix.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import Tensor, nn

from optrun.runtime.context import RunContext
from optrun.runtime.kernels.parity import MODEL_TOLERANCE, compare, tolerance
from optrun.runtime.kernels.patcher import PatchReport, patch_model
from optrun.runtime.kernels.select import Selection, cache_file, select_kernels
from optrun.runtime.lm.base import autocast

log = logging.getLogger(__name__)

__all__ = ["optimize", "patch_model", "run", "select_kernels"]


def _sample_run(ctx: RunContext, model: nn.Module) -> Any:
    """One loss of `model` on a training-shaped batch, as the train stage runs it."""
    w = ctx.spec.workload
    gen = torch.Generator().manual_seed(ctx.spec.training.seed)
    x, y = ctx.corpus.batch("train", w.sequence_length, w.batch_size, gen)
    x, y = x.to(ctx.device), y.to(ctx.device)

    def run() -> object:
        with autocast(ctx.device, ctx.dtype):
            return model.loss(x, y)

    return run


def outputs(
    ctx: RunContext, model: nn.Module, x: Tensor, y: Tensor
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Logits, loss and every parameter's gradient of `model` on one held-out batch (the model's
    own .grad is left as it was)."""
    saved = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with autocast(ctx.device, ctx.dtype):
        logits = model(x)
        loss = model.loss(x, y)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        p.grad = saved[n]
    return logits.detach(), loss.detach(), grads


def parity(
    ctx: RunContext,
    before: tuple[Tensor, Tensor, dict[str, Tensor]],
    after: tuple[Tensor, Tensor, dict[str, Tensor]],
) -> dict[str, Any]:
    """Does the patched model compute what the unpatched one did, within MODEL_TOLERANCE for the
    run's precision? The first place they differ, and the worst relative difference."""
    tol = tolerance(ctx.dtype, MODEL_TOLERANCE)
    (l0, s0, g0), (l1, s1, g1) = before, after
    mismatch = compare(l1, l0, tol, "logits") or compare(s1, s0, tol, "loss")
    if mismatch is None and set(g0) != set(g1):
        return {"passed": False, "reason": f"gradients for different parameters: {sorted(set(g0) ^ set(g1))}"}
    for name in g0:
        mismatch = mismatch or compare(g1[name], g0[name], tol, f"grad {name}")
    worst = max(
        float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))
        for a, b in [(l1, l0), *((g1[n], g0[n]) for n in g0)]
    )
    return {
        "passed": mismatch is None,
        "worstRelativeDifference": round(worst, 10),
        "rtol": tol.rtol,
        "atol": tol.atol,
        "gradients": len(g0),
        "tokens": int(l0.shape[0] * l0.shape[1]),
        "reason": str(mismatch) if mismatch is not None else "",
    }


def run(ctx: RunContext, model: nn.Module) -> nn.Module:
    """The kernels stage: measure the unpatched model on a held-out batch, select and patch,
    measure again; parity goes to ctx.results["kernels"]["parity"]."""
    w = ctx.spec.workload
    x, y = ctx.corpus.batch(
        "val",
        w.sequence_length,
        min(w.batch_size, 4),
        torch.Generator().manual_seed(ctx.spec.training.seed + 1),
    )
    x, y = x.to(ctx.device), y.to(ctx.device)
    before = outputs(ctx, model, x, y)
    model = optimize(ctx, model)
    ctx.results["kernels"]["parity"] = parity(ctx, before, outputs(ctx, model, x, y))
    return model


def optimize(ctx: RunContext, model: nn.Module) -> nn.Module:
    """Select and apply kernels to `model` (in place; also returned), honouring
    spec.optimizations.kernels.mode; fills ctx.results["kernels"] and ctx.transforms["kernels"]."""
    started = time.monotonic()
    mode = ctx.spec.optimizations.kernels.mode
    autocast_dtype = ctx.dtype if ctx.dtype != torch.float32 else None
    selections = select_kernels(
        model,
        _sample_run(ctx, model),
        device=ctx.device,
        device_name=ctx.hardware.name,
        mode=mode,
        autocast_dtype=autocast_dtype,
        cache_path=cache_file(),
        repeats=max(3, ctx.spec.acceptance.repeats),
    )
    choices = {op: s.choice for op, s in selections.items()}
    report = patch_model(model, choices)

    def transform(m: nn.Module) -> nn.Module:
        patch_model(m, choices)
        return m

    ctx.transforms["kernels"] = transform
    ctx.results["kernels"] = summary(mode, ctx, selections, report, time.monotonic() - started)
    _export(ctx, selections)
    return model


def summary(
    mode: str, ctx: RunContext, selections: dict[str, Selection], report: PatchReport, seconds: float
) -> dict[str, Any]:
    return {
        "mode": mode,
        "device": ctx.hardware.name,
        "deviceClass": ctx.hardware.device_class,
        "choices": {
            op: {k: v for k, v in s.to_dict().items() if k not in ("op", "mode")}
            for op, s in selections.items()
        },
        "swapped": report.to_dict(),
        "seconds": round(seconds, 3),
    }


def _export(ctx: RunContext, selections: dict[str, Selection]) -> None:
    metrics = ctx.results.get("metrics")
    if metrics is None:
        return
    metrics.kernel_choice.info({op: s.choice for op, s in selections.items()})
    metrics.record(
        "kernels",
        choices={op: s.choice for op, s in selections.items()},
        times={op: s.times for op, s in selections.items()},
        skipped={op: s.skipped for op, s in selections.items()},
    )
