"""KV-cache inference: preallocated dense and 8-bit caches, batched generation, the scaling sweep.

Stage entry point `run(ctx, model)` (after training, on the trained model) stores
`ctx.results["kvcache"]`:
  dtype, reference        the spec's cache dtype and the full-precision one (the model's dtype)
  rows                    the sweep table: one dict per (dtype, batch, context), see `sweep.py`
  capacity                per dtype at the longest context: bytes_per_token and largest_batch
                          measured by allocating a cache on the device (layout_bytes_per_token
                          and layout_largest_batch: the layout formula's, beside), and their
                          ratios to the reference and to fp16
  throughput_scaling      per dtype: decode tokens/s at the largest batch over the smallest
  parity                  greedy with the reference cache against no cache: match_rate (1.0 = equal)
  agreement               per dtype: greedy token agreement with the reference cache
                          (free_running, teacher_forced, prefix)
  reconstruction_error    per dtype (the reference's too): worst relative error of keys and values over the
                          layers, the model's own activations streamed token by token
  plot, skipped, memory_budget_bytes, seconds
`cache_factory(cfg, dtype, device)` gives the speedup matrix its `(batch, max_len) -> cache` builder.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from optrun.runtime.context import RunContext
from optrun.runtime.kvcache.cache import (
    CACHE_DTYPES,
    QUANT_DTYPES,
    DenseKVCache,
    QuantizedKVCache,
    bytes_per_token,
    cache_bytes,
    cache_factory,
    make_cache,
    reconstruction_error,
)
from optrun.runtime.kvcache.generate import Generation, generate, left_pad, model_cache_dtype, token_agreement
from optrun.runtime.kvcache.sweep import capacity, default_budget, plot, run_sweep, supported_dtypes

log = logging.getLogger(__name__)

__all__ = [
    "CACHE_DTYPES",
    "DenseKVCache",
    "Generation",
    "QuantizedKVCache",
    "bytes_per_token",
    "cache_bytes",
    "cache_factory",
    "evaluate_fidelity",
    "generate",
    "left_pad",
    "make_cache",
    "run",
]

# Fidelity probes: held-out prompts of this many rows and tokens, and tokens decoded after them.
PROBE_BATCH, PROBE_PROMPT, PROBE_NEW = 16, 48, 48
ERROR_CONTEXT = 256


def _windows(tokens: torch.Tensor, batch: int, length: int, stride: int = 997) -> torch.Tensor:
    """(batch, length) windows of held-out tokens, spaced `stride` apart (wrapping)."""
    n = len(tokens) - length
    return torch.stack([tokens[(i * stride) % n : (i * stride) % n + length] for i in range(batch)])


@torch.no_grad()
def evaluate_fidelity(
    model: nn.Module, prompt_tokens: torch.Tensor, dtypes: list[str], reference: str
) -> dict[str, Any]:
    """Parity (reference cache vs none), greedy agreement per dtype, and reconstruction error of
    the model's own keys and values per quantized dtype."""
    device = next(model.parameters()).device
    cfg = model.cfg
    prompt = _windows(prompt_tokens, PROBE_BATCH, PROBE_PROMPT).to(device)
    cached = generate(model, prompt, PROBE_NEW, cache_dtype=reference, eos_id=None)
    uncached = generate(model, prompt, PROBE_NEW, use_cache=False, eos_id=None)
    parity = {
        "match_rate": float((cached.completions == uncached.completions).float().mean()),
        "tokens": int(cached.completions.numel()),
        "reference": reference,
    }
    agreement = {d: token_agreement(model, prompt, PROBE_NEW, d, reference) for d in dtypes if d != reference}
    # The model's keys and values over a held-out context, captured by a reference cache.
    length = min(ERROR_CONTEXT, cfg.max_seq_len)
    context = _windows(prompt_tokens, 4, length, stride=1499).to(device)
    capture = make_cache(cfg, 4, length, reference, device)
    model.eval()
    model(context, capture, 0)
    errors: dict[str, dict[str, float]] = {}
    for d in dtypes:  # the reference too: its round trip must be exact, and is measured like the rest
        per_layer = [reconstruction_error(capture.k[i], capture.v[i], d) for i in range(cfg.n_layers)]
        errors[d] = {kind: max(e[kind] for e in per_layer) for kind in ("key", "value")}
    return {"parity": parity, "agreement": agreement, "reconstruction_error": errors}


def _scaling(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per dtype, at the shortest context: tokens/s at the largest batch over the smallest."""
    out = {}
    if not rows:
        return out
    context = min(r["context"] for r in rows)
    for d in dict.fromkeys(r["dtype"] for r in rows):
        cells = sorted(
            (r["batch"], r["tokens_per_second"]) for r in rows if r["dtype"] == d and r["context"] == context
        )
        if len(cells) < 2:  # the other batches did not fit (see skipped): no scaling to speak of
            continue
        (b_lo, t_lo), (b_hi, t_hi) = cells[0], cells[-1]
        out[d] = {"ratio": t_hi / t_lo, "batch_low": b_lo, "batch_high": b_hi, "context": context}
    return out


def run(ctx: RunContext, model: nn.Module) -> None:
    """The kv-cache stage: fidelity checks, the sweep, the plot; see the module doc."""
    started = time.monotonic()
    kv = ctx.spec.optimizations.kv_cache
    if model is None:  # the train stage did not leave a model: judge a fresh one
        model = ctx.model_factory()
    device = next(model.parameters()).device
    budget = kv.memory_budget_bytes or default_budget(device, ctx.hardware.memory_bytes)
    usable, unsupported = supported_dtypes(device)
    if kv.dtype not in usable:
        raise RuntimeError(f"kvCache.dtype {kv.dtype} is not usable here: {unsupported.get(kv.dtype)}")
    reference = model_cache_dtype(model)
    dtypes = [d for d in CACHE_DTYPES if d in usable]
    fidelity = evaluate_fidelity(model, ctx.corpus.val, dtypes, reference)
    sweep = run_sweep(
        model,
        batch_sizes=kv.batch_sizes,
        context_lengths=kv.context_lengths,
        dtypes=dtypes,
        memory_budget_bytes=budget,
        prompt_tokens=ctx.corpus.val,
    )
    longest = (
        max(c for c in kv.context_lengths if c <= model.cfg.max_seq_len)
        if sweep["rows"]
        else model.cfg.max_seq_len
    )
    cap = capacity(model.cfg, longest, dtypes, budget, device)
    for d, c in cap.items():
        c["ratio_bytes_vs_reference"] = c["bytes_per_token"] / cap[reference]["bytes_per_token"]
        c["ratio_bytes_vs_fp16"] = (
            c["bytes_per_token"] / cap["fp16"]["bytes_per_token"] if "fp16" in cap else None
        )
        c["ratio_batch_vs_reference"] = c["largest_batch"] / max(cap[reference]["largest_batch"], 1)
        c["ratio_batch_vs_fp16"] = (
            c["largest_batch"] / max(cap["fp16"]["largest_batch"], 1) if "fp16" in cap else None
        )
        if d in QUANT_DTYPES:
            log.info(
                "kv %s: %.1f bytes/token allocated (layout %.1f; %.3fx of %s), largest batch %d at C=%d",
                d,
                c["bytes_per_token"],
                c["layout_bytes_per_token"],
                c["ratio_bytes_vs_reference"],
                reference,
                c["largest_batch"],
                longest,
            )
    path = plot(sweep, ctx.output_dir / "kvcache_sweep.png") if sweep["rows"] else None
    skipped = sweep["skipped"] + [{"dtype": d, "reason": why} for d, why in unsupported.items()]
    ctx.results["kvcache"] = {
        "dtype": kv.dtype,
        "reference": reference,
        "rows": sweep["rows"],
        "capacity": cap,
        "capacity_context": longest,
        "throughput_scaling": _scaling(sweep["rows"]),
        **fidelity,
        "plot": str(path) if path else None,
        "skipped": skipped,
        "memory_budget_bytes": int(budget),
        "new_tokens": sweep["new_tokens"],
        "repeats": sweep["repeats"],
        "seconds": round(time.monotonic() - started, 3),
    }
    _export_metrics(ctx, cap)


def _export_metrics(ctx: RunContext, cap: dict[str, dict[str, Any]]) -> None:
    metrics = ctx.results.get("metrics")
    if metrics is None:  # a stage run outside the orchestrator has no metrics registry
        return
    for d, c in cap.items():
        metrics.kv_bytes_per_token.labels(dtype=d).set(c["bytes_per_token"])
        metrics.kv_max_batch.labels(dtype=d).set(c["largest_batch"])
    metrics.record("kvcache", capacity=cap)
    metrics.progress()
