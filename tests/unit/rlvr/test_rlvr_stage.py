"""The RLVR stage end to end on the CPU: warm-up, GRPO with the cached generator, held-out gain."""

from __future__ import annotations

import functools

import pytest
import torch

from optrun.api.v1alpha1 import OptimizationRunSpec
from optrun.runtime import rlvr
from optrun.runtime.acceptance import SUITE
from optrun.runtime.context import RunContext
from optrun.runtime.data import Corpus
from optrun.runtime.hardware import detect
from optrun.runtime.model import build_model
from optrun.runtime.rlvr import acceptance  # noqa: F401  (registers the tests)

SEED = 1234  # the quickstart's seed


@functools.cache
def _corpus() -> Corpus:
    return Corpus.build("pydoc")


def _seeded_model(seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model("tiny-lm")


def _ctx(tmp_path, **rlvr_cfg) -> RunContext:
    spec = OptimizationRunSpec.model_validate(
        {
            "workload": {"model": "tiny-lm"},
            "training": {"seed": SEED},
            "rlvr": {"enabled": True, **rlvr_cfg},
        }
    )
    device, hw = detect("cpu")
    return RunContext(
        spec=spec,
        device=device,
        hardware=hw,
        corpus=_corpus(),
        model_factory=functools.partial(_seeded_model, SEED),
        output_dir=tmp_path,
    )


@pytest.mark.slow
def test_grpo_raises_held_out_exact_match_above_the_pre_rl_policy(tmp_path):
    ctx = _ctx(tmp_path)  # the quickstart's RLVR settings
    rlvr.run(ctx, ctx.model_factory())
    r = ctx.results["rlvr"]
    assert r["policy_init"] == "trained" and 0 < r["warmup_steps"] <= 1000
    assert r["initial_accuracy"] == 0.0  # a fresh byte-level model knows no arithmetic
    assert r["pre_format_rate"] >= 0.9  # the warm-up taught the format...
    assert 0.3 <= r["pre_accuracy"] < 0.9  # ...and left accuracy mediocre
    assert r["improvement"] > r["min_improvement"] > 0, r
    assert len(r["curve"]) == ctx.spec.rlvr.steps
    assert all(c["kl"] >= 0 for c in r["curve"])
    first, last = r["curve"][:10], r["curve"][-10:]
    assert sum(c["pass_at_1"] for c in last) > sum(c["pass_at_1"] for c in first)
    checks = {t.name: t.fn(ctx) for t in SUITE.applicable(ctx.spec) if t.name.startswith("rlvr.")}
    assert set(checks) == {
        "rlvr.reward-improvement",
        "rlvr.kl-bounded",
        "rlvr.format",
        "rlvr.completed",
        "rlvr.language-modelling-kept",
    }
    assert all(c.passed for c in checks.values()), {n: c.reason for n, c in checks.items()}


def test_a_zero_kl_coefficient_trains_without_a_reference(tmp_path):
    ctx = _ctx(
        tmp_path,
        steps=2,
        warmupSteps=10,
        warmupTargetAccuracy=None,
        klCoefficient=0.0,
        evalProblems=20,
        groupSize=4,
        promptsPerStep=2,
    )
    rlvr.run(ctx, ctx.model_factory())
    r = ctx.results["rlvr"]
    assert r["warmup_steps"] == 10 and r["warmup_probe_accuracy"] == []
    assert [c["kl"] for c in r["curve"]] == [0.0, 0.0]
    assert set(r["curve"][0]) >= {"reward_mean", "pass_at_1", "kl", "completion_length", "format_rate"}


def test_an_unknown_reward_name_fails_before_training(tmp_path):
    ctx = _ctx(
        tmp_path, steps=1, warmupSteps=0, rewards={"exact-match": 1.0, "brevity": 0.5}, evalProblems=10
    )
    with pytest.raises(
        ValueError, match="unknown reward 'brevity'; allowed: digit-match, exact-match, format"
    ):
        rlvr.run(ctx, ctx.model_factory())


@pytest.mark.slow  # a minute on a busy 2-core machine, like the stage's other tests
def test_the_warm_up_tells_the_watchdog_it_is_moving(tmp_path):
    # A stage of minutes must show progress all along, or the run's watchdog reports a hang of a
    # stage that works (the quickstart's warm-up ran past hangTimeoutSeconds on a busy CPU).
    from optrun.runtime.metrics import Metrics

    class Counting(Metrics):
        calls = 0

        def progress(self) -> None:
            self.calls += 1
            super().progress()

    ctx = _ctx(tmp_path, steps=1, warmupSteps=3, evalProblems=10, groupSize=2, promptsPerStep=1)
    ctx.results["metrics"] = metrics = Counting()
    rlvr.run(ctx, ctx.model_factory())
    rl_steps = len(ctx.results["rlvr"]["curve"])
    warm = ctx.results["rlvr"]["warmup_steps"]
    # Every warm-up step and GRPO step, and the evaluations before and after the warm-up.
    assert warm >= 1 and metrics.calls >= warm + rl_steps + 2
