"""Acceptance tests of the compression stage (registered in the shared SUITE).

They read what `apply` measured (`ctx.results["compression"]`) and re-measure what depends on
the trained model (round trip, inference parity). The speedup ranges of `compression` and
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
from optrun.runtime.compression.codecs import Codec, reconstruction_error
from optrun.runtime.compression.quantized_linear import QuantizedLinear, linear_weights
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


@SUITE.test("compression.roundtrip", Category.CRITICAL_INFRASTRUCTURE, critical=True, applies=enabled)
def roundtrip(ctx: RunContext) -> Check:
    """Encode/decode of the model's linear weights keeps shape and dtype, stays finite, shrinks."""
    codec = codec_for(ctx.spec.optimizations.compression)
    problems, worst, n = [], 0.0, 0
    for name, linear in linear_weights(_model(ctx)):
        w = linear.weight.detach()
        n += 1
        try:
            y, p = codec.roundtrip(w)
        except ValueError as exc:  # the codec refuses the weight (non-finite values): name the layer
            problems.append(f"{name}: {exc}")
            continue
        if y.shape != w.shape or y.dtype != w.dtype:
            problems.append(f"{name}: {tuple(y.shape)} {y.dtype} from {tuple(w.shape)} {w.dtype}")
        elif not bool(torch.isfinite(y).all()):
            problems.append(f"{name}: non-finite values after decode")
        elif p.nbytes >= w.numel() * w.element_size() and codec.name != "lowrank":
            problems.append(
                f"{name}: payload {p.nbytes} B is not smaller than {w.numel() * w.element_size()} B"
            )
        worst = max(worst, reconstruction_error(w, y))
    reason = (
        "; ".join(problems[:3])
        or f"{n} weight tensors round-tripped with {codec.name}, worst error {worst:.3g}"
    )
    return Check(passed=not problems and n > 0, measured=n, reason=reason)


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


@SUITE.test("compression.weights.error_bound", Category.SAFETY, critical=True, applies=on_weights)
def error_bound(ctx: RunContext) -> Check:
    """Every quantized layer of the judged model, decoded, is within maxReconstructionError of
    the trained float weight it replaced (measured here on the models, not taken from the gate)."""
    if ctx.trained is None or ctx.model is None or ctx.model is ctx.trained:
        return Check(False, reason="no quantized model beside the trained one to compare")
    bound = ctx.spec.optimizations.compression.max_reconstruction_error
    floats = dict(linear_weights(ctx.trained))
    errors: dict[str, float] = {}
    for name, m in ctx.model.named_modules():
        if isinstance(m, QuantizedLinear):
            if name not in floats:
                return Check(
                    False, reason=f"{name} is quantized but the trained model has no such linear layer"
                )
            errors[name] = reconstruction_error(floats[name].weight, m.weight)
    if not errors:
        return Check(False, reason="the judged model holds no quantized layer")
    worst = max(errors, key=lambda n: errors[n])
    over = [n for n, e in errors.items() if not e <= bound]
    check = in_range(
        errors[worst],
        None,
        bound,
        what=f"largest relative error of a decoded weight against the trained one ({worst}, of {len(errors)})",
    )
    if over:
        check.passed = False
        check.reason += f"; over the bound: {', '.join(over[:3])}"
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
