"""RLVR: reinforcement learning from verifiable rewards (GRPO) on arithmetic tasks.

Stage entry point `run(ctx, model)` stores `ctx.results["rlvr"]`:
  task, max_digits, seed, policy_init   what was trained, and from what ("trained": the lineage's model)
  warmup_steps                          supervised warm-up steps taken (reported as such; 0 = none)
  warmup_max_steps, warmup_target_accuracy, warmup_probe_accuracy ([step, accuracy] checks on
                                        training problems), warmup_loss
  initial_accuracy                      held-out exact match of the fresh policy, before anything
  pre_accuracy, pre_format_rate         held-out greedy exact match (pass@1) after the warm-up:
                                        the pre-RL policy that GRPO starts from
  post_accuracy, post_format_rate       the same after GRPO
  improvement                           post_accuracy - pre_accuracy
  min_improvement                       what counts as measurable on this evaluation set (see
                                        `measurable_improvement`)
  curve                                 one dict per GRPO step: reward_mean, pass_at_1 (sampled
                                        exact-match rate), kl, clip_fraction, completion_length,
                                        loss, groups_with_signal, seconds
  kl_final, kl_max, eval_problems, seconds (warmup, pre_eval, rl, post_eval, total)
  heldout_lm                            {before, after}: held-out loss, perplexity and accuracy
                                        of the model on the run's own data around the stage

The policy is the model the train stage handed on (kernel-patched where the kernels stage
patched it), trained in place: what RLVR does to the model that would roll out is what is
judged. Prompts and answers go through the model's tokenizer (and its chat template when it
uses one). The supervised warm-up is what teaches a small model the answer format; it is
reported as such.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from typing import Any

from torch import nn

from optrun.api.v1alpha1 import RLVR
from optrun.runtime.context import RunContext
from optrun.runtime.lm import base as lm
from optrun.runtime.rlvr.grpo import GRPO, GRPOConfig, Replay, evaluate, supervised_warmup
from optrun.runtime.rlvr.rewards import REWARDS, Completion, combined, register_reward
from optrun.runtime.rlvr.tasks import TASKS, Problem, get_task, heldout_set, sample

log = logging.getLogger(__name__)

# Training problems the warm-up's stopping rule is judged on.
PROBE_PROBLEMS = 200

__all__ = [
    "REWARDS",
    "TASKS",
    "Completion",
    "Problem",
    "measurable_improvement",
    "register_reward",
    "run",
    "train_rlvr",
]


def measurable_improvement(pre: float, post: float, n: int) -> float:
    """Two standard errors of the difference of two accuracies on `n` problems each: an
    improvement above it is not evaluation noise (a conservative, unpaired bound)."""
    var = (pre * (1 - pre) + post * (1 - post)) / max(n, 1)
    return 2.0 * math.sqrt(var)


def train_rlvr(
    policy: nn.Module,
    cfg: RLVR,
    *,
    seed: int,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    replay: Replay | None = None,
    on_progress: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Warm-up, pre-RL evaluation, GRPO, post-RL evaluation of `policy` (trained in place);
    `on_progress` is told of every warm-up step and finished phase (GRPO steps go to `on_step`)."""
    progress = on_progress or (lambda: None)
    task = get_task(cfg.task)
    combined(dict(cfg.rewards))  # an unknown reward name fails here, before any training
    started = time.monotonic()
    seconds: dict[str, float] = {}
    problems = heldout_set(task, cfg.eval_problems, cfg.max_digits)
    initial = evaluate(policy, problems, task, cfg.max_digits)
    progress()
    rng = random.Random(seed)
    probe = sample(task, PROBE_PROBLEMS, cfg.max_digits, random.Random(seed + 1))  # training split
    t = time.monotonic()
    warm = supervised_warmup(
        policy,
        task,
        cfg.max_digits,
        steps=cfg.warmup_steps,
        batch_size=cfg.warmup_batch_size,
        learning_rate=cfg.warmup_learning_rate,
        rng=rng,
        target_accuracy=cfg.warmup_target_accuracy,
        probe=probe,
        replay=replay,
        on_progress=progress,
    )
    seconds["warmup"] = time.monotonic() - t
    t = time.monotonic()
    pre = evaluate(policy, problems, task, cfg.max_digits)
    progress()
    seconds["pre_eval"] = time.monotonic() - t
    log.info(
        "rlvr %s: supervised warm-up %d steps, pre-RL held-out accuracy %.3f (format %.3f)",
        cfg.task,
        warm["steps"],
        pre["accuracy"],
        pre["format_rate"],
    )
    grpo = GRPO(
        policy,
        task,
        cfg.max_digits,
        dict(cfg.rewards),
        GRPOConfig(
            steps=cfg.steps,
            group_size=cfg.group_size,
            prompts_per_step=cfg.prompts_per_step,
            learning_rate=cfg.learning_rate,
            kl_coefficient=cfg.kl_coefficient,
            clip_epsilon=cfg.clip_epsilon,
            updates_per_batch=cfg.updates_per_batch,
            temperature=cfg.temperature,
        ),
        seed=seed,
        replay=replay,
    )
    t = time.monotonic()
    curve = grpo.train(on_step)
    seconds["rl"] = time.monotonic() - t
    t = time.monotonic()
    post = evaluate(policy, problems, task, cfg.max_digits)
    seconds["post_eval"] = time.monotonic() - t
    seconds["total"] = time.monotonic() - started
    log.info(
        "rlvr %s: post-RL held-out accuracy %.3f (pre %.3f), final KL %.4f",
        cfg.task,
        post["accuracy"],
        pre["accuracy"],
        curve[-1]["kl"] if curve else 0.0,
    )
    return {
        "task": cfg.task,
        "max_digits": cfg.max_digits,
        "seed": seed,
        "policy_init": "fresh",
        "warmup_steps": warm["steps"],
        "warmup_max_steps": cfg.warmup_steps,
        "warmup_target_accuracy": cfg.warmup_target_accuracy,
        "warmup_probe_accuracy": warm["probe_accuracy"],
        "warmup_loss": warm["losses"][-1] if warm["losses"] else None,
        "initial_accuracy": initial["accuracy"],
        "pre_accuracy": pre["accuracy"],
        "pre_format_rate": pre["format_rate"],
        "post_accuracy": post["accuracy"],
        "post_format_rate": post["format_rate"],
        "improvement": post["accuracy"] - pre["accuracy"],
        "min_improvement": measurable_improvement(pre["accuracy"], post["accuracy"], len(problems)),
        "eval_problems": len(problems),
        "curve": curve,
        "kl_final": curve[-1]["kl"] if curve else 0.0,
        "kl_max": max((c["kl"] for c in curve), default=0.0),
        "rewards": dict(cfg.rewards),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }


def run(ctx: RunContext, model: nn.Module) -> None:
    """The rlvr stage: GRPO on the lineage's model (trained in place; see the module doc)."""
    cfg = ctx.spec.rlvr
    metrics = ctx.results.get("metrics")

    def on_step(step: int, entry: dict[str, Any]) -> None:
        if metrics is None:  # a stage run outside the orchestrator has no metrics registry
            return
        metrics.rlvr_reward.set(entry["reward_mean"])
        metrics.rlvr_kl.set(entry["kl"])
        metrics.record("rlvr_step", **{"step": step, **entry})
        metrics.progress()

    before = lm.evaluate(model, ctx.eval_batches(), ctx.device, ctx.dtype)
    replay = Replay(
        ctx.corpus,
        ctx.spec.workload.sequence_length,
        cfg.replay_batch_size,
        cfg.replay_coefficient,
        ctx.spec.training.seed + 7,
    )
    result = train_rlvr(
        model,
        cfg,
        seed=ctx.spec.training.seed,
        on_step=on_step,
        replay=replay,
        # The warm-up and the evaluations take minutes on a busy CPU: without a sign of life
        # the watchdog would report a hang of a stage that is working.
        on_progress=metrics.progress if metrics is not None else None,
    )
    after = lm.evaluate(model, ctx.eval_batches(), ctx.device, ctx.dtype)
    result["policy_init"] = "trained"
    # What RL on the task did to the model's language modelling on the run's own held-out data.
    result["heldout_lm"] = {
        "before": before,
        "after": after,
        "rise": after["loss"] / before["loss"] - 1.0,
        "replayCoefficient": cfg.replay_coefficient,
    }
    ctx.results["rlvr"] = result
    if metrics is not None:
        metrics.rlvr_pass.labels(phase="pre").set(result["pre_accuracy"])
        metrics.rlvr_pass.labels(phase="post").set(result["post_accuracy"])
