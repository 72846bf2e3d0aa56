"""Acceptance tests of the kv-cache stage (registered in the shared SUITE).

They judge what `optrun.runtime.kvcache.run` measured (`ctx.results["kvcache"]`). The speedup
of decoding with the cache over recomputing the prefix (`kvcache`) and of every optimization
together (`all`) are judged by optrun.runtime.speedup, which builds its decoders from
`optrun.runtime.kvcache.cache.cache_factory`.
"""

from __future__ import annotations

from typing import Any

from optrun.api.result import Category, Expected
from optrun.api.v1alpha1 import OptimizationRunSpec
from optrun.runtime.acceptance import SUITE, Check, in_range
from optrun.runtime.context import RunContext

BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "fp8": 8}
# Scales (and block padding) may cost this share above a cache's nominal payload: the KIVI
# layout costs 2.3 % on the tiny-lm (see cache.py), and 5 % leaves room for smaller head dims
# while still failing a layout with fp32 per-(token, head) scales (12.5 % at head dim 32).
SCALE_OVERHEAD = 0.05
# Greedy token agreement with the full-precision cache that each cache dtype must keep on the
# trained model: at every step of the reference's greedy output, the share of steps where the
# cache_dtype decoder, fed the same tokens, picks the same next token (teacher-forced, see
# generate.token_agreement). Free-running agreement is reported beside it but not gated: one
# early near-tie flips the whole rest of a sequence (1/8 of the probe at once), so it measures
# where the first flip fell more than how faithful the cache is. 16-bit caches round keys and
# values at 2^-11 (fp16) or 2^-8 (bf16) relative, int8 absmax at 1/254 of a channel block's
# range, fp8 e4m3 at 2^-4 relative: the coarser the code, the more near-ties flip. Measured on
# the tiny-lm: >= 0.997 (fp16, bf16, int8) and >= 0.987 (fp8), trained or fresh.
AGREEMENT_MIN = {"fp16": 0.99, "bf16": 0.98, "int8": 0.98, "fp8": 0.95}
# Largest relative reconstruction error ||x - x'|| / ||x|| of keys and values: for the float
# codes, their unit roundoff (a bound on every element's relative error, hence on the norm);
# for int8, the compression stage's default gate (Compression.maxReconstructionError).
ERROR_MAX = {"fp16": 2.0**-11, "bf16": 2.0**-8, "fp8": 2.0**-4, "int8": 0.02}


def enabled(spec: OptimizationRunSpec) -> bool:
    return spec.optimizations.kv_cache.enabled


def quantizes(ctx: RunContext) -> bool:
    """Whether the run's cache stores keys and values coarser than the model computes them. A
    cache in the model's own dtype (the reference), or in fp32, holds them exactly: agreement
    with the reference would repeat kvcache.parity and the round trip would measure a copy, so
    such a run does not collect those tests. A stage that left no results collects them, and
    they fail with its error."""
    res = ctx.results.get("kvcache")
    reference = res.get("reference") if isinstance(res, dict) else None
    if reference is None:
        return True
    dtype = ctx.spec.optimizations.kv_cache.dtype
    return dtype not in (reference, "fp32")


def several_batches(spec: OptimizationRunSpec) -> bool:
    return enabled(spec) and len(set(spec.optimizations.kv_cache.batch_sizes)) >= 2


def _results(ctx: RunContext, part: str) -> Any:
    res = ctx.results.get("kvcache")
    if not isinstance(res, dict) or part not in res:
        error = res.get("error") if isinstance(res, dict) else None
        raise RuntimeError(f"the kvcache stage left no {part}" + (f": {error}" if error else ""))
    return res[part]


def _comparison(ctx: RunContext) -> tuple[str, str]:
    """(the spec's dtype, the wider dtype it is judged against): fp16 for 8-bit caches (the
    figure the literature quotes), else the full-precision reference."""
    dtype = ctx.spec.optimizations.kv_cache.dtype
    cap = _results(ctx, "capacity")
    wider = "fp16" if BITS[dtype] == 8 and "fp16" in cap else _results(ctx, "reference")
    return dtype, wider


@SUITE.test("kvcache.parity", Category.END_TO_END, critical=True, applies=enabled)
def parity(ctx: RunContext) -> Check:
    """Greedy decoding with the full-precision cache gives the tokens of decoding without one."""
    p = _results(ctx, "parity")
    return Check(
        p["match_rate"] == 1.0,
        measured=p["match_rate"],
        expected=Expected(equals=1.0),
        reason=f"{p['tokens']} greedy tokens with a {p['reference']} cache vs no cache: "
        f"{p['match_rate']:.2%} equal",
    )


def _layout(c: dict[str, Any], key: str) -> str:
    """The layout formula's figure beside a measured one, where the stage recorded it."""
    figure = c.get(f"layout_{key}")
    return f"{figure:g}" if figure is not None else "not recorded"


@SUITE.test("kvcache.memory-reduction", Category.END_TO_END, applies=enabled)
def memory_reduction(ctx: RunContext) -> Check:
    """The spec's cache, allocated on the device, takes at most its nominal share of the wider
    cache's bytes per token (the layout formula's figures reported beside, and the largest batch
    each fits in the memory budget: a cache's bytes are linear in the batch, so that batch is
    this ratio inverted, not a measurement of its own)."""
    dtype, wider = _comparison(ctx)
    cap = _results(ctx, "capacity")
    ratio = cap[dtype]["bytes_per_token"] / cap[wider]["bytes_per_token"]
    nominal = BITS[dtype] / BITS[wider]
    check = in_range(
        ratio,
        None,
        nominal * (1 + SCALE_OVERHEAD),
        what=f"{dtype} cache bytes per token allocated over {wider}'s (nominal {nominal:g}, scales included)",
        unit="x",
    )
    check.reason += (
        f" ({cap[dtype]['bytes_per_token']:g} vs {cap[wider]['bytes_per_token']:g} bytes per token allocated; "
        f"layout {_layout(cap[dtype], 'bytes_per_token')} vs {_layout(cap[wider], 'bytes_per_token')}; "
        f"in the memory budget at C={_results(ctx, 'capacity_context')}: {cap[dtype]['largest_batch']} vs "
        f"{cap[wider]['largest_batch']} sequences)"
    )
    return check


@SUITE.test("kvcache.token-agreement", Category.END_TO_END, applies=enabled, when=quantizes)
def token_agreement(ctx: RunContext) -> Check:
    """Greedy outputs with the spec's cache agree with the full-precision cache's."""
    dtype = ctx.spec.optimizations.kv_cache.dtype
    reference = _results(ctx, "reference")
    a = _results(ctx, "agreement")[dtype]
    check = in_range(
        a["teacher_forced"],
        AGREEMENT_MIN[dtype],
        None,
        what=f"greedy token agreement (teacher-forced), {dtype} vs {reference} cache",
    )
    check.reason += (
        f" (free-running {a['free_running']:.3f}, first difference at {a['prefix']:.0%} on average)"
    )
    return check


@SUITE.test("kvcache.reconstruction-error", Category.STABILITY, applies=enabled, when=quantizes)
def reconstruction_error(ctx: RunContext) -> Check:
    """Keys and values read back from the spec's cache are within the code's error bound."""
    dtype = ctx.spec.optimizations.kv_cache.dtype
    errors = _results(ctx, "reconstruction_error")
    if dtype not in errors:
        return Check(False, reason=f"the kvcache stage measured no reconstruction error for {dtype}")
    e = errors[dtype]
    worst = max(e["key"], e["value"])
    check = in_range(
        worst, None, ERROR_MAX[dtype], what=f"{dtype} relative reconstruction error (worst layer)"
    )
    check.reason += f" (keys {e['key']:.4g}, values {e['value']:.4g})"
    return check


@SUITE.test("kvcache.throughput-scaling", Category.TUNING, applies=several_batches)
def throughput_scaling(ctx: RunContext) -> Check:
    """Decode throughput grows with the batch: at least the square root of the batch growth
    (capped at 2x), the least a batched decoder should give over one sequence at a time."""
    dtype = ctx.spec.optimizations.kv_cache.dtype
    s = _results(ctx, "throughput_scaling").get(dtype)
    if s is None:
        why = [
            f"B={c['batch']} C={c['context']}: {c['reason']}"
            for c in _results(ctx, "skipped")
            if c.get("dtype") == dtype and "batch" in c
        ]
        return Check(
            False,
            reason=f"{dtype} decode throughput was measured at fewer than two batch sizes"
            + (f" ({'; '.join(why[:3])})" if why else ""),
        )
    growth = s["batch_high"] / s["batch_low"]
    return in_range(
        s["ratio"],
        min(2.0, growth**0.5),
        None,
        unit="x",
        what=f"{dtype} decode tokens/s at B={s['batch_high']} over B={s['batch_low']} (C={s['context']})",
    )
