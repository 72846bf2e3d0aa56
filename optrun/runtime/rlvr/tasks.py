"""Verifiable task families: seeded arithmetic problems with exact answers, and their encoding.

A problem is a prompt such as "12+7=" and its answer "19". Operands are drawn uniformly from
[0, 10^max_digits). A fixed tenth of all operand pairs (chosen by a hash of the pair, so the
split is the same for every seed and every max_digits) is held out: training, warm-up and
GRPO never see those pairs, and accuracy is measured on them only.

Encoding goes through the model's tokenizer: BOS + the prompt (or the tokenizer's chat template
around it), left-padded with PAD so a batch shares one prompt length (byte-level prompts are
padded to the family's widest prompt). A Hugging Face model gets the padding's attention mask
(`optrun.runtime.lm.base.left_padding_mask`) in generation and in the loss, so it never attends
to PAD; the built-in models have no mask and see the padding as part of the prompt. The
completion is the answer's tokens followed by EOS.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from optrun.runtime.kvcache.generate import left_pad
from optrun.runtime.lm.tokenizers import ByteTokenizer


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


def prompt_ids(problem: Problem, tokenizer: Any) -> list[int]:
    """One prompt's ids: through the tokenizer's chat template when it uses one (a user turn
    holding the problem, then the assistant's header), else BOS + the problem."""
    chat = tokenizer.render_chat([{"role": "user", "content": problem.prompt}], generation_prompt=True)
    if chat is not None:
        return list(tokenizer.encode(chat))
    return list(tokenizer.encode(problem.prompt, bos=True))


def encode_prompts(
    problems: list[Problem], task: Task, max_digits: int, tokenizer: Any = None
) -> torch.Tensor:
    """(N, width) prompt ids, left-padded with the tokenizer's PAD (byte-level by default: at
    least the family's widest prompt, so every batch of the family has one shape)."""
    tok = tokenizer if tokenizer is not None else ByteTokenizer()
    width = task.prompt_width(max_digits) if tokenizer is None else 0
    ids = [prompt_ids(p, tok) for p in problems]
    padded = left_pad(ids, tok.pad_id)
    if padded.shape[1] < width:
        padded = torch.cat(
            (torch.full((len(ids), width - padded.shape[1]), tok.pad_id, dtype=torch.long), padded), 1
        )
    return padded


def encode_answers(
    problems: list[Problem], width: int, tokenizer: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, width) answer ids + EOS, right-padded with PAD, and the mask of real tokens."""
    tok = tokenizer if tokenizer is not None else ByteTokenizer()
    out = torch.full((len(problems), width), tok.pad_id, dtype=torch.long)
    mask = torch.zeros((len(problems), width), dtype=torch.bool)
    for i, p in enumerate(problems):
        ids = [*tok.encode(p.answer), tok.eos_id][:width]
        out[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = True
    return out, mask
