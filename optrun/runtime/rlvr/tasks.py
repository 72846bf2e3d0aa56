"""Verifiable task families: seeded arithmetic problems with exact answers, and their encoding.

A problem is a prompt such as "12+7=" and its answer "19". Operands are drawn uniformly from
[0, 10^max_digits). A fixed tenth of all operand pairs (chosen by a hash of the pair, so the
split is the same for every seed and every max_digits) is held out: training, warm-up and
GRPO never see those pairs, and accuracy is measured on them only.

Encoding for the byte-level TinyLM: BOS + prompt bytes, left-padded with PAD to the widest
prompt of the family (TinyLM has no attention mask, so a batch shares one prompt length); the
completion is the answer's bytes followed by EOS.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from optrun.runtime.data import EOS, PAD, encode
from optrun.runtime.kvcache.generate import left_pad


@dataclass(frozen=True)
class Problem:
    prompt: str  # "12+7="
    answer: str  # "19"
    task: str


@dataclass(frozen=True)
class Task:
    """A task family: how a pair of operands becomes a problem, and how long answers get."""

    name: str
    symbol: str
    op: Callable[[int, int], int]
    answer_digits: Callable[[int], int]  # the longest answer for operands of this many digits

    def problem(self, a: int, b: int, max_digits: int) -> Problem:
        """Operands zero-padded to `max_digits`, the answer to the family's longest answer."""
        d, w = max_digits, self.answer_digits(max_digits)
        return Problem(
            prompt=f"{a:0{d}d}{self.symbol}{b:0{d}d}=", answer=f"{self.op(a, b):0{w}d}", task=self.name
        )

    def prompt_width(self, max_digits: int) -> int:
        """Tokens of the widest encoded prompt: BOS, two operands, the symbol and '='."""
        return 1 + 2 * max_digits + 2

    def max_new_tokens(self, max_digits: int) -> int:
        """Room for the longest answer, its EOS, and one token more (a run-on answer is wrong,
        and the room lets the format reward see it)."""
        return self.answer_digits(max_digits) + 2


TASKS: dict[str, Task] = {
    "addition": Task("addition", "+", lambda a, b: a + b, lambda d: d + 1),
    "multiplication": Task("multiplication", "*", lambda a, b: a * b, lambda d: 2 * d),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; allowed: {', '.join(TASKS)}")
    return TASKS[name]


def held_out(a: int, b: int) -> bool:
    """Whether the operand pair belongs to the held-out tenth (a fixed integer hash)."""
    h = (a * 1_000_003 + b * 998_244_353 + 12_345) * 2_654_435_761 % 2**32
    return h % 10 == 0


def sample(task: Task, n: int, max_digits: int, rng: random.Random, split: str = "train") -> list[Problem]:
    """`n` problems of `split` ("train" or "heldout"), operands uniform in [0, 10^max_digits)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split {split!r} is not allowed; allowed: train, heldout")
    if not 1 <= max_digits <= 9:
        raise ValueError(f"max_digits must be in 1..9, got {max_digits}")
    want_held = split == "heldout"
    hi = 10**max_digits - 1
    out: list[Problem] = []
    while len(out) < n:
        a, b = rng.randint(0, hi), rng.randint(0, hi)
        if held_out(a, b) == want_held:
            out.append(task.problem(a, b, max_digits))
    return out


def heldout_set(task: Task, n: int, max_digits: int) -> list[Problem]:
    """The evaluation set: the same `n` held-out problems for every run of this family."""
    return sample(task, n, max_digits, random.Random(20_240_607), "heldout")


def encode_prompts(problems: list[Problem], task: Task, max_digits: int) -> torch.Tensor:
    """(N, prompt_width) token ids, BOS + prompt, left-padded with PAD."""
    width = task.prompt_width(max_digits)
    ids = [encode(p.prompt, bos=True) for p in problems]
    padded = left_pad(ids, PAD)
    if padded.shape[1] < width:
        padded = torch.cat(
            (torch.full((len(ids), width - padded.shape[1]), PAD, dtype=torch.long), padded), 1
        )
    return padded


def encode_answers(problems: list[Problem], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, width) answer bytes + EOS, right-padded with PAD, and the mask of real tokens."""
    out = torch.full((len(problems), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(problems), width), dtype=torch.bool)
    for i, p in enumerate(problems):
        ids = [*encode(p.answer), EOS][:width]
        out[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = True
    return out, mask
