"""GRPO: group-relative policy optimization with verifiable rewards (Shao et al., 2024,
"DeepSeekMath", section 4.1; the same objective as TRL's GRPOTrainer).

Each step draws `prompts_per_step` training problems and samples `group_size` completions for
each with the KV-cached generator (temperature 1). Rewards come from the verifiable reward
functions; a completion's advantage is its reward relative to its own group,
    A_i = (r_i - mean(r)) / (std(r) + eps)            (std unbiased, as TRL computes it)
so no value model is needed, and a group whose completions all score alike teaches nothing.
The policy then takes `updates_per_batch` gradient steps on the clipped surrogate with a KL
penalty to the frozen reference policy (the policy before RL), per completion token t:
    L_t = -[ min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A) - beta * KL_t ],
    rho_t = pi(o_t | q, o_<t) / pi_old(o_t | q, o_<t),
    KL_t = pi_ref / pi - log(pi_ref / pi) - 1          (Schulman's k3 estimator: unbiased, >= 0)
averaged over each completion's tokens, then over completions (DeepSeekMath eq. 3). With one
update per batch rho = 1 and the clip is inert (TRL's default); with more, the clip bounds how
far later updates move from the sampling policy. beta = 0 drops the reference entirely.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optrun.runtime.kvcache.generate import generate
from optrun.runtime.lm.base import adamw, call, left_padding_mask
from optrun.runtime.lm.tokenizers import ByteTokenizer
from optrun.runtime.rlvr.rewards import Completion, combined, exact_match, format_reward
from optrun.runtime.rlvr.tasks import Problem, Task, encode_answers, encode_prompts, sample

log = logging.getLogger(__name__)


# -- the maths ------------------------------------------------------------------------------------


def group_advantages(rewards: Tensor, eps: float = 1e-4) -> Tensor:
    """(P, G) rewards -> (P, G) advantages (r - group mean) / (group std + eps)."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be shaped (prompts, group >= 2), got {tuple(rewards.shape)}")
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    return (rewards - mean) / (std + eps)


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) from log-probs of tokens sampled from pi."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def completion_logprobs(
    model: nn.Module, tokens: Tensor, prompt_len: int, attention_mask: Tensor | None = None
) -> Tensor:
    """Log-probs (B, N) of the completion tokens tokens[:, P:] under `model`; attention_mask
    (B, P + N): the prompts' left padding (see `left_padding_mask`), for a model that attends by mask."""
    mask = attention_mask[:, :-1] if attention_mask is not None else None
    logits = call(model, tokens[:, :-1], None, 0, mask)[:, prompt_len - 1 :]  # (B, N, V): t predicts t + 1
    logp = F.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens[:, prompt_len:, None]).squeeze(-1)


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_epsilon: float,
    kl_coefficient: float,
) -> tuple[Tensor, dict[str, float]]:
    """The clipped GRPO objective (to minimise) and its statistics; see the module doc.

    logp, old_logp, ref_logp, mask: (B, N); advantages: (B,). ref_logp may be None when
    kl_coefficient is 0."""
    m = mask.float()
    ratio = torch.exp(logp - old_logp)
    a = advantages[:, None]
    surrogate = torch.min(ratio * a, ratio.clamp(1.0 - clip_epsilon, 1.0 + clip_epsilon) * a)
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    per_token = -(surrogate - kl_coefficient * kl)
    per_seq = (per_token * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
    tokens = m.sum().clamp_min(1.0)
    clipped = ((ratio - 1.0).abs() > clip_epsilon).float()
    stats = {
        "kl": float((kl.detach() * m).sum() / tokens),
        "clip_fraction": float((clipped * m).sum() / tokens),
    }
    return per_seq.mean(), stats


# -- completions and evaluation ---------------------------------------------------------------


def to_completions(completions: Tensor, lengths: Tensor, tokenizer: Any = None) -> list[Completion]:
    """Generated rows (B, N) and their lengths -> Completion records (text before EOS; special
    tokens never pass for text, see Tokenizer.completion_text)."""
    tok = tokenizer if tokenizer is not None else ByteTokenizer()
    out = []
    for row, n in zip(completions.tolist(), lengths.tolist(), strict=True):
        toks = row[:n]
        terminated = bool(toks) and toks[-1] == tok.eos_id
        body = toks[:-1] if terminated else toks
        out.append(Completion(text=tok.completion_text(body), terminated=terminated, length=n))
    return out


def _tokenizer(model: nn.Module) -> Any:
    return getattr(model, "tokenizer", None) or ByteTokenizer()


def _prompt_mask(model: nn.Module, prompts: Tensor, length: int | None = None) -> Tensor | None:
    """The attention mask of left-padded prompts (to `length` positions) for a model that attends
    by mask; None for the built-in models, which see the padding as part of the prompt."""
    return left_padding_mask(model, prompts, _tokenizer(model).pad_id, length)


def _user_tokenizer(model: nn.Module) -> Any:
    """The tokenizer prompts are encoded with: None for the byte-level tokenizer, whose prompts
    are padded to the family's widest (one shape per task, as before tokenizers were pluggable)."""
    tok = getattr(model, "tokenizer", None)
    return None if tok is None or isinstance(tok, ByteTokenizer) else tok


@torch.no_grad()
def evaluate(
    model: nn.Module, problems: list[Problem], task: Task, max_digits: int, batch_size: int = 256
) -> dict[str, float]:
    """Greedy exact-match accuracy (pass@1), format rate and mean length on `problems`."""
    device = next(model.parameters()).device
    exact = combined({"exact-match": 1.0, "format": 1.0})
    hits = fmt = length = 0.0
    for i in range(0, len(problems), batch_size):
        chunk = problems[i : i + batch_size]
        prompts = encode_prompts(chunk, task, max_digits, _user_tokenizer(model)).to(device)
        gen = generate(
            model, prompts, task.max_new_tokens(max_digits), attention_mask=_prompt_mask(model, prompts)
        )
        for p, c in zip(chunk, to_completions(gen.completions, gen.lengths, _tokenizer(model)), strict=True):
            _, parts = exact(p, c)
            hits += parts["exact-match"]
            fmt += parts["format"]
            length += c.length
    n = max(len(problems), 1)
    return {
        "accuracy": hits / n,
        "format_rate": fmt / n,
        "mean_length": length / n,
        "problems": len(problems),
    }


# -- replay of the run's own data -------------------------------------------------------------------


class Replay:
    """A language-model loss on batches of the run's training data, added to each RL-side update
    with `coefficient` (InstructGPT's PPO-ptx): without it, the warm-up and GRPO on arithmetic
    overwrite what fine-tuning taught (measured on the quickstart: held-out loss 1.90 -> 11.0)."""

    def __init__(self, corpus: Any, seq_len: int, batch_size: int, coefficient: float, seed: int) -> None:
        self.corpus, self.seq_len, self.batch_size, self.coefficient = (
            corpus,
            seq_len,
            batch_size,
            coefficient,
        )
        self.gen = torch.Generator().manual_seed(seed)

    def loss(self, model: nn.Module) -> Tensor:
        device = next(model.parameters()).device
        x, y = self.corpus.batch("train", self.seq_len, self.batch_size, self.gen)
        return self.coefficient * model.loss(x.to(device), y.to(device))


def _with_replay(loss: Tensor, model: nn.Module, replay: Replay | None) -> Tensor:
    return loss if replay is None or replay.coefficient == 0 else loss + replay.loss(model)


# -- supervised warm-up -------------------------------------------------------------------------


def supervised_warmup(
    model: nn.Module,
    task: Task,
    max_digits: int,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    rng: random.Random,
    target_accuracy: float | None = None,
    probe: list[Problem] | None = None,
    check_every: int = 25,
    replay: Replay | None = None,
    on_progress: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Teacher-forced next-token training on prompt -> answer + EOS (loss on the answer only).

    The warm-up is what teaches the byte-level model the answer format; it is reported as such.
    It runs `steps` steps, or stops earlier, at a multiple of `check_every`, once greedy exact
    match on `probe` (training problems, never held-out ones) reaches `target_accuracy`: the
    step at which a small model "gets" carrying varies by seed several-fold, and GRPO needs a
    policy that is right often enough to have signal and wrong often enough to have room.
    `on_progress` is called after every step (the run's watchdog sees the warm-up move).
    Returns {"steps": taken, "losses": per step, "probe_accuracy": [[step, accuracy], ...]}."""
    if target_accuracy is not None and not probe:
        raise ValueError("target_accuracy needs a non-empty probe set of training problems")
    device = next(model.parameters()).device
    width = task.max_new_tokens(max_digits)
    opt = adamw(model, learning_rate)
    losses: list[float] = []
    checks: list[list[float]] = []
    step = 0
    for step in range(1, steps + 1):
        model.train()
        problems = sample(task, batch_size, max_digits, rng)
        prompts = encode_prompts(problems, task, max_digits, _user_tokenizer(model))
        answers, mask = encode_answers(problems, width, _tokenizer(model))
        tokens = torch.cat((prompts, answers), dim=1).to(device)  # (B, P + A)
        targets = torch.full_like(tokens, -100)
        p = prompts.shape[1]
        # Position t predicts token t + 1: the last prompt position predicts the first answer byte.
        targets[:, p - 1 : -1] = torch.where(mask, answers, torch.full_like(answers, -100)).to(device)
        attention = _prompt_mask(model, prompts.to(device), tokens.shape[1])
        loss = model.loss(tokens, targets) if attention is None else model.loss(tokens, targets, attention)
        opt.zero_grad(set_to_none=True)
        _with_replay(loss, model, replay).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if on_progress is not None:
            on_progress()
        if target_accuracy is not None and probe and step % check_every == 0:
            acc = evaluate(model, probe, task, max_digits)["accuracy"]
            checks.append([step, acc])
            if acc >= target_accuracy:
                break
    model.eval()
    return {"steps": step, "losses": losses, "probe_accuracy": checks}


# -- the GRPO loop --------------------------------------------------------------------------------


@dataclass
class GRPOConfig:
    steps: int = 60
    group_size: int = 8
    prompts_per_step: int = 8
    learning_rate: float = 1e-4
    kl_coefficient: float = 0.04
    clip_epsilon: float = 0.2
    updates_per_batch: int = 2
    temperature: float = 1.0
    grad_clip: float = 1.0


class GRPO:
    """The GRPO loop for one policy; `reference` is a frozen copy of the policy before RL."""

    def __init__(
        self,
        policy: nn.Module,
        task: Task,
        max_digits: int,
        rewards: dict[str, float],
        config: GRPOConfig,
        seed: int,
        replay: Replay | None = None,
    ) -> None:
        self.policy, self.task, self.max_digits, self.cfg = policy, task, max_digits, config
        self.replay = replay
        self.device = next(policy.parameters()).device
        self.reference: nn.Module | None = None
        if config.kl_coefficient > 0:
            self.reference = copy.deepcopy(policy).eval()
            for p in self.reference.parameters():
                p.requires_grad_(False)
        self.score = combined(rewards)
        self.rng = random.Random(seed)
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        self.opt = adamw(policy, config.learning_rate)

    def step(self) -> dict[str, Any]:
        """One GRPO step: sample groups, score, compute advantages, update; returns its log."""
        started = time.monotonic()
        c = self.cfg
        problems = sample(self.task, c.prompts_per_step, self.max_digits, self.rng)
        prompts = encode_prompts(problems, self.task, self.max_digits, _user_tokenizer(self.policy))
        prompts = prompts.repeat_interleave(c.group_size, dim=0).to(self.device)
        gen = generate(
            self.policy,
            prompts,
            self.task.max_new_tokens(self.max_digits),
            temperature=c.temperature,
            generator=self.gen,
            attention_mask=_prompt_mask(self.policy, prompts),
        )
        completions = to_completions(gen.completions, gen.lengths, _tokenizer(self.policy))
        rewards, exact, fmt = [], [], []
        for i, comp in enumerate(completions):
            problem = problems[i // c.group_size]
            total, _ = self.score(problem, comp)
            rewards.append(total)
            exact.append(exact_match(problem, comp))
            fmt.append(format_reward(problem, comp))
        r = torch.tensor(rewards, dtype=torch.float32, device=self.device)
        adv = group_advantages(r.view(c.prompts_per_step, c.group_size)).flatten()
        n = gen.completions.shape[1]
        mask = torch.arange(n, device=self.device)[None, :] < gen.lengths[:, None]  # (B, N)
        tokens = gen.tokens
        p = gen.prompt_len
        attention = _prompt_mask(self.policy, prompts, tokens.shape[1])  # the padding, as in sampling
        with torch.no_grad():
            ref = (
                completion_logprobs(self.reference, tokens, p, attention)
                if self.reference is not None
                else None
            )
        self.policy.train()
        stats: dict[str, float] = {}
        loss = torch.zeros(())
        old: Tensor | None = None
        for _ in range(c.updates_per_batch):
            logp = completion_logprobs(self.policy, tokens, p, attention)
            if old is None:  # the first update runs on the sampling policy itself: its log-probs are pi_old
                old = logp.detach()
            loss, stats = grpo_loss(
                logp, old, ref, adv, mask, clip_epsilon=c.clip_epsilon, kl_coefficient=c.kl_coefficient
            )
            self.opt.zero_grad(set_to_none=True)
            _with_replay(loss, self.policy, self.replay).backward()
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), c.grad_clip)
            self.opt.step()
        self.policy.eval()
        return {
            "reward_mean": float(r.mean()),
            "pass_at_1": sum(exact) / len(exact),
            "format_rate": sum(fmt) / len(fmt),
            "kl": stats.get("kl", 0.0),
            "clip_fraction": stats.get("clip_fraction", 0.0),
            "completion_length": float(gen.lengths.float().mean()),
            "loss": float(loss.detach()),
            "groups_with_signal": int((r.view(c.prompts_per_step, c.group_size).std(dim=1) > 0).sum()),
            "seconds": time.monotonic() - started,
        }

    def train(self, on_step: Callable[[int, dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        curve = []
        for i in range(self.cfg.steps):
            entry = {"step": i + 1, **self.step()}
            if not math.isfinite(entry["loss"]):
                raise RuntimeError(f"GRPO loss is not finite at step {i + 1}: {entry['loss']}")
            curve.append(entry)
            if on_step is not None:
                on_step(i + 1, entry)
        return curve
