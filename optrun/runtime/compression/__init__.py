"""Tensor compression under a reconstruction-error gate: weights for inference, gradients for DDP.

Stage entry point `apply(ctx, model)`, for `spec.optimizations.compression`:

- target ``weights``: every nn.Linear of a copy of `model` (the lineage's trained model) goes
  through the gate and, within the bound, becomes a weight-only `QuantizedLinear`
  (quantized_linear.py); the copy is returned: it is the model every later stage (the KV-cache
  sweep, the artifact, acceptance) uses. The same transform is registered as
  ``ctx.transforms["compression"]`` for the speedup matrix.
- target ``gradients``: in a distributed run the codec's comm hook (ddp_hooks.py) runs in the
  training itself, and its bytes and gate are read from there (`from_training`). In a
  one-process run, a 2-process gloo data-parallel run (ddp_run.py) trains the model twice from
  the same weights on the same batches, with plain allreduce and with the hook, and records
  bytes per step, step times and losses (`gradient_comparison`).
- ``both``: both.

It fills ``ctx.results["compression"]``::

    {"codec": "int8", "target": "weights", "maxReconstructionError": 0.02,
     "gate": {"trips": n, "tensors": m, "failed": bool},   # safety trips (kept tensors, no recovery)
     "weights": {GateReport.to_dict() (per-tensor error, SQNR, ratio), "memory": {...},
                 "parity": {perplexities, perplexityRise, greedyAgreement}},
     "gradients": {"hooks": {"allreduce": {...}, "<codec>": {...}}, "bytesRatio": x,
                   "stepTimeRatio": x, "baselineLoss": l, "compressedLoss": l, "lossDifference": d,
                   "gate": {"trips": n, "tensors": m, "failed": bool}}}
"""

from __future__ import annotations

import logging
import time
from typing import Any

from torch import nn

from optrun.api.v1alpha1 import Compression
from optrun.runtime.compression import parity
from optrun.runtime.compression.codecs import Codec, get_codec
from optrun.runtime.compression.quantized_linear import model_weight_bytes, quantize_model
from optrun.runtime.context import RunContext

log = logging.getLogger(__name__)

__all__ = ["apply", "codec_for", "gradient_comparison", "quantize_model", "weight_transform"]

# The DDP comparison runs on the CPU whatever the run's device: its point is the traffic, and
# bounded batches keep it to seconds for tiny-lm.
DDP_MAX_BATCH = 8
DDP_MAX_SEQ = 64


def codec_for(cfg: Compression) -> Codec:
    return get_codec(cfg.codec, group_size=cfg.group_size, rank=cfg.rank, topk_ratio=cfg.topk_ratio)


def weight_transform(cfg: Compression) -> Any:
    """model -> weight-quantized copy, as the speedup matrix wants it."""
    codec = codec_for(cfg)

    def transform(model: nn.Module) -> nn.Module:
        return quantize_model(model, codec, cfg.max_reconstruction_error)[0]

    return transform


def apply(ctx: RunContext, model: nn.Module) -> nn.Module:
    """Run the compression stage; returns the weight-quantized copy (target weights/both) or `model`."""
    cfg = ctx.spec.optimizations.compression
    out: dict[str, Any] = {
        "codec": cfg.codec,
        "target": cfg.target,
        "maxReconstructionError": cfg.max_reconstruction_error,
        **{k: v for k, v in codec_for(cfg).describe().items() if k != "codec"},
    }
    ctx.results["compression"] = out
    gates: list[dict[str, Any]] = []
    result = model
    if cfg.target in ("weights", "both"):
        started = time.monotonic()
        qmodel, report = quantize_model(model, codec_for(cfg), cfg.max_reconstruction_error)
        weights = report.to_dict()
        weights["memory"] = {
            "floatBytes": model_weight_bytes(model),
            "quantizedBytes": model_weight_bytes(qmodel),
        }
        w = ctx.spec.workload
        weights["parity"] = parity.compare(
            model,
            qmodel,
            ctx.corpus,
            ctx.device,
            seq_len=min(w.sequence_length, 128),
            batch_size=min(w.batch_size, 8),
        )
        weights["seconds"] = time.monotonic() - started
        out["weights"] = weights
        ctx.transforms["compression"] = weight_transform(cfg)
        gates.append(report.summary())
        out["gate"] = _merge(gates)
        result = qmodel
    if cfg.target in ("gradients", "both"):
        measured = (ctx.results.get("train") or {}).get("gradientCompression")
        out["gradients"] = from_training(ctx, measured) if measured else gradient_comparison(ctx, cfg)
        gates.append(out["gradients"]["gate"])
    out["gate"] = _merge(gates)
    log.info("compression: %s", {k: v for k, v in out.items() if k in ("codec", "target", "gate")})
    return result


def from_training(ctx: RunContext, stats: dict[str, Any]) -> dict[str, Any]:
    """What the codec's comm hook did in the run's own distributed training: bytes per step
    against the dense gradients it replaced, its gate, and where training ended against the
    model as given (with no uncompressed twin run, that is what says compressed training learned)."""
    train = ctx.results.get("train") or {}
    base = (ctx.results.get("baseline") or {}).get("loss")
    ranks = train.get("ranks") or []
    prints = {r.get("fingerprint") for r in ranks if r.get("fingerprint")}
    checks = stats["gate"]["checks"]
    return {
        "source": "training",
        "worldSize": (ctx.results.get("distributed") or {}).get("worldSize"),
        "steps": stats["steps"],
        "bytesPerStep": stats["bytesPerStep"],
        "baselineBytesPerStep": stats["denseBytesPerStep"],
        "bytesRatio": stats["denseBytesPerStep"] / stats["bytesPerStep"] if stats["bytesPerStep"] else None,
        "baselineLoss": base,
        "compressedLoss": train.get("final_loss"),
        "ranksAgree": len(prints) <= 1,
        "meanError": stats.get("meanError"),
        "maxError": stats.get("maxError"),
        "gate": {
            "trips": stats["gate"]["trips"],
            "tensors": checks,
            "failed": checks > 0 and stats["gate"]["trips"] == checks,
        },
    }


def gradient_comparison(ctx: RunContext, cfg: Compression) -> dict[str, Any]:
    """The 2-process gloo run: plain allreduce against the codec's hook, same weights and batches."""
    # Imported here: each rank runs `python -m ...ddp_run`, and a package that imported the module
    # itself would have it loaded twice in every rank (runpy warns about exactly that).
    from optrun.runtime.compression.ddp_run import DDPJob, compare

    w = ctx.spec.workload
    job = DDPJob(
        hooks=["allreduce", cfg.codec],
        steps=cfg.gradient_steps,
        batch_size=min(w.batch_size, DDP_MAX_BATCH),
        seq_len=min(w.sequence_length, DDP_MAX_SEQ),
        learning_rate=ctx.spec.training.learning_rate,
        seed=ctx.spec.training.seed,
        max_error=cfg.max_reconstruction_error,
        group_size=cfg.group_size,
        rank=cfg.rank,
        topk_ratio=cfg.topk_ratio,
        world_size=2,
        timeout_s=300.0,
    )
    started = time.monotonic()
    hooks = compare(job, model=ctx.model_factory())
    base, comp = hooks["allreduce"], hooks[cfg.codec]
    g = comp["gate"]
    return {
        "worldSize": job.world_size,
        "steps": job.steps,
        "hooks": hooks,
        "bytesPerStep": comp["bytesPerStep"],
        "baselineBytesPerStep": base["bytesPerStep"],
        "bytesRatio": base["bytesPerStep"] / comp["bytesPerStep"] if comp["bytesPerStep"] else None,
        "stepTimeRatio": base["stepSeconds"] / comp["stepSeconds"] if comp["stepSeconds"] else None,
        "baselineLoss": base["evalLoss"],
        "compressedLoss": comp["evalLoss"],
        "lossDifference": abs(comp["evalLoss"] - base["evalLoss"]) / base["evalLoss"],
        "ranksAgree": bool(base["ranksAgree"] and comp["ranksAgree"]),
        "gate": {
            "trips": g["trips"],
            "tensors": g["checks"],
            "failed": g["checks"] > 0 and g["trips"] == g["checks"],
        },
        "seconds": time.monotonic() - started,
    }


def _merge(gates: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "trips": sum(g["trips"] for g in gates),
        "tensors": sum(g["tensors"] for g in gates),
        "failed": any(g["failed"] for g in gates),
    }
