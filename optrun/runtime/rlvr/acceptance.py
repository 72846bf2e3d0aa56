"""Acceptance tests of the rlvr stage (registered in the shared SUITE).

They judge what `optrun.runtime.rlvr.run` recorded (`ctx.results["rlvr"]`): held-out accuracy
before and after GRPO, the KL to the reference along the way, the answer format, and that every
step completed with a finite loss, and that the model kept its language modelling on the run's
own held-out data.
"""

from __future__ import annotations

import math
from typing import Any

from optrun.api.result import Category, Expected
from optrun.api.v1alpha1 import OptimizationRunSpec
from optrun.runtime.acceptance import SUITE, Check, in_range
from optrun.runtime.context import RunContext

# Share of held-out answers that must still be well-formed (digits then EOS) after RL: the
# warm-up teaches the format, and RL must not trade it away.
MIN_FORMAT_RATE = 0.9


def enabled(spec: OptimizationRunSpec) -> bool:
    return spec.rlvr.enabled


def _results(ctx: RunContext) -> dict[str, Any]:
    res = ctx.results.get("rlvr")
    if not isinstance(res, dict) or "post_accuracy" not in res:
        error = res.get("error") if isinstance(res, dict) else None
        raise RuntimeError("the rlvr stage left no results" + (f": {error}" if error else ""))
    return res


@SUITE.test("rlvr.reward-improvement", Category.END_TO_END, applies=enabled)
def reward_improvement(ctx: RunContext) -> Check:
    """GRPO raises held-out exact-match accuracy above the pre-RL (post-warm-up) policy by more
    than two standard errors of the difference on the evaluation set."""
    r = _results(ctx)
    check = in_range(
        r["improvement"],
        r["min_improvement"],
        None,
        what=f"held-out exact-match gain over the pre-RL policy ({r['pre_accuracy']:.3f} -> "
        f"{r['post_accuracy']:.3f} on {r['eval_problems']} {r['task']} problems, after "
        f"{r['warmup_steps']} supervised warm-up steps)",
    )
    return check


@SUITE.test("rlvr.kl-bounded", Category.STABILITY, applies=enabled)
def kl_bounded(ctx: RunContext) -> Check:
    """The policy stays near the reference: the largest per-step mean KL is within rlvr.maxKl."""
    r = _results(ctx)
    check = in_range(
        r["kl_max"],
        None,
        ctx.spec.rlvr.max_kl,
        what="largest mean per-token KL to the reference",
        unit=" nats",
    )
    check.reason += f" (final {r['kl_final']:.4f}, coefficient {ctx.spec.rlvr.kl_coefficient:g})"
    return check


@SUITE.test("rlvr.format", Category.END_TO_END, applies=enabled)
def answer_format(ctx: RunContext) -> Check:
    """After RL the held-out answers are still well-formed (an integer, then EOS)."""
    r = _results(ctx)
    return in_range(
        r["post_format_rate"], MIN_FORMAT_RATE, None, what="well-formed held-out answers after RL"
    )


@SUITE.test("rlvr.completed", Category.SAFETY, critical=True, applies=enabled)
def completed(ctx: RunContext) -> Check:
    """Every GRPO step ran, with a finite loss and a finite KL."""
    r = _results(ctx)
    curve = r["curve"]
    bad = [c["step"] for c in curve if not (math.isfinite(c["loss"]) and math.isfinite(c["kl"]))]
    ok = len(curve) == ctx.spec.rlvr.steps and not bad
    return Check(
        ok,
        measured=len(curve),
        expected=Expected(equals=ctx.spec.rlvr.steps),
        reason=f"{len(curve)} of {ctx.spec.rlvr.steps} GRPO steps"
        + (f"; non-finite at steps {bad[:5]}" if bad else ""),
    )


@SUITE.test("rlvr.language-modelling-kept", Category.END_TO_END, critical=True, applies=enabled)
def language_modelling_kept(ctx: RunContext) -> Check:
    """RL on the task did not erase what fine-tuning taught: the model's held-out loss on the
    run's own data rises by at most rlvr.maxHeldOutLossRise across the stage."""
    lm = _results(ctx)["heldout_lm"]
    check = in_range(
        lm["rise"],
        None,
        ctx.spec.rlvr.max_heldout_loss_rise,
        what=f"relative rise of held-out loss across RLVR ({lm['before']['loss']:.4f} -> {lm['after']['loss']:.4f}, "
        f"replay coefficient {lm['replayCoefficient']:g})",
    )
    check.measured = {
        "before": round(lm["before"]["loss"], 6),
        "after": round(lm["after"]["loss"], 6),
        "rise": round(lm["rise"], 6),
    }
    return check
