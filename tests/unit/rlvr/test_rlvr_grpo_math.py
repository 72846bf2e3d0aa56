"""The GRPO maths: group-relative advantages, the k3 KL estimator, the clipped objective."""

from __future__ import annotations

import math

import pytest
import torch

from optrun.runtime.model import build_model
from optrun.runtime.rlvr.grpo import completion_logprobs, group_advantages, grpo_loss, k3_kl


def test_advantages_are_rewards_standardised_within_each_group():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    a = group_advantages(r, eps=0.0)
    # Group 1: mean 0.5, unbiased std sqrt(1/3); group 2: mean 0.75, std 1.5.
    s1 = math.sqrt(1 / 3)
    assert torch.allclose(a[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / s1)
    assert torch.allclose(a[1], torch.tensor([-0.5, -0.5, -0.5, 1.5]))
    assert torch.allclose(a.mean(dim=1), torch.zeros(2), atol=1e-6)


def test_a_group_whose_completions_all_score_alike_has_zero_advantage():
    a = group_advantages(torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    assert torch.equal(a, torch.zeros(2, 3))


def test_advantages_reject_groups_of_one():
    with pytest.raises(ValueError, match="group >= 2"):
        group_advantages(torch.ones(4, 1))


def test_k3_is_zero_on_equal_policies_and_positive_elsewhere():
    logp = torch.log(torch.tensor([0.2, 0.5, 0.9]))
    assert torch.allclose(k3_kl(logp, logp), torch.zeros(3))
    assert (k3_kl(logp, logp - 0.3) > 0).all() and (k3_kl(logp, logp + 0.3) > 0).all()


def test_k3_averages_to_the_exact_kl_under_samples_of_the_policy():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    exact = float((p * (p / q).log()).sum())
    # Expectation of k3 under p, computed exactly over the support.
    expected_k3 = float((p * k3_kl(p.log(), q.log())).sum())
    assert expected_k3 == pytest.approx(exact, rel=1e-5)


def _loss(ratio: torch.Tensor, adv: float, eps: float = 0.2, beta: float = 0.0) -> torch.Tensor:
    old = torch.zeros(1, len(ratio))
    logp = ratio.log()[None].requires_grad_(True)
    loss, _ = grpo_loss(
        logp,
        old,
        old,
        torch.tensor([adv]),
        torch.ones(1, len(ratio), dtype=torch.bool),
        clip_epsilon=eps,
        kl_coefficient=beta,
    )
    loss.backward()
    return logp.grad[0]


def test_the_clip_stops_the_gradient_once_the_ratio_has_moved_far_enough_in_the_advantage_direction():
    grad = _loss(torch.tensor([1.0, 1.1, 1.3, 0.7]), adv=1.0)
    assert grad[0] < 0 and grad[1] < 0  # inside the range: push the ratio up
    assert grad[2] == 0  # above 1 + eps with A > 0: clipped
    assert grad[3] < 0  # below 1 - eps with A > 0: the min keeps the unclipped term
    grad = _loss(torch.tensor([0.7, 1.3]), adv=-1.0)
    assert grad[0] == 0 and grad[1] > 0


def test_the_loss_averages_tokens_per_completion_then_completions():
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[True, False, False], [True, True, True]])
    loss, stats = grpo_loss(
        logp, logp, logp, torch.tensor([2.0, -1.0]), mask, clip_epsilon=0.2, kl_coefficient=0.0
    )
    # ratio 1 everywhere: each completion's loss is -A, then the mean over completions.
    assert float(loss) == pytest.approx(-(2.0 - 1.0) / 2)
    assert stats["kl"] == 0.0 and stats["clip_fraction"] == 0.0


def test_the_kl_penalty_pulls_the_policy_towards_the_reference():
    logp = torch.log(torch.tensor([[0.5, 0.5]])).requires_grad_(True)
    ref = torch.log(torch.tensor([[0.9, 0.9]]))
    loss, stats = grpo_loss(
        logp,
        logp.detach(),
        ref,
        torch.zeros(1),
        torch.ones(1, 2, dtype=torch.bool),
        clip_epsilon=0.2,
        kl_coefficient=0.1,
    )
    loss.backward()
    assert stats["kl"] > 0
    assert (logp.grad < 0).all()  # descending raises the log-probs towards the reference's


def test_completion_logprobs_match_a_per_position_forward():
    torch.manual_seed(0)
    model = build_model("tiny-lm").eval()
    tokens = torch.randint(0, 256, (2, 9))
    got = completion_logprobs(model, tokens, prompt_len=5)
    logits = model(tokens)
    want = torch.stack(
        [
            torch.log_softmax(logits[:, t - 1], -1).gather(-1, tokens[:, t : t + 1]).squeeze(-1)
            for t in range(5, 9)
        ],
        dim=1,
    )
    assert got.shape == (2, 4)
    assert torch.allclose(got, want, atol=1e-5)
