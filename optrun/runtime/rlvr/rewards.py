"""Verifiable reward functions, as a registry a user can extend.

A reward function scores one completion of one problem: `fn(problem, completion) -> float`.
The completion carries its decoded text (the bytes before EOS), whether it ended with EOS and
its length in tokens. Built in:
  exact-match  1.0 when the completion is exactly the answer followed by EOS, else 0.0
  format       1.0 when it is an integer (optional minus sign, digits) followed by EOS, else 0.0
  digit-match  the share of the answer's characters in place, for a well-formed answer of the
               answer's length, else 0.0 (partial credit)
A run combines rewards as a weighted sum (`spec.rlvr.rewards`, name -> weight). To add one:

    from optrun.runtime.rlvr.rewards import register_reward

    @register_reward("short")
    def short(problem, completion):
        return 1.0 if completion.length <= len(problem.answer) + 1 else 0.0
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from optrun.runtime.rlvr.tasks import Problem

_INTEGER = re.compile(r"-?[0-9]+")


@dataclass(frozen=True)
class Completion:
    text: str  # decoded bytes before EOS (or all of them when no EOS came)
    terminated: bool  # ended with EOS within the token budget
    length: int  # tokens, EOS included


RewardFn = Callable[[Problem, Completion], float]
REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str, *, replace: bool = False) -> Callable[[RewardFn], RewardFn]:
    """Register `fn` under `name`; a second registration of a name fails unless `replace`."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
        raise ValueError(f"reward name {name!r} is not allowed; allowed: lowercase letters, digits and '-'")

    def register(fn: RewardFn) -> RewardFn:
        if name in REWARDS and REWARDS[name] is not fn and not replace:
            raise ValueError(f"reward {name!r} is already registered")
        REWARDS[name] = fn
        return fn

    return register


def get_reward(name: str) -> RewardFn:
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; allowed: {', '.join(sorted(REWARDS))}")
    return REWARDS[name]


@register_reward("exact-match")
def exact_match(problem: Problem, completion: Completion) -> float:
    return 1.0 if completion.terminated and completion.text == problem.answer else 0.0


@register_reward("format")
def format_reward(problem: Problem, completion: Completion) -> float:
    return 1.0 if completion.terminated and _INTEGER.fullmatch(completion.text) else 0.0


@register_reward("digit-match")
def digit_match(problem: Problem, completion: Completion) -> float:
    """Partial credit: the share of answer characters in place, for a well-formed answer of the
    answer's length (a denser signal than exact match: most wrong sums are one digit off)."""
    if not completion.terminated or len(completion.text) != len(problem.answer):
        return 0.0
    return sum(a == b for a, b in zip(completion.text, problem.answer, strict=True)) / len(problem.answer)


def combined(weights: Mapping[str, float]) -> Callable[[Problem, Completion], tuple[float, dict[str, float]]]:
    """A scorer: (problem, completion) -> (weighted sum, each reward's value)."""
    if not weights:
        raise ValueError("rewards must name at least one reward function")
    fns = {name: get_reward(name) for name in weights}  # fails early on an unknown name

    def score(problem: Problem, completion: Completion) -> tuple[float, dict[str, float]]:
        parts = {name: float(fn(problem, completion)) for name, fn in fns.items()}
        return sum(weights[n] * v for n, v in parts.items()), parts

    return score
