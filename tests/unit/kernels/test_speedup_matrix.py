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


def test_every_device_class_has_a_range_for_every_key() -> None:
    for cls, ranges in speedup.DEFAULT_RANGES.items():
        assert set(ranges) == set(SPEEDUP_KEYS), cls
        for lo, hi in ranges.values():
            assert lo is None or hi is None or lo <= hi


def test_spec_ranges_replace_the_device_class_default_key_by_key(make_context: Make) -> None:
    spec = make_context(acceptance={"speedups": {"kernels": {"min": 1.5}}}).spec
    h100 = HardwareInfo(device="cuda:0", name="NVIDIA H100 80GB HBM3", device_class="h100")
    ranges = speedup.ranges_for(spec, h100)
    assert ranges["kernels"] == Range(min=1.5, max=None)  # the whole entry, not only its min
    lo, hi = speedup.DEFAULT_RANGES["h100"]["kvcache"]
    assert ranges["kvcache"] == Range(min=lo, max=hi)
    cpu = speedup.ranges_for(make_context().spec, HardwareInfo())
    assert cpu["kernels"] == Range(
        min=speedup.DEFAULT_RANGES["cpu"]["kernels"][0], max=speedup.DEFAULT_RANGES["cpu"]["kernels"][1]
    )


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
    matrix = speedup.speedup_matrix(ctx, variants, repeats=4, new_tokens=8, budget_s=60)
    assert matrix["metric"] == {"kernels": "train", "kvcache": "inference"}
    assert set(matrix["variants"]["baseline"]) == {"trainStepSeconds", "decodeSeconds", "tokensPerSecond"}
    assert set(matrix["variants"]["kernels"]) == {"trainStepSeconds"}
    assert set(matrix["variants"]["kvcache"]) == {"decodeSeconds", "tokensPerSecond"}
    for key in variants:
        t = ctx.results["speedups"][key]
        samples = matrix["ratios"][key]
        assert t["repeats"] == len(samples) == matrix["repeats"] == 4
        assert t["min"] == min(samples) <= t["median"] <= t["max"] == max(samples)
    base = matrix["variants"]["baseline"]["decodeSeconds"]["median"]
    cached = matrix["variants"]["kvcache"]["decodeSeconds"]["median"]
    # Each ratio is one round's baseline over that round's variant, so the extremes bracket the
    # ratio of the medians.
    assert t["min"] <= base / cached * 1.0001 and base / cached <= t["max"] * 1.0001


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
