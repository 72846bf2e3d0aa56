"""Reward functions and their registry, task generators and the held-out split."""

from __future__ import annotations

import random

import pytest
import torch

from optrun.runtime.data import BOS, EOS, PAD, encode
from optrun.runtime.rlvr import rewards
from optrun.runtime.rlvr.grpo import to_completions
from optrun.runtime.rlvr.rewards import Completion, combined, get_reward, register_reward
from optrun.runtime.rlvr.tasks import (
    TASKS,
    encode_answers,
    encode_prompts,
    get_task,
    held_out,
    heldout_set,
    sample,
)

ADD = get_task("addition")
P = ADD.problem(12, 7, 2)


def _c(text: str, terminated: bool = True) -> Completion:
    return Completion(text=text, terminated=terminated, length=len(text) + int(terminated))


def test_problems_are_fixed_width_with_exact_answers():
    assert (P.prompt, P.answer) == ("12+07=", "019")
    m = get_task("multiplication").problem(99, 9, 2)
    assert (m.prompt, m.answer) == ("99*09=", "0891")


@pytest.mark.parametrize(
    ("completion", "exact", "fmt"),
    [
        (_c("019"), 1.0, 1.0),
        (_c("19"), 0.0, 1.0),  # the right number in the wrong form is not an exact match
        (_c("018"), 0.0, 1.0),
        (_c("019", terminated=False), 0.0, 0.0),  # no EOS: a run-on answer
        (_c("01 9"), 0.0, 0.0),
        (_c(""), 0.0, 0.0),
        (_c("-3"), 0.0, 1.0),
    ],
)
def test_exact_match_and_format_rewards(completion, exact, fmt):
    assert get_reward("exact-match")(P, completion) == exact
    assert get_reward("format")(P, completion) == fmt


def test_a_user_can_register_a_reward_and_combine_it_by_weight():
    @register_reward("test-short", replace=True)
    def short(problem, completion):
        return 1.0 if completion.length <= len(problem.answer) + 1 else 0.0

    try:
        score = combined({"exact-match": 1.0, "format": 0.1, "test-short": 0.5})
        total, parts = score(P, _c("019"))
        assert parts == {"exact-match": 1.0, "format": 1.0, "test-short": 1.0}
        assert total == pytest.approx(1.6)
        assert score(P, _c("0190"))[0] == pytest.approx(0.1)
    finally:
        rewards.REWARDS.pop("test-short")


def test_registry_rejects_unknown_and_duplicate_names():
    with pytest.raises(ValueError, match="unknown reward 'nope'; allowed: digit-match, exact-match, format"):
        combined({"nope": 1.0})
    with pytest.raises(ValueError, match="already registered"):
        register_reward("format")(lambda p, c: 0.0)
    with pytest.raises(ValueError, match="lowercase"):
        register_reward("Bad Name")


def test_completions_decode_up_to_eos_and_special_tokens_never_match():
    rows = torch.tensor(
        [[*encode("019"), EOS, PAD], [*encode("01"), PAD, *encode("9"), EOS], [*encode("01999")]]
    )
    comps = to_completions(rows, torch.tensor([4, 5, 5]))
    assert comps[0] == Completion("019", True, 4)
    assert comps[1].text != "019" and comps[1].terminated
    assert comps[2] == Completion("01999", False, 5)


def test_held_out_pairs_are_a_fixed_tenth_never_sampled_for_training():
    pairs = [(a, b) for a in range(100) for b in range(100)]
    share = sum(held_out(a, b) for a, b in pairs) / len(pairs)
    assert 0.08 <= share <= 0.12
    train = sample(ADD, 2000, 2, random.Random(0))
    assert not any(held_out(*map(int, p.prompt[:-1].split("+"))) for p in train)
    evalset = heldout_set(ADD, 200, 2)
    assert evalset == heldout_set(ADD, 200, 2)
    assert all(held_out(*map(int, p.prompt[:-1].split("+"))) for p in evalset)


def test_sampling_is_seeded():
    assert sample(ADD, 20, 2, random.Random(3)) == sample(ADD, 20, 2, random.Random(3))
    assert sample(ADD, 20, 2, random.Random(3)) != sample(ADD, 20, 2, random.Random(4))


def test_prompts_and_answers_encode_to_fixed_widths():
    problems = [ADD.problem(1, 2, 2), ADD.problem(99, 99, 2)]
    prompts = encode_prompts(problems, ADD, 2)
    assert prompts.shape == (2, ADD.prompt_width(2))
    assert prompts[0].tolist() == [BOS, *encode("01+02=")]
    answers, mask = encode_answers(problems, ADD.max_new_tokens(2))
    assert answers[1].tolist() == [*encode("198"), EOS, PAD]
    assert mask[1].tolist() == [True, True, True, True, False]


def test_unknown_task_and_split_fail_with_the_allowed_values():
    with pytest.raises(ValueError, match="allowed: addition, multiplication"):
        get_task("division")
    with pytest.raises(ValueError, match="allowed: train, heldout"):
        sample(ADD, 1, 2, random.Random(0), split="test")
    assert set(TASKS) == {"addition", "multiplication"}
