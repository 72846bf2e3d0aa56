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

The KV-cache keys (kvcache, all) decode against a fair baseline: the base model decoding with the
full-precision cache of the run's dtype (`workload.precision`), not recomputing the prefix; the
ratio against decoding without a cache is reported beside it (`speedup_matrix["ratiosVsNoCache"]`).

The accepted ranges depend on the device group (cpu, gpu) and on `acceptance.objective`
(`default_ranges`; `spec.acceptance.speedups` replaces a key's range entirely). The table, with
the measurement behind each row, is in docs/acceptance.md; in short:
- speed (and both): every floor is 1.0, no slowdown; a default floor is missed only beyond the
  noise of the run's own repeats (their relative spread, capped at `NOISE` of the device group):
  the median must reach floor * (1 - min(spread, NOISE)).
- memory: the floors only catch a pathological slowdown (the memory is what the optimization
  is for), and the memory reductions are tested instead (`memory.kvcache`, `memory.weights`:
  reference bytes over optimized bytes, allocated tensors measured, at least `MEMORY_RANGES`).
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

Bounds = tuple[float | None, float | None]
# The default speedup ranges per device group and objective ("both" judges the speed floors).
# Grounds, measured and not yet measured, in docs/acceptance.md.
SPEED_RANGES: dict[str, dict[str, dict[str, Bounds]]] = {
    "cpu": {
        "speed": {
            "kernels": (1.0, 2.0),
            "compression": (1.0, None),
            "kernels+compression": (1.0, None),
            "kvcache": (1.0, None),
            "all": (1.0, None),
        },
        "memory": {
            "kernels": (0.7, 2.0),
            "compression": (0.2, None),
            "kernels+compression": (0.2, None),
            "kvcache": (0.3, None),
            "all": (0.2, None),
        },
    },
    "gpu": {
        "speed": {
            "kernels": (1.0, 3.0),
            "compression": (1.0, None),
            "kernels+compression": (1.0, None),
            "kvcache": (1.0, None),
            "all": (1.0, None),
        },
        "memory": {
            "kernels": (0.95, 3.0),
            "compression": (0.4, None),
            "kernels+compression": (0.4, None),
            "kvcache": (0.5, None),
            "all": (0.4, None),
        },
    },
}
# Largest relative spread of the repeats a default floor allows for (the run's own spread,
# when smaller, is what it allows): cpu, two identical models timed against each other on
# the shared 2-core host; gpu: not yet measured (docs/acceptance.md).
NOISE: dict[str, float] = {"cpu": 0.17, "gpu": 0.05}
# The least memory reduction (reference bytes / optimized bytes) with objective memory or both.
MEMORY_RANGES: dict[str, Bounds] = {"kvcache": (1.5, None), "weights": (1.5, None)}
# The keys that decode with a KV cache, against the full-precision cache.
CACHED_KEYS = tuple(k for k, parts in PARTS.items() if "kvcache" in parts)


def device_group(hardware: HardwareInfo) -> str:
    return "cpu" if hardware.device == "cpu" else "gpu"


def default_ranges(hardware: HardwareInfo, objective: str) -> dict[str, Bounds]:
    """The device group's default speedup ranges for `objective` (speed, memory or both)."""
    return dict(SPEED_RANGES[device_group(hardware)]["memory" if objective == "memory" else "speed"])


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
    """Accepted range per key: the spec's entry where it has one, else the default of the device
    group and objective."""
    out = {
        k: Range(min=lo, max=hi)
        for k, (lo, hi) in default_ranges(hardware, spec.acceptance.objective).items()
    }
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
    reference_cache: CacheFactory | None = None,
) -> dict[str, Any]:
    """Time the baseline (a fresh ctx.model_factory() model) and each variant by key, interleaved,
    in this process on ctx.device. Writes ctx.results["speedups"] = {key: Timing dict of the
    ratio} and ctx.results["speedup_matrix"] (raw times, per-round ratios, settings), and
    returns the latter.

    The KV-cache keys (`CACHED_KEYS`) are timed against the baseline decoding with
    `reference_cache` (the full-precision cache; required for them), their ratio against
    decoding without a cache goes to "ratiosVsNoCache".

    repeats: rounds (default spec.acceptance.repeats), cut down to fit `budget_s` seconds of
    timed rounds (default 20 s on a CPU, 120 s on a GPU) but never below 3."""
    unknown = sorted(set(variants) - set(SPEEDUP_KEYS))
    if unknown:
        raise ValueError(f"variants: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(SPEEDUP_KEYS)}")
    cached = [k for k in variants if k in CACHED_KEYS]
    if cached and reference_cache is None:
        raise ValueError(
            f"reference_cache: required to time {', '.join(cached)} (their baseline decodes with the "
            "full-precision cache)"
        )
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
    if cached:
        fns["baseline+cache", "inference"] = lambda: greedy_decode(base, prompt, n, reference_cache, dtype)
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

    def ratio(base_name: str, key: str) -> list[float]:
        pairs = zip(times[base_name, METRIC[key]], times[key, METRIC[key]], strict=True)
        return [b / v for b, v in pairs]

    ratios = {key: ratio("baseline+cache" if key in CACHED_KEYS else "baseline", key) for key in variants}
    no_cache = {key: ratio("baseline", key) for key in cached}
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
        # The KV-cache keys against decoding without a cache, beside their fair ratio.
        "ratiosVsNoCache": no_cache,
        "noCache": {k: _timing(r).model_dump() for k, r in no_cache.items()},
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


def _kv_cache_factories(ctx: RunContext) -> tuple[CacheFactory | None, CacheFactory | None, str | None]:
    """The KV-cache stage's factories for this run's model: the spec's cache dtype and the
    full-precision cache of the run's dtype (the fair baseline), or why there are none."""
    if not ctx.spec.optimizations.kv_cache.enabled:
        return None, None, None
    try:
        kv = importlib.import_module("optrun.runtime.kvcache.cache")
        cfg = ctx.model.cfg if ctx.model is not None else ctx.model_factory().cfg
        return (
            kv.cache_factory(cfg, ctx.spec.optimizations.kv_cache.dtype, ctx.device),
            kv.cache_factory(cfg, ctx.spec.workload.precision, ctx.device),
            None,
        )
    except (ImportError, AttributeError, ValueError) as exc:
        return None, None, f"{type(exc).__name__}: {exc}"


def run(ctx: RunContext) -> None:
    """The orchestrator's entry point: measure every wanted key that can be measured."""
    cache_factory, reference, why = _kv_cache_factories(ctx)
    variants, skipped = default_variants(ctx, cache_factory)
    if why:
        skipped = {k: f"{v}: {why}" if "kvcache" in PARTS[k] else v for k, v in skipped.items()}
    ctx.results["speedup_matrix"] = {
        "skipped": skipped,
        "referenceCache": ctx.spec.workload.precision if reference is not None else None,
    }
    ctx.results.setdefault("speedups", {})
    if variants:
        speedup_matrix(ctx, variants, reference_cache=reference)
    for key, reason in skipped.items():
        log.warning("speedup %s %s", key, reason)


# -- acceptance ----------------------------------------------------------------------------------


def _register(key: str) -> None:
    def applies(spec: OptimizationRunSpec) -> bool:
        return key in wanted_keys(spec)

    @SUITE.test(f"speedup.{key}", Category.TUNING, applies=applies)
    def check(ctx: RunContext) -> Check:
        return speedup_check(ctx, key)


def speedup_check(ctx: RunContext, key: str) -> Check:
    """The key's median speedup against its range (see the module docstring: a default floor
    allows for the noise of the repeats, a range of the spec's is judged as written)."""
    matrix = ctx.results.get("speedup_matrix", {})
    samples = matrix.get("ratios", {}).get(key)
    if not samples:
        why = matrix.get("skipped", {}).get(key, "not measured")
        if "error" in matrix:  # the stage crashed (an out-of-memory error, say)
            why = f"not measured: the speedup stage failed: {matrix['error']}"
        return Check(False, reason=f"{key} speedup {why}")
    objective = ctx.spec.acceptance.objective
    rng = ranges_for(ctx.spec, ctx.hardware)[key]
    against = f" against the {matrix.get('referenceCache')} cache" if key in CACHED_KEYS else ""
    what = f"{key} speedup ({METRIC[key]}{against}; objective {objective})"
    check = in_range(statistics.median(samples), rng.min, rng.max, what=what, unit="x", samples=samples)
    if rng.min is not None and key not in ctx.spec.acceptance.speedups and not check.passed:
        spread = check.spread or 0.0
        allowance = min(spread, NOISE[device_group(ctx.hardware)])
        floor = rng.min * (1.0 - allowance)
        median = float(check.measured) if isinstance(check.measured, int | float) else 0.0
        within = median >= floor and (rng.max is None or median <= rng.max)
        check.passed = within
        check.reason += f"; the noise allowance of {allowance:.1%} puts the floor at {floor:.3g}x"
        if within:
            check.reason += ": within the noise of the repeats"
    if not check.passed and objective != "memory" and rng.min is not None and rng.min >= 1.0:
        check.reason += "; if memory is what this optimization is for, say so: acceptance.objective: memory"
    no_cache = matrix.get("noCache", {}).get(key)
    if no_cache:
        check.reason += f" (against no cache: {no_cache['median']:.3g}x)"
    return check


for _key in SPEEDUP_KEYS:
    _register(_key)


# -- the objective: memory ---------------------------------------------------------------------


def _objective_memory(spec: OptimizationRunSpec) -> bool:
    return spec.acceptance.objective in ("memory", "both")


def memory_range(spec: OptimizationRunSpec, key: str) -> Range:
    lo, hi = MEMORY_RANGES[key]
    return spec.acceptance.memory.get(key, Range(min=lo, max=hi))


@SUITE.test(
    "memory.kvcache",
    Category.TUNING,
    applies=lambda spec: _objective_memory(spec) and spec.optimizations.kv_cache.enabled,
)
def memory_kvcache(ctx: RunContext) -> Check:
    """The spec's KV cache allocates less than the full-precision cache of the run's dtype: the
    bytes of the tensors each allocates for one sequence of the model's whole context."""
    factory, reference, why = _kv_cache_factories(ctx)
    if factory is None or reference is None:
        return Check(False, reason=f"no KV cache to measure: {why}")
    model = ctx.model if ctx.model is not None else ctx.model_factory()
    length = int(getattr(model.cfg, "max_seq_len", ctx.spec.workload.sequence_length))
    optimized, full = factory(1, length).nbytes(), reference(1, length).nbytes()
    rng = memory_range(ctx.spec, "kvcache")
    dtype, precision = ctx.spec.optimizations.kv_cache.dtype, ctx.spec.workload.precision
    check = in_range(
        full / optimized if optimized else 0.0,
        rng.min,
        rng.max,
        what=f"KV-cache memory reduction, {precision} cache over {dtype} cache ({full} / {optimized} bytes allocated)",
        unit="x",
    )
    return check


@SUITE.test(
    "memory.weights",
    Category.TUNING,
    applies=lambda spec: (
        _objective_memory(spec)
        and spec.optimizations.compression.enabled
        and spec.optimizations.compression.target in ("weights", "both")
    ),
)
def memory_weights(ctx: RunContext) -> Check:
    """The weight-compressed model holds fewer bytes (parameters and buffers) than the float one."""
    compression = ctx.results.get("compression")
    memory = (
        ((compression or {}).get("weights") or {}).get("memory") if isinstance(compression, dict) else None
    )
    if not memory or not memory.get("quantizedBytes"):
        error = compression.get("error") if isinstance(compression, dict) else None
        return Check(
            False, reason="the compression stage measured no weight memory" + (f": {error}" if error else "")
        )
    rng = memory_range(ctx.spec, "weights")
    return in_range(
        memory["floatBytes"] / memory["quantizedBytes"],
        rng.min,
        rng.max,
        what=f"weight memory reduction ({memory['floatBytes']} / {memory['quantizedBytes']} bytes)",
        unit="x",
    )
