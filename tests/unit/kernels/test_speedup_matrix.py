"""The speedup matrix: default ranges and spec overrides, greedy decoding with and without a KV
cache, and the interleaved measurement of the baseline against each variant."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from optrun.api.result import HardwareInfo
from optrun.api.v1alpha1 import SPEEDUP_KEYS, Range
from optrun.runtime import speedup
from optrun.runtime.context import RunContext
from optrun.runtime.kernels import optimize

Make = Callable[..., RunContext]


class DenseCache:
    """The smallest real KVCache: full-precision tensors per layer, filled as positions arrive."""

    def __init__(self, batch: int, max_len: int) -> None:
        self.batch, self.max_len = batch, max_len
        self.k: dict[int, Tensor] = {}
        self.v: dict[int, Tensor] = {}

    def update(self, layer: int, k: Tensor, v: Tensor, start: int) -> tuple[Tensor, Tensor]:
        if layer not in self.k:
            shape = (self.batch, k.shape[1], self.max_len, k.shape[3])
            self.k[layer], self.v[layer] = k.new_zeros(shape), v.new_zeros(shape)
        end = start + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def test_every_device_group_and_objective_has_a_range_for_every_key() -> None:
    for group, by_objective in speedup.SPEED_RANGES.items():
        assert set(by_objective) == {"speed", "memory"}, group
        for objective, ranges in by_objective.items():
            assert set(ranges) == set(SPEEDUP_KEYS), (group, objective)
            for lo, hi in ranges.values():
                assert lo is None or hi is None or lo <= hi
            if objective == "speed":  # no slowdown: every floor is at least 1.0
                assert all(lo is not None and lo >= 1.0 for lo, _ in ranges.values()), group
        # memory relaxes the floors, never raises them
        for key in SPEEDUP_KEYS:
            assert by_objective["memory"][key][0] <= by_objective["speed"][key][0]


def test_spec_ranges_replace_the_default_key_by_key_and_the_objective_picks_the_defaults(
    make_context: Make,
) -> None:
    spec = make_context(acceptance={"speedups": {"kernels": {"min": 1.5}}}).spec
    h100 = HardwareInfo(device="cuda:0", name="NVIDIA H100 80GB HBM3", device_class="h100")
    ranges = speedup.ranges_for(spec, h100)
    assert ranges["kernels"] == Range(min=1.5, max=None)  # the whole entry, not only its min
    lo, hi = speedup.SPEED_RANGES["gpu"]["speed"]["kvcache"]
    assert ranges["kvcache"] == Range(min=lo, max=hi) == Range(min=1.0)
    cpu = speedup.ranges_for(make_context().spec, HardwareInfo())
    assert cpu["compression"] == Range(min=1.0)  # speed is the default objective
    memory = speedup.ranges_for(make_context(acceptance={"objective": "memory"}).spec, HardwareInfo())
    assert memory["compression"] == Range(min=0.2) and memory["kvcache"] == Range(min=0.3)
    both = speedup.ranges_for(make_context(acceptance={"objective": "both"}).spec, HardwareInfo())
    assert both == cpu


def test_greedy_decode_with_a_cache_produces_the_tokens_of_decoding_without(make_context: Make) -> None:
    model = make_context().model_factory()
    prompt = torch.randint(0, 256, (3, 5), generator=torch.Generator().manual_seed(0))
    plain = speedup.greedy_decode(model, prompt, 9)
    cached = speedup.greedy_decode(model, prompt, 9, cache_factory=DenseCache)
    assert plain.shape == (3, 14)
    assert torch.equal(plain[:, :5], prompt)
    assert torch.equal(cached, plain)


def test_matrix_times_baseline_and_variants_and_reports_ratio_statistics(make_context: Make) -> None:
    ctx = make_context(optimizations={"kernels": {"enabled": True}, "kvCache": {"enabled": True}})
    variants: dict[str, speedup.VariantBuilder] = {
        "kernels": lambda: (ctx.model_factory(), None),  # the identity transform: a ratio near 1
        "kvcache": lambda: (ctx.model_factory(), DenseCache),
    }
    with pytest.raises(ValueError, match="reference_cache: required to time kvcache"):
        speedup.speedup_matrix(ctx, variants, repeats=3)
    matrix = speedup.speedup_matrix(
        ctx, variants, repeats=4, new_tokens=8, budget_s=60, reference_cache=DenseCache
    )
    assert matrix["metric"] == {"kernels": "train", "kvcache": "inference"}
    assert set(matrix["variants"]["baseline"]) == {"trainStepSeconds", "decodeSeconds", "tokensPerSecond"}
    assert set(matrix["variants"]["baseline+cache"]) == {"decodeSeconds", "tokensPerSecond"}
    assert set(matrix["variants"]["kernels"]) == {"trainStepSeconds"}
    assert set(matrix["variants"]["kvcache"]) == {"decodeSeconds", "tokensPerSecond"}
    for key in variants:
        t = ctx.results["speedups"][key]
        samples = matrix["ratios"][key]
        assert t["repeats"] == len(samples) == matrix["repeats"] == 4
        assert t["min"] == min(samples) <= t["median"] <= t["max"] == max(samples)
    # The fair baseline of the cache: the same model decoding with the full-precision cache.
    fair = matrix["variants"]["baseline+cache"]["decodeSeconds"]["median"]
    cached = matrix["variants"]["kvcache"]["decodeSeconds"]["median"]
    t = ctx.results["speedups"]["kvcache"]
    # Each ratio is one round's baseline over that round's variant, so the extremes bracket the
    # ratio of the medians.
    assert t["min"] <= fair / cached * 1.0001 and fair / cached <= t["max"] * 1.0001
    # Against no cache (recomputing the prefix), reported beside it.
    plain = matrix["variants"]["baseline"]["decodeSeconds"]["median"]
    beside = matrix["noCache"]["kvcache"]
    assert matrix["ratiosVsNoCache"]["kvcache"] and set(matrix["noCache"]) == {"kvcache"}
    assert beside["min"] <= plain / cached * 1.0001 and plain / cached <= beside["max"] * 1.0001


def test_matrix_cuts_rounds_to_its_budget_but_keeps_three(make_context: Make) -> None:
    ctx = make_context()
    matrix = speedup.speedup_matrix(
        ctx, {"kernels": lambda: (ctx.model_factory(), None)}, repeats=50, budget_s=0.0
    )
    assert matrix["repeats"] == 3 and matrix["repeatsRequested"] == 50


def test_unknown_variant_keys_are_refused(make_context: Make) -> None:
    ctx = make_context()
    with pytest.raises(ValueError, match="variants: unknown key\\(s\\) fast; allowed: kernels, compression"):
        speedup.speedup_matrix(ctx, {"fast": lambda: (ctx.model_factory(), None)})


def test_run_measures_registered_transforms_and_the_range_test_judges_them(make_context: Make) -> None:
    ctx = make_context(
        optimizations={"kernels": {"enabled": True, "mode": "eager"}},  # no CPU compile in this test
        acceptance={"speedups": {"kernels": {"min": 0.0, "max": 1000.0}}, "repeats": 3},
    )
    speedup.run(ctx)  # before the kernel stage: nothing registered, nothing measured
    assert ctx.results["speedup_matrix"]["skipped"] == {"kernels": "not measured: kernels not available"}
    failed = speedup_check(ctx, "kernels")
    assert not failed.passed and "not measured" in failed.reason

    optimize(ctx, ctx.model_factory())
    speedup.run(ctx)
    measured = ctx.results["speedups"]["kernels"]
    passed = speedup_check(ctx, "kernels")
    assert passed.passed and passed.repeats == 3
    assert passed.measured == pytest.approx(measured["median"], rel=1e-5)
    strict = ctx.spec.model_copy(deep=True)
    strict.acceptance.speedups["kernels"] = Range(min=1000.0)
    ctx.spec = strict
    assert not speedup_check(ctx, "kernels").passed


def speedup_check(ctx: RunContext, key: str) -> speedup.Check:
    from optrun.runtime.acceptance import SUITE

    (test,) = [t for t in SUITE.applicable(ctx.spec) if t.name == f"speedup.{key}"]
    return test.fn(ctx)


def measured(ctx: RunContext, key: str, samples: list[float]) -> RunContext:
    """`ctx` as if the matrix had measured `samples` for `key`."""
    ctx.results["speedup_matrix"] = {"ratios": {key: samples}, "referenceCache": "fp32", "skipped": {}}
    return ctx


def test_a_slowdown_fails_the_speed_objective_beyond_the_noise_of_the_repeats(make_context: Make) -> None:
    on = {"kvCache": {"enabled": True}}
    # The int8 cache against the fp32 cache on this CPU (benchmarks/README.md): 0.54-0.63x.
    slow = speedup_check(
        measured(make_context(optimizations=on), "kvcache", [0.54, 0.58, 0.6, 0.61, 0.63]), "kvcache"
    )
    assert not slow.passed
    assert slow.reason.startswith(
        "kvcache speedup (inference against the fp32 cache; objective speed): measured 0.6x"
    )
    assert "the noise allowance of 15.0% puts the floor at 0.85x" in slow.reason
    assert slow.reason.endswith(
        "if memory is what this optimization is for, say so: acceptance.objective: memory"
    )
    # An optimization that changes nothing, timed on a noisy host: within its own spread of 1.0.
    same = speedup_check(
        measured(make_context(optimizations=on), "kvcache", [0.9, 0.95, 0.97, 1.02, 1.05]), "kvcache"
    )
    assert same.passed and "within the noise of the repeats" in same.reason
    # ... but a spread is allowed for only up to the device group's noise.
    noisy = speedup_check(
        measured(make_context(optimizations=on), "kvcache", [0.3, 0.6, 0.8, 1.2, 1.9]), "kvcache"
    )
    assert not noisy.passed and f"noise allowance of {speedup.NOISE['cpu']:.1%}" in noisy.reason


def test_the_memory_objective_relaxes_the_floor_and_a_spec_range_is_judged_as_written(
    make_context: Make,
) -> None:
    on = {"kvCache": {"enabled": True}}
    samples = [0.54, 0.58, 0.6, 0.61, 0.63]
    memory = make_context(optimizations=on, acceptance={"objective": "memory"})
    check = speedup_check(measured(memory, "kvcache", samples), "kvcache")
    assert check.passed and "objective memory" in check.reason and "against >= 0.3x" in check.reason
    floor = make_context(
        optimizations=on, acceptance={"objective": "memory", "speedups": {"kvcache": {"min": 0.61}}}
    )
    assert not speedup_check(
        measured(floor, "kvcache", samples), "kvcache"
    ).passed  # no allowance for a spec's range
    pathological = speedup_check(measured(memory, "kvcache", [0.2, 0.21, 0.22]), "kvcache")
    assert not pathological.passed


def test_memory_tests_measure_allocated_bytes_with_the_memory_objective_only(make_context: Make) -> None:
    from optrun.runtime.acceptance import SUITE

    def names(ctx: RunContext) -> set[str]:
        return {t.name for t in SUITE.applicable(ctx.spec)}

    on = {"kvCache": {"enabled": True, "dtype": "int8"}}
    assert "memory.kvcache" not in names(make_context(optimizations=on))
    ctx = make_context(optimizations=on, acceptance={"objective": "both"})
    assert "memory.kvcache" in names(ctx) and "memory.weights" not in names(ctx)
    check = speedup.memory_kvcache(ctx)
    assert check.passed and isinstance(check.measured, float)
    # int8 keys and values with fp32 scales per block: a little under 4x the fp32 cache.
    assert 3.5 < check.measured < 4.0
    assert "fp32 cache over int8 cache" in check.reason
    same = make_context(
        optimizations={"kvCache": {"enabled": True, "dtype": "fp32"}}, acceptance={"objective": "memory"}
    )
    flat = speedup.memory_kvcache(same)
    assert not flat.passed and flat.measured == 1.0  # no reduction at all
    weights = make_context(
        optimizations={"compression": {"enabled": True, "target": "weights"}},
        acceptance={"objective": "memory"},
    )
    assert "memory.weights" in names(weights)
    assert not speedup.memory_weights(weights).passed  # the stage did not run: nothing measured
    weights.results["compression"] = {
        "weights": {"memory": {"floatBytes": 2_000_000, "quantizedBytes": 700_000}}
    }
    w = speedup.memory_weights(weights)
    assert w.passed and w.measured == pytest.approx(2 / 0.7, rel=1e-5)
    weights.results["compression"]["weights"]["memory"]["quantizedBytes"] = 1_600_000
    assert not speedup.memory_weights(weights).passed  # 1.25x: less than the 1.5x default
