"""Batched autoregressive generation, with or without a KV cache, greedy or sampled.

Works on any model with the TinyLM forward signature `model(tokens, cache, start) -> logits`
(B, T, V) and a `cfg` with n_layers, n_kv_heads, head_dim and max_seq_len: the built-in model,
a kernel-patched copy of it, or a user's Llama-style model that follows the same contract.

With a cache the prompt is run once (prefill) and each later step feeds only the newest token
at its position; without one every step re-runs the whole sequence. Both produce the same
tokens under greedy decoding (the cache is exact in full precision), which the tests check.
Rows are decoded in lockstep: a row that has emitted EOS keeps being fed PAD, and its later
tokens are reported as PAD; generation stops when every row is done.

Prompts of one batch have one length; `left_pad` makes them so by prepending PAD. Given the
prompts' `attention_mask` (`optrun.runtime.lm.base.left_padding_mask`), a model that attends by
mask (a Hugging Face model: `CausalLM.attends_to_mask`) has that padding masked out and its
positions counted from each row's first real token, so a padded prompt decodes exactly as it
would alone (as transformers' generate does). TinyLM has no mask and sees the PAD tokens as part
of the prompt (callers that train on such prompts, like the RLVR stage, use the same padding in
training and evaluation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from optrun.runtime.data import EOS, PAD
from optrun.runtime.kvcache.cache import DENSE_DTYPES, KVCacheFactory, check_dtype, make_cache
from optrun.runtime.lm.base import autocast, call

_TORCH_TO_NAME = {dt: name for name, dt in DENSE_DTYPES.items()}


@dataclass
class Generation:
    """What `generate` returns."""

    tokens: Tensor  # (B, P + N): the prompt followed by the completion
    completions: Tensor  # (B, N): generated tokens, PAD after a row's EOS
    lengths: Tensor  # (B,): completion tokens up to and including EOS (N when no EOS came)
    prompt_len: int


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = PAD) -> Tensor:
    """(B, max_len) long tensor of prompts right-aligned with `pad_id` in front."""
    if not prompts:
        raise ValueError("prompts must not be empty")
    width = max(len(p) for p in prompts)
    out = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        out[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
    return out


def sample_next(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next tokens (B,) from last-position logits (B, V): argmax when temperature is 0, else a
    draw from softmax(logits / temperature) restricted to the top_k largest logits."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    scaled = logits.float() / temperature
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]  # (B, 1) smallest kept logit
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def model_cache_dtype(model: nn.Module) -> str:
    """The dense cache dtype that matches the model's parameters (its full-precision cache)."""
    param = next(model.parameters())
    return _TORCH_TO_NAME.get(param.dtype, "fp32")


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    use_cache: bool = True,
    cache_dtype: str | None = None,
    cache_factory: KVCacheFactory | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | Literal["model"] | None = "model",
    pad_id: int | Literal["model"] = "model",
    generator: torch.Generator | None = None,
    compute_dtype: torch.dtype = torch.float32,
    attention_mask: Tensor | None = None,
) -> Generation:
    """Generate up to `max_new_tokens` after `prompt` (B, P) for every row.

    use_cache: decode with a KV cache (`cache_factory(batch, max_len)` when given, else a
    preallocated cache of `cache_dtype`, by default the model's parameter dtype).
    temperature 0 is greedy; eos_id None never stops early (fixed-length timing runs); "model"
    (the default) takes EOS and PAD from the model's tokenizer. compute_dtype: the run's compute
    dtype (autocast below fp32). attention_mask: (B, P), 0 on the prompts' left padding (see the
    module docstring); used by models that attend by mask."""
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be a non-empty (B, P) tensor, got shape {tuple(prompt.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    tok = getattr(model, "tokenizer", None)
    if eos_id == "model":
        eos_id = tok.eos_id if tok is not None else EOS
    if pad_id == "model":
        pad_id = tok.pad_id if tok is not None else PAD
    cfg = model.cfg
    b, p = prompt.shape
    total = p + max_new_tokens
    if total > cfg.max_seq_len:
        raise ValueError(
            f"prompt length + max_new_tokens = {total} exceeds the model's max_seq_len {cfg.max_seq_len}"
        )
    device = next(model.parameters()).device
    prompt = prompt.to(device)
    cache = None
    if use_cache:
        if cache_factory is not None:
            cache = cache_factory(b, total)
        else:
            dtype = cache_dtype or model_cache_dtype(model)
            check_dtype(dtype)
            cache = make_cache(cfg, b, total, dtype, device)
    was_training = model.training
    model.eval()
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(autocast(device, compute_dtype))
        tokens = torch.empty((b, total), dtype=torch.long, device=device)
        tokens[:, :p] = prompt
        done = torch.zeros(b, dtype=torch.bool, device=device)
        lengths = torch.full((b,), max_new_tokens, dtype=torch.long, device=device)
        mask = None  # (B, total): the prompts' padding, then every generated position
        if attention_mask is not None and getattr(model, "attends_to_mask", False):
            ones = torch.ones((b, max_new_tokens), dtype=torch.long, device=device)
            mask = torch.cat((attention_mask.to(device).long(), ones), dim=1)
        logits = call(model, prompt, cache, 0, mask)[:, -1]
        n = 0
        for n in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, generator)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            tokens[:, p + n] = nxt
            if eos_id is not None:
                hit = (nxt == eos_id) & ~done
                lengths = torch.where(hit, torch.full_like(lengths, n + 1), lengths)
                done |= hit
                if bool(done.all()):
                    break
            if n + 1 == max_new_tokens:
                break
            if cache is not None:
                logits = call(model, nxt[:, None], cache, p + n, mask)[:, -1]
            else:
                logits = call(model, tokens[:, : p + n + 1], None, 0, mask)[:, -1]
        used = p + n + 1
        tokens[:, used:] = pad_id
    finally:
        stack.close()
        model.train(was_training)
    return Generation(tokens=tokens, completions=tokens[:, p:], lengths=lengths, prompt_len=p)


@torch.no_grad()
def token_agreement(
    model: nn.Module,
    prompt: Tensor,
    max_new_tokens: int,
    cache_dtype: str,
    reference_dtype: str | None = None,
) -> dict[str, float]:
    """How often greedy decoding with a `cache_dtype` cache picks the reference cache's tokens.

    free_running: share of completion positions where the two greedy outputs are equal (after a
    first disagreement the contexts differ, so this counts every later difference too).
    teacher_forced: share of steps where the cache_dtype decoder, fed the reference's tokens,
    picks the same next token (each step judged on the same context: the per-step fidelity).
    prefix: mean share of each completion before its first disagreement."""
    ref = generate(model, prompt, max_new_tokens, cache_dtype=reference_dtype, eos_id=None)
    cand = generate(model, prompt, max_new_tokens, cache_dtype=cache_dtype, eos_id=None)
    same = cand.completions == ref.completions  # (B, N)
    first_diff = torch.where(same.all(dim=1), max_new_tokens, (~same).float().argmax(dim=1))
    # Teacher forcing: prefill the prompt, then feed the reference tokens one at a time.
    cfg = model.cfg
    b, p = prompt.shape
    device = next(model.parameters()).device
    cache = make_cache(cfg, b, p + max_new_tokens, cache_dtype, device)
    was_training = model.training
    model.eval()
    try:
        picks = [model(prompt.to(device), cache, 0)[:, -1].argmax(-1)]
        for n in range(max_new_tokens - 1):
            picks.append(model(ref.completions[:, n : n + 1], cache, p + n)[:, -1].argmax(-1))
    finally:
        model.train(was_training)
    forced = torch.stack(picks, dim=1) == ref.completions
    return {
        "free_running": float(same.float().mean()),
        "teacher_forced": float(forced.float().mean()),
        "prefix": float(first_diff.float().mean() / max_new_tokens),
    }
