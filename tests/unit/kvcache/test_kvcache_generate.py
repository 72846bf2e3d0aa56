"""Batched generation with and without a cache: parity, stopping, sampling, agreement rates."""

from __future__ import annotations

import pytest
import torch
from kvcache_support import corpus

from optrun.runtime.data import PAD
from optrun.runtime.kvcache import cache as kv
from optrun.runtime.kvcache.acceptance import AGREEMENT_MIN
from optrun.runtime.kvcache.generate import generate, left_pad, token_agreement
from optrun.runtime.model import ModelConfig, TinyLM

FP8_OK, FP8_WHY = kv.fp8_supported("cpu")


def _prompts(batch: int = 4, length: int = 24, offset: int = 0) -> torch.Tensor:
    val = corpus().val
    return torch.stack([val[offset + 501 * i : offset + 501 * i + length] for i in range(batch)])


@pytest.mark.parametrize("which", ["model", "trained_model"])
def test_greedy_with_the_cache_equals_greedy_without_it(which, request):
    model = request.getfixturevalue(which)
    prompt = _prompts()
    with_cache = generate(model, prompt, 40, eos_id=None)
    without = generate(model, prompt, 40, use_cache=False, eos_id=None)
    assert torch.equal(with_cache.tokens, without.tokens)
    assert torch.equal(with_cache.tokens[:, :24], prompt)


def test_greedy_parity_holds_for_a_grouped_query_attention_model():
    torch.manual_seed(3)
    model = TinyLM(
        ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=64)
    ).eval()
    prompt = torch.randint(0, 256, (3, 10))
    a = generate(model, prompt, 20, eos_id=None)
    b = generate(model, prompt, 20, use_cache=False, eos_id=None)
    assert torch.equal(a.tokens, b.tokens)
    assert generate(model, prompt, 20, cache_dtype="int8", eos_id=None).tokens.shape == (3, 30)


def test_generation_stops_a_row_at_eos_and_pads_after_it(model):
    prompt = _prompts(batch=3)
    free = generate(model, prompt, 12, eos_id=None)
    eos = int(free.completions[0, 4])  # row 0 emits this token at step 5: call it the EOS
    out = generate(model, prompt, 12, eos_id=eos)
    assert out.lengths[0] == 5
    assert torch.equal(out.completions[0, :5], free.completions[0, :5])
    assert (out.completions[0, 5:] == PAD).all()
    for row in range(3):  # every row stops at its own first EOS, or runs to the budget
        hits = (free.completions[row] == eos).nonzero()
        expected = int(hits[0]) + 1 if len(hits) else 12
        assert int(out.lengths[row]) == expected


def test_sampling_is_reproducible_by_generator_seed_and_top_k_1_is_greedy(model):
    prompt = _prompts()
    draws = [
        generate(model, prompt, 16, temperature=1.0, generator=torch.Generator().manual_seed(s), eos_id=None)
        for s in (5, 5, 6)
    ]
    assert torch.equal(draws[0].tokens, draws[1].tokens)
    assert not torch.equal(draws[0].tokens, draws[2].tokens)
    top1 = generate(
        model, prompt, 16, temperature=0.7, top_k=1, generator=torch.Generator().manual_seed(0), eos_id=None
    )
    assert torch.equal(top1.tokens, generate(model, prompt, 16, eos_id=None).tokens)


def test_sampled_decoding_with_the_cache_draws_what_decoding_without_it_draws(model):
    prompt = _prompts()
    a = generate(model, prompt, 16, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(1))
    b = generate(
        model,
        prompt,
        16,
        temperature=1.0,
        top_k=20,
        generator=torch.Generator().manual_seed(1),
        use_cache=False,
    )
    assert torch.equal(a.tokens, b.tokens)


@pytest.mark.parametrize(
    "dtype",
    [
        "fp16",
        "bf16",
        "int8",
        pytest.param("fp8", marks=pytest.mark.skipif(not FP8_OK, reason=f"fp8: {FP8_WHY}")),
    ],
)
def test_greedy_agreement_with_the_full_precision_cache_meets_the_stated_rate(trained_model, dtype):
    # Stated rates (acceptance.AGREEMENT_MIN), teacher-forced greedy picks on the trained tiny-lm:
    # fp16 >= 0.99, bf16 >= 0.98, int8 >= 0.98, fp8 >= 0.95.
    agree = token_agreement(trained_model, _prompts(batch=8, length=48, offset=7), 48, dtype, "fp32")
    assert agree["teacher_forced"] >= AGREEMENT_MIN[dtype], agree
    # Free-running outputs stay equal until a first flip, after which they may differ anywhere.
    assert agree["free_running"] >= agree["prefix"] - 1e-9, agree


def test_free_running_agreement_is_the_share_of_equal_tokens_and_prefix_the_run_before_the_first_flip(model):
    """A fresh model's near-ties make the coarse fp8 cache flip: the three rates then differ
    in the way their definitions say."""
    if not FP8_OK:
        pytest.skip(f"fp8: {FP8_WHY}")
    prompt = _prompts(batch=8, length=32, offset=3)
    agree = token_agreement(model, prompt, 32, "fp8", "fp32")
    ref = generate(model, prompt, 32, eos_id=None).completions
    cand = generate(model, prompt, 32, cache_dtype="fp8", eos_id=None).completions
    assert agree["free_running"] == pytest.approx(float((ref == cand).float().mean()))
    assert agree["prefix"] <= agree["free_running"] < 1.0
    assert agree["teacher_forced"] > agree["free_running"]


def test_a_custom_cache_factory_is_used_for_decoding(model):
    built = []

    def factory(batch: int, max_len: int):
        built.append((batch, max_len))
        return kv.make_cache(model.cfg, batch, max_len, "fp16")

    out = generate(model, _prompts(batch=2), 8, cache_factory=factory, eos_id=None)
    assert built == [(2, 32)]
    assert out.tokens.shape == (2, 32)


def test_left_pad_right_aligns_prompts_of_different_lengths():
    out = left_pad([[1, 2, 3], [4]], pad_id=PAD)
    assert out.tolist() == [[1, 2, 3], [PAD, PAD, 4]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"max_new_tokens": 600}, "exceeds the model's max_seq_len 512"),
        ({"max_new_tokens": 4, "cache_dtype": "int3"}, "allowed: fp32, fp16, bf16, int8, fp8"),
        ({"max_new_tokens": 4, "temperature": -1.0}, "temperature must be >= 0"),
    ],
)
def test_bad_generation_arguments_fail_with_a_message_naming_them(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(model, _prompts(batch=1), **kwargs)
