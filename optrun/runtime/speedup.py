"""The speedup matrix: the baseline and every enabled optimization and combination, timed in one
process on one device, and the acceptance ranges their speedups are judged against.

Keys (`SPEEDUP_KEYS`): kernels, compression, kernels+compression, kvcache, all (all three). A
key is measured when its optimizations are enabled and available: "kernels" and
"compression" are model transforms the stages register in `ctx.transforms`; "kvcache" is a
cache factory `(batch, max_len) -> KVCache` handed to the decoder. Each key has one metric:
- train: seconds per training step (forward, backward, AdamW step) on a workload-shaped batch;
- inference: greedy decoding of N tokens after a short prompt, tokens per second. Without a
  cache every step re-runs the whole prefix, `model(tokens)`; with one, the prompt is run once
  and each step feeds one token, `model(token, cache, position)`.
The speedup is baseline time / variant time for both (for inference that equals the ratio of
tokens per second). Rounds are interleaved (baseline, variant 1, variant 2, ..., repeat), so
drift in clock speed or load falls on all variants alike; within a round a cheap call is
repeated and its median kept; each round gives one ratio per key, and the median, extremes and
count of those ratios are reported and judged.

Default ranges per device class (`DEFAULT_RANGES`; `spec.acceptance.speedups` replaces a key's
range entirely). They are starting points to be calibrated with `benchmarks/kernels.py` figures:
- cpu: auto kernel selection may keep eager everywhere (Triton is no candidate on a CPU), so the
  kernels speedup is about 1.0x: the range asks for no slowdown beyond the noise of a shared
  host (0.7: on a loaded 2-core machine two identical models were measured 0.83x apart) and
  flags an implausible gain (above 2.0). Weight compression targets memory,
  not CPU speed (dequantisation costs time): only a floor against a pathological slowdown
  (0.2). A KV cache must beat recomputing the prefix (>= 1.0).
- a100, h100, h200, l40s, a10, l4, gpu (any other CUDA device): the kernels are selected only
  where they measured faster, so the floor is no slowdown beyond timer noise (0.95); Liger
  reports 1.2-1.4x end-to-end training gains on Llama-sized models, and at most 3.0x is
  plausible. Compression floors at 0.5, the KV cache at 1.0.
"""

from __future__ import annotations

import importlib
import logging
import statistics
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optrun.api.result import Category, HardwareInfo, Timing
from optrun.api.v1alpha1 import SPEEDUP_KEYS, OptimizationRunSpec, Range
from optrun.runtime.acceptance import SUITE, Check, in_range
from optrun.runtime.context import RunContext
from optrun.runtime.lm.base import adamw, autocast
from optrun.runtime.timing import measure

log = logging.getLogger(__name__)

CacheFactory = Callable[[int, int], Any]
VariantBuilder = Callable[[], tuple[nn.Module, CacheFactory | None]]

# What each key is judged on.
METRIC: dict[str, str] = {
    "kernels": "train",
    "compression": "inference",
    "kernels+compression": "inference",
    "kvcache": "inference",
    "all": "inference",
}
# The optimizations a key combines.
PARTS: dict[str, tuple[str, ...]] = {
    "kernels": ("kernels",),
    "compression": ("compression",),
    "kernels+compression": ("kernels", "compression"),
    "kvcache": ("kvcache",),
    "all": ("kernels", "compression", "kvcache"),
}

_GPU: dict[str, tuple[float | None, float | None]] = {
    "kernels": (0.95, 3.0),
    "compression": (0.5, None),
    "kernels+compression": (0.5, None),
    "kvcache": (1.0, None),
    "all": (1.0, None),
}
DEFAULT_RANGES: dict[str, dict[str, tuple[float | None, float | None]]] = {
    "cpu": {
        "kernels": (0.7, 2.0),
        "compression": (0.2, None),
        "kernels+compression": (0.2, None),
        "kvcache": (1.0, None),
        "all": (0.2, None),
    },
    **{cls: dict(_GPU) for cls in ("a100", "h100", "h200", "l40s", "a10", "l4", "gpu")},
}


def enabled_parts(spec: OptimizationRunSpec) -> set[str]:
    o = spec.optimizations
    return {
        name
        for name, on in (
            ("kernels", o.kernels.enabled),
            ("compression", o.compression.enabled),
            ("kvcache", o.kv_cache.enabled),
        )
        if on
    }


def wanted_keys(spec: OptimizationRunSpec) -> list[str]:
    """The keys whose optimizations are all enabled."""
    on = enabled_parts(spec)
    return [k for k in SPEEDUP_KEYS if set(PARTS[k]) <= on]


def ranges_for(spec: OptimizationRunSpec, hardware: HardwareInfo) -> dict[str, Range]:
    """Accepted range per key: the spec's entry where it has one, else the device class default."""
    defaults = DEFAULT_RANGES.get(
        hardware.device_class, DEFAULT_RANGES["gpu" if hardware.device != "cpu" else "cpu"]
    )
    out = {k: Range(min=lo, max=hi) for k, (lo, hi) in defaults.items()}
    out.update(spec.acceptance.speedups)
    return out


# -- what is timed -------------------------------------------------------------------------------


def train_step(
    model: nn.Module, tokens: Tensor, targets: Tensor, dtype: torch.dtype = torch.float32, lr: float = 1e-5
) -> Callable[[], float]:
    """One training step of `model` (forward, backward, AdamW) as a callable; returns the loss."""
    try:
        opt = adamw(model, lr)
    except ValueError:
        raise ValueError("model: no trainable parameters, a training step cannot be timed") from None
    model.train()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with autocast(tokens.device, dtype):
            if hasattr(model, "loss"):
                loss = model.loss(tokens, targets)
            else:
                loss = F.cross_entropy(model(tokens).float().flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def greedy_decode(
    model: nn.Module,
    prompt: Tensor,
    new_tokens: int,
    cache_factory: CacheFactory | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Prompt (B, P) followed by `new_tokens` greedy tokens (B, P + N), with the cache the
    factory builds or, without one, recomputing the whole prefix each step (kvcache.generate)."""
    from optrun.runtime.kvcache.generate import generate

    return generate(
        model,
        prompt,
        new_tokens,
        use_cache=cache_factory is not None,
        cache_factory=cache_factory,
        eos_id=None,
        compute_dtype=dtype,
    ).tokens


# -- the matrix ----------------------------------------------------------------------------------


# Within a round, a call is repeated up to _MAX_INNER times to fill about _INNER_SECONDS.
_INNER_SECONDS = 0.25
_MAX_INNER = 10


def _timing(samples: list[float]) -> Timing:
    return Timing(median=statistics.median(samples), min=min(samples), max=max(samples), repeats=len(samples))


def speedup_matrix(
    ctx: RunContext,
    variants: dict[str, VariantBuilder],
    *,
    repeats: int | None = None,
    warmup: int = 1,
    prompt_tokens: int | None = None,
    new_tokens: int | None = None,
    budget_s: float | None = None,
) -> dict[str, Any]:
    """Time the baseline (a fresh ctx.model_factory() model) and each variant by key, interleaved,
    in this process on ctx.device. Writes ctx.results["speedups"] = {key: Timing dict of the
    ratio} and ctx.results["speedup_matrix"] (raw times, per-round ratios, settings), and
    returns the latter.

    repeats: rounds (default spec.acceptance.repeats), cut down to fit `budget_s` seconds of
    timed rounds (default 20 s on a CPU, 120 s on a GPU) but never below 3."""
    unknown = sorted(set(variants) - set(SPEEDUP_KEYS))
    if unknown:
        raise ValueError(f"variants: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(SPEEDUP_KEYS)}")
    w = ctx.spec.workload
    device, dtype = ctx.device, ctx.dtype
    repeats = repeats or ctx.spec.acceptance.repeats
    gen = torch.Generator().manual_seed(ctx.spec.training.seed)
    x, y = ctx.corpus.batch("train", w.sequence_length, w.batch_size, gen)
    x, y = x.to(device), y.to(device)
    base = ctx.model_factory()
    max_len = getattr(getattr(base, "cfg", None), "max_seq_len", w.sequence_length)
    p = prompt_tokens or max(1, min(16, w.sequence_length // 2))
    n = new_tokens or (64 if device.type == "cuda" else 16)
    n = max(1, min(n, max_len - p))
    prompt = x[:, :p]

    metrics_needed = {METRIC[k] for k in variants}
    built: dict[str, tuple[nn.Module, CacheFactory | None]] = {"baseline": (base, None)}
    built.update({k: b() for k, b in variants.items()})
    fns: dict[tuple[str, str], Callable[[], object]] = {}
    for name, (model, cache_factory) in built.items():
        for metric in ("train", "inference"):
            if metric not in metrics_needed or (name != "baseline" and METRIC[name] != metric):
                continue
            if metric == "train":
                fns[name, metric] = train_step(model, x, y, dtype)
            else:
                fns[name, metric] = lambda m=model, c=cache_factory: greedy_decode(m, prompt, n, c, dtype)
    # Candidates of the kernel selection that overran their compile bound may still be compiling
    # in the background; they would steal cores from whatever is timed first.
    from optrun.runtime.kernels.select import wait_for_background_compiles

    waited = wait_for_background_compiles()
    # Warm-up (first-call compilation, allocator growth, caches); its last call estimates a round.
    estimate = {k: measure(fn, device, warmup=warmup, repeats=1).median for k, fn in fns.items()}
    # A cheap call (a training step of a small model) is repeated within its round and the
    # round keeps the median, so one hiccup of a shared host does not become a round's ratio.
    inner = {k: max(1, min(_MAX_INNER, int(_INNER_SECONDS / max(e, 1e-9)))) for k, e in estimate.items()}
    round_cost = sum(estimate[k] * inner[k] for k in fns)
    budget = budget_s if budget_s is not None else (120.0 if device.type == "cuda" else 20.0)
    requested = repeats
    repeats = max(3, min(repeats, int(budget // max(round_cost, 1e-9))))
    if repeats < requested:
        log.info(
            "speedup matrix: %d rounds instead of %d to fit %.0fs (%.2fs per round)",
            repeats,
            requested,
            budget,
            round_cost,
        )
    times: dict[tuple[str, str], list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(measure(fn, device, warmup=0, repeats=inner[k]).median)
    ratios = {
        key: [b / v for b, v in zip(times["baseline", METRIC[key]], times[key, METRIC[key]], strict=True)]
        for key in variants
    }
    decoded = x.shape[0] * n  # tokens one decode produces
    raw: dict[str, Any] = {}
    for (name, metric), samples in times.items():
        entry = raw.setdefault(name, {})
        if metric == "train":
            entry["trainStepSeconds"] = _timing(samples).model_dump()
        else:
            entry["decodeSeconds"] = _timing(samples).model_dump()
            entry["tokensPerSecond"] = round(decoded / statistics.median(samples), 3)
    matrix = {
        "device": ctx.hardware.name,
        "deviceClass": ctx.hardware.device_class,
        "metric": {k: METRIC[k] for k in variants},
        "repeats": repeats,
        "repeatsRequested": requested,
        "callsPerRound": {f"{name}/{metric}": n for (name, metric), n in inner.items()},
        "backgroundCompileWaitSeconds": round(waited, 3),
        "trainBatch": list(x.shape),
        "decode": {"batch": x.shape[0], "promptTokens": p, "newTokens": n},
        "variants": raw,
        "ratios": ratios,
    }
    ctx.results["speedups"] = {k: _timing(r).model_dump() for k, r in ratios.items()}
    ctx.results.setdefault("speedup_matrix", {}).update(matrix)
    for k, t in ctx.results["speedups"].items():
        log.info(
            "speedup %s (%s): %.3fx median of %d [%.3f, %.3f]",
            k,
            METRIC[k],
            t["median"],
            t["repeats"],
            t["min"],
            t["max"],
        )
    return matrix


def default_variants(
    ctx: RunContext, cache_factory: CacheFactory | None = None
) -> tuple[dict[str, VariantBuilder], dict[str, str]]:
    """Builders for every wanted key whose parts are available, and why the others are not."""
    variants: dict[str, VariantBuilder] = {}
    skipped: dict[str, str] = {}
    for key in wanted_keys(ctx.spec):
        parts = PARTS[key]
        missing = [p for p in parts if p != "kvcache" and p not in ctx.transforms]
        if "kvcache" in parts and cache_factory is None:
            missing.append("kvcache (no cache factory)")
        if missing:
            skipped[key] = f"not measured: {', '.join(missing)} not available"
            continue
        transforms = [ctx.transforms[p] for p in parts if p != "kvcache"]
        factory = cache_factory if "kvcache" in parts else None

        def build(
            ts: list[Callable[[nn.Module], nn.Module]] = transforms, cf: CacheFactory | None = factory
        ) -> tuple[nn.Module, CacheFactory | None]:
            model = ctx.model_factory()
            for t in ts:
                model = t(model)
            return model, cf

        variants[key] = build
    return variants, skipped


def _kv_cache_factory(ctx: RunContext) -> tuple[CacheFactory | None, str | None]:
    """The KV-cache stage's factory for this run's model and cache dtype, or why there is none."""
    if not ctx.spec.optimizations.kv_cache.enabled:
        return None, None
    try:
        kv = importlib.import_module("optrun.runtime.kvcache.cache")
        cfg = ctx.model.cfg if ctx.model is not None else ctx.model_factory().cfg
        return kv.cache_factory(cfg, ctx.spec.optimizations.kv_cache.dtype, ctx.device), None
    except (ImportError, AttributeError, ValueError) as exc:
        return None, f"{type(exc).__name__}: {exc}"


def run(ctx: RunContext) -> None:
    """The orchestrator's entry point: measure every wanted key that can be measured."""
    cache_factory, why = _kv_cache_factory(ctx)
    variants, skipped = default_variants(ctx, cache_factory)
    if why:
        skipped = {k: f"{v}: {why}" if "kvcache" in PARTS[k] else v for k, v in skipped.items()}
    ctx.results["speedup_matrix"] = {"skipped": skipped}
    ctx.results.setdefault("speedups", {})
    if variants:
        speedup_matrix(ctx, variants)
    for key, reason in skipped.items():
        log.warning("speedup %s %s", key, reason)


# -- acceptance ----------------------------------------------------------------------------------


def _register(key: str) -> None:
    def applies(spec: OptimizationRunSpec) -> bool:
        return key in wanted_keys(spec)

    @SUITE.test(f"speedup.{key}", Category.TUNING, applies=applies)
    def check(ctx: RunContext) -> Check:
        rng = ranges_for(ctx.spec, ctx.hardware)[key]
        samples = ctx.results.get("speedup_matrix", {}).get("ratios", {}).get(key)
        if not samples:
            why = ctx.results.get("speedup_matrix", {}).get("skipped", {}).get(key, "not measured")
            return Check(False, reason=f"{key} speedup {why}")
        return in_range(
            statistics.median(samples),
            rng.min,
            rng.max,
            what=f"{key} speedup ({METRIC[key]})",
            unit="x",
            samples=samples,
        )


for _key in SPEEDUP_KEYS:
    _register(_key)
