"""The kernel optimizer: detect what runs fastest per operation on this device, patch the model.

Stage entry point `optimize(ctx, model)`: selection (`select.py`) measures, for the layers the
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

import contextlib
import logging
import time
from typing import Any

import torch
from torch import nn

from optrun.runtime.context import RunContext
from optrun.runtime.kernels.patcher import PatchReport, patch_model
from optrun.runtime.kernels.select import Selection, cache_file, select_kernels

log = logging.getLogger(__name__)

__all__ = ["optimize", "patch_model", "select_kernels"]


def _sample_run(ctx: RunContext, model: nn.Module) -> Any:
    """One forward of `model` on a training-shaped batch, as the train stage runs it."""
    w = ctx.spec.workload
    gen = torch.Generator().manual_seed(ctx.spec.training.seed)
    x, y = ctx.corpus.batch("train", w.sequence_length, w.batch_size, gen)
    x, y = x.to(ctx.device), y.to(ctx.device)
    dtype = ctx.dtype

    def run() -> object:
        amp = (
            torch.autocast(ctx.device.type, dtype=dtype)
            if dtype != torch.float32
            else contextlib.nullcontext()
        )
        with amp:
            return model.loss(x, y) if hasattr(model, "loss") else model(x)

    return run


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
