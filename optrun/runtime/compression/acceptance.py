"""Acceptance tests of the compression stage (registered in the shared SUITE).

They read what `apply` measured (`ctx.results["compression"]`) and measure the judged model
against the trained float one (`compression.weights.error_bound`: their held-out logits). The speedup ranges of `compression` and
`kernels+compression` are judged by optrun.runtime.speedup from `ctx.transforms["compression"]`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from optrun.api.result import Category, Expected
from optrun.api.v1alpha1 import OptimizationRunSpec
from optrun.runtime.acceptance import SUITE, Check, in_range
from optrun.runtime.compression import codec_for
from optrun.runtime.compression.codecs import Codec
from optrun.runtime.compression.quantized_linear import QuantizedLinear
from optrun.runtime.context import RunContext

# A measured ratio may fall short of the nominal one by the scales and padding it carries.
RATIO_SLACK = 0.85


def enabled(spec: OptimizationRunSpec) -> bool:
    return spec.optimizations.compression.enabled


def on_weights(spec: OptimizationRunSpec) -> bool:
    return enabled(spec) and spec.optimizations.compression.target in ("weights", "both")


def on_gradients(spec: OptimizationRunSpec) -> bool:
    return enabled(spec) and spec.optimizations.compression.target in ("gradients", "both")


def nominal_ratio(codec: Codec, element_bits: int) -> float:
    """Bytes ratio a codec reaches on large tensors, scales aside (what the floor is taken from)."""
    bits = codec.bits_per_element()
    if bits is not None:
        return element_bits / bits
    topk = getattr(codec, "topk_ratio", None)
    if topk is not None:  # each kept element costs its value and a 32-bit index
        return element_bits / (topk * (element_bits + 32))
    # Low rank: depends on the shapes; PowerSGD compresses a matrix only at >= 2x.
    return 2.0 / RATIO_SLACK


def _results(ctx: RunContext, part: str | None = None) -> dict[str, Any]:
    res = ctx.results.get("compression")
    if not isinstance(res, dict) or (part is not None and part not in res):
        error = res.get("error") if isinstance(res, dict) else None
        raise RuntimeError(
            f"the compression stage left no {part or 'results'}" + (f": {error}" if error else "")
        )
    return res if part is None else res[part]


def _model(ctx: RunContext) -> torch.nn.Module:
    """The float model compression started from (the trained model of the lineage)."""
    for m in (ctx.trained, ctx.model):
        if m is not None:
            return m
    return ctx.model_factory()


@SUITE.test("compression.gate", Category.SAFETY, critical=True, applies=enabled)
def gate(ctx: RunContext) -> Check:
    """The reconstruction-error gate did not trip on every tensor (the codec compressed something)."""
    g = _results(ctx, "gate")
    reason = (
        f"{g['trips']} of {g['tensors']} tensors exceeded the error bound and stayed in full precision"
        + (": the gate failed, nothing was compressed within the bound" if g["failed"] else "")
    )
    return Check(
        passed=not g["failed"], measured={"trips": g["trips"], "tensors": g["tensors"]}, reason=reason
    )


@torch.no_grad()
def _logits(
    model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device
) -> torch.Tensor:
    """The model's next-token logits on `batches` in float64, each row minus its mean (softmax
    ignores a shift, so only what changes the distribution is compared). Computed without
    autocast: what the weights do, not what a lower-precision matmul adds."""
    was_training = model.training
    model.eval()
    try:
        z = torch.cat([model(x.to(device)).double().flatten(0, -2) for x, _y in batches])
    finally:
        model.train(was_training)
    return z - z.mean(dim=-1, keepdim=True)


@SUITE.test("compression.weights.error_bound", Category.SAFETY, critical=True, applies=on_weights)
def error_bound(ctx: RunContext) -> Check:
    """The bound each weight was held to holds for what the model computes: the judged
    (quantized) model's next-token logits on the held-out batches are within
    maxReconstructionError (relative L2, ||z_q - z|| / ||z||) of the trained float model's.
    Measured here on both models; the gate only bounded each weight on its own, and the errors of
    many layers add up through the network."""
    if ctx.trained is None or ctx.model is None or ctx.model is ctx.trained:
        return Check(False, reason="no quantized model beside the trained one to compare")
    quantized = sum(isinstance(m, QuantizedLinear) for m in ctx.model.modules())
    if not quantized:
        return Check(False, reason="the judged model holds no quantized layer")
    bound = ctx.spec.optimizations.compression.max_reconstruction_error
    batches = ctx.eval_batches()
    z, zq = _logits(ctx.trained, batches, ctx.device), _logits(ctx.model, batches, ctx.device)
    error = float(torch.linalg.vector_norm(zq - z) / torch.linalg.vector_norm(z))
    worst = float((torch.linalg.vector_norm(zq - z, dim=-1) / torch.linalg.vector_norm(z, dim=-1)).max())
    check = in_range(
        error,
        None,
        bound,
        what=f"relative error of the quantized model's held-out logits ({quantized} quantized layers, "
        f"{z.shape[0]} positions) against the trained float model's",
    )
    check.measured = {"logitError": round(error, 8), "worstPosition": round(worst, 8)}
    check.reason += f" (worst position {worst:.3g}; maxReconstructionError)"
    return check


@SUITE.test("compression.weights.ratio", Category.END_TO_END, applies=on_weights)
def weights_ratio(ctx: RunContext) -> Check:
    """Compressed weights shrink by at least 85 % of the codec's nominal ratio."""
    w = _results(ctx, "weights")
    codec = codec_for(ctx.spec.optimizations.compression)
    bits = next(_model(ctx).parameters()).element_size() * 8
    floor = RATIO_SLACK * nominal_ratio(codec, bits)
    return in_range(
        w["compressedRatio"],
        floor,
        None,
        what=f"{codec.name} bytes ratio of the compressed weights",
        unit="x",
    )


@SUITE.test("compression.weights.inference_parity", Category.END_TO_END, critical=True, applies=on_weights)
def inference_parity(ctx: RunContext) -> Check:
    """The quantized model's held-out perplexity is within perplexityTolerance of the trained
    float model's (both measured by the compression stage on the same held-out batches)."""
    cfg = ctx.spec.optimizations.compression
    res = _results(ctx, "weights")["parity"]
    check = in_range(
        res["perplexityRise"],
        None,
        cfg.perplexity_tolerance,
        what="relative perplexity rise of the weight-quantized model",
    )
    check.measured = {k: round(v, 6) for k, v in res.items()}
    check.reason += f" (greedy agreement {res['greedyAgreement']:.0%})"
    return check


@SUITE.test("compression.gradients.bytes_ratio", Category.END_TO_END, applies=on_gradients)
def gradient_bytes(ctx: RunContext) -> Check:
    """The compressed hook sends fewer bytes per step than plain allreduce, near the codec's ratio."""
    g = _results(ctx, "gradients")
    codec = codec_for(ctx.spec.optimizations.compression)
    floor = RATIO_SLACK * nominal_ratio(codec, 32)  # DDP gradients are fp32 here
    ratio = g["bytesRatio"] if g["bytesRatio"] is not None else math.inf
    return in_range(ratio, floor, None, what=f"allreduce bytes per step over {codec.name}'s", unit="x")


@SUITE.test("compression.gradients.loss_parity", Category.END_TO_END, critical=True, applies=on_gradients)
def loss_parity(ctx: RunContext) -> Check:
    """After the same steps, the compressed run's held-out loss is within lossTolerance of allreduce's
    (one process: the 2-process comparison); in a distributed run, the training with compressed
    gradients ended below the model as given and every rank holds the same weights."""
    g = _results(ctx, "gradients")
    if g.get("source") == "training":
        base, got = g["baselineLoss"], g["compressedLoss"]
        ok = base is not None and got is not None and got < base and g["ranksAgree"]
        return Check(
            ok,
            measured={"baseline": base, "compressed": got},
            expected=Expected(max=base) if base is not None else None,
            reason=f"{g['worldSize']} ranks trained with {ctx.spec.optimizations.compression.codec} gradients: "
            f"held-out loss {got} against {base} for the model as given"
            + ("" if g["ranksAgree"] else "; the ranks ended with different weights"),
        )
    tol = ctx.spec.optimizations.compression.loss_tolerance
    check = in_range(
        g["lossDifference"],
        None,
        tol,
        what=f"relative held-out loss difference after {g['steps']} data-parallel steps",
    )
    check.measured = {
        "baseline": round(g["baselineLoss"], 6),
        "compressed": round(g["compressedLoss"], 6),
        "difference": round(g["lossDifference"], 6),
    }
    if not g["ranksAgree"]:
        check.passed = False
        check.reason += "; the ranks ended with different weights"
    return check
