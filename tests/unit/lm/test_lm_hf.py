"""Hugging Face causal LMs behind optrun's model interface, on real transformers code.

- Loading: local files only, the family's patch sites found (norms, gated MLPs, rotary, loss).
- The loss through `loss_fn` (hidden states against the head's weight) is transformers' own
  causal-LM loss; logits are its logits.
- Decoding with optrun's caches through transformers' Cache interface: greedy with the dense
  cache equals decoding without a cache, token for token; `hf.generate(cache=OptrunCache(...))`
  equals transformers' own generate; the int8 cache agrees nearly always.
- Kernels: patched with optrun's Triton kernels (in Triton's interpreter), a model of each
  family computes the unpatched logits, loss and gradients; the kernel stage in triton mode
  judges that real swap (and fails kernels.parity on a wrong kernel), where auto mode on a CPU
  would compare eager with eager; patching one model's rotary never changes another model of
  the same family in the process.
- RLVR on a HF model: left-padded prompts are masked (a padded prompt computes what it computes
  alone); prompts go through the chat template unless chatTemplate is false.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from optrun.api.v1alpha1 import ModelSource
from optrun.runtime.kernels.parity import MODEL_TOLERANCE, compare
from optrun.runtime.kernels.patcher import find_ops, patch_model
from optrun.runtime.kvcache.cache import DenseKVCache, QuantizedKVCache
from optrun.runtime.kvcache.generate import generate
from optrun.runtime.lm import hf

CPU = torch.device("cpu")
TOL = MODEL_TOLERANCE[torch.float32]


def load(path: Path) -> hf.HFCausalLM:
    return hf.load(ModelSource(path=str(path)), precision="fp32", device=CPU).eval()


def tokens(model: hf.HFCausalLM, text: str = "def add(a, b):\n    return a + b\n") -> torch.Tensor:
    return torch.tensor([model.tokenizer.encode(text, bos=True)])


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_a_saved_model_loads_with_its_dims_and_every_patch_site(
    hf_dirs: dict[str, Path], family: str
) -> None:
    model = load(hf_dirs[family])
    assert model.family == family
    assert (model.cfg.n_layers, model.cfg.n_kv_heads, model.cfg.head_dim) == (2, 2, 16)
    sites = {binding.op for _module, binding in find_ops(model).values()}
    assert sites == {"rms_norm", "swiglu", "rope", "cross_entropy"}
    # Five norms (two per layer, one final), one MLP per layer, one rotary site, one loss.
    counts: dict[str, int] = {}
    for _module, binding in find_ops(model).values():
        counts[binding.op] = counts.get(binding.op, 0) + 1
    assert counts == {"rms_norm": 5, "swiglu": 2, "rope": 1, "cross_entropy": 1}


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_loss_and_logits_are_transformers_own(hf_dirs: dict[str, Path], family: str) -> None:
    model = load(hf_dirs[family])
    x = tokens(model)
    with torch.no_grad():
        theirs = model.hf(input_ids=x, labels=x)  # transformers shifts the labels itself
        ours = model.loss(x[:, :-1], x[:, 1:])
        logits = model(x)
    assert (m := compare(logits, theirs.logits, TOL, "logits")) is None, str(m)
    assert (m := compare(ours, theirs.loss, TOL, "loss")) is None, str(m)
    expected = F.cross_entropy(theirs.logits[0, :-1], x[0, 1:])
    assert abs(float(ours) - float(expected)) < 1e-5


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_cached_greedy_decoding_equals_decoding_without_a_cache(
    hf_dirs: dict[str, Path], family: str
) -> None:
    model = load(hf_dirs[family])
    prompt = tokens(model).repeat(3, 1)
    cached = generate(model, prompt, 12, cache_dtype="fp32", eos_id=None)
    uncached = generate(model, prompt, 12, use_cache=False, eos_id=None)
    assert torch.equal(cached.tokens, uncached.tokens)
    int8 = generate(model, prompt, 12, cache_dtype="int8", eos_id=None)
    assert float((int8.completions == cached.completions).float().mean()) >= 0.9


def test_transformers_generate_runs_on_optrun_caches(hf_dirs: dict[str, Path]) -> None:
    model = load(hf_dirs["llama"])
    prompt = tokens(model)
    c = model.cfg
    with torch.no_grad():
        theirs = model.hf.generate(
            prompt, max_new_tokens=10, do_sample=False, pad_token_id=model.tokenizer.pad_id
        )
        store = DenseKVCache(c.n_layers, 1, c.n_kv_heads, c.head_dim, 64, "fp32")
        ours = model.hf.generate(
            prompt,
            cache=hf.OptrunCache(store),
            max_new_tokens=10,
            do_sample=False,
            pad_token_id=model.tokenizer.pad_id,
        )
        q = QuantizedKVCache(c.n_layers, 1, c.n_kv_heads, c.head_dim, 64, "int8")
        quantized = model.hf.generate(
            prompt,
            cache=hf.OptrunCache(q),
            max_new_tokens=10,
            do_sample=False,
            pad_token_id=model.tokenizer.pad_id,
        )
    assert torch.equal(ours, theirs)
    assert quantized.shape == theirs.shape
    # The int8 cache holds what the model wrote: its keys dequantize close to the dense ones.
    k_dense, k_int8 = store.k[0, :, :, :12].float(), q._keys(0, 0, 1, torch.float32)[:, :, :12]
    assert float((k_int8 - k_dense).norm() / k_dense.norm()) < 0.02


def test_a_left_padded_prompt_computes_what_it_computes_alone(hf_dirs: dict[str, Path]) -> None:
    """RLVR batches prompts of different lengths by left padding: with the padding's attention
    mask (and positions from each row's first real token) a padded prompt's logits, loss,
    completion log-probs and greedy continuation are those of the prompt alone."""
    from optrun.runtime.kvcache.generate import left_pad
    from optrun.runtime.lm.base import left_padding_mask
    from optrun.runtime.rlvr.grpo import completion_logprobs

    model = load(hf_dirs["llama"])
    pad = model.tokenizer.pad_id
    short, long = tokens(model, "x = 1")[0], tokens(model)[0]
    batch = left_pad([short.tolist(), long.tolist()], pad)
    n = len(short)
    assert batch.shape[1] - n >= 10  # the short row is mostly padding
    mask = left_padding_mask(model, batch, pad)
    assert mask is not None and mask[0].tolist() == [0] * (batch.shape[1] - n) + [1] * n

    with torch.no_grad():
        padded, alone = model(batch, attention_mask=mask)[0, -n:], model(short[None])[0]
        unmasked = model(batch)[0, -n:]
    assert (m := compare(padded, alone, TOL, "logits")) is None, str(m)
    # Without the mask the model attends to the padding: the check above can fail.
    assert compare(unmasked, alone, TOL, "logits") is not None

    # The loss (through the fused-loss path) of the padded row, pads ignored, is the loss alone.
    targets = torch.full_like(batch[:1], -100)
    targets[0, -n:-1] = short[1:]
    with torch.no_grad():
        padded_loss = model.loss(batch[:1], targets, mask[:1])
        alone_loss = model.loss(short[None, :-1], short[None, 1:])
    assert (m := compare(padded_loss, alone_loss, TOL, "loss")) is None, str(m)

    for use_cache in (True, False):
        together = generate(model, batch, 12, eos_id=None, use_cache=use_cache, attention_mask=mask)
        for row, prompt in enumerate((short, long)):
            single = generate(model, prompt[None], 12, eos_id=None, use_cache=use_cache)
            assert torch.equal(together.completions[row], single.completions[0]), (use_cache, row)

    # What GRPO trains on: the completion's log-probs under the padded batch are those alone.
    full = left_padding_mask(model, batch, pad, together.tokens.shape[1])
    with torch.no_grad():
        logp = completion_logprobs(model, together.tokens, batch.shape[1], full)[0]
        single = generate(model, short[None], 12, eos_id=None)
        logp_alone = completion_logprobs(model, single.tokens, n)[0]
    assert (m := compare(logp, logp_alone, TOL, "log-probs")) is None, str(m)


def test_the_warm_up_and_grpo_train_a_hf_model_on_masked_prompts(hf_dirs: dict[str, Path]) -> None:
    import random
    from dataclasses import dataclass

    from optrun.runtime.lm.base import fingerprint
    from optrun.runtime.rlvr.grpo import GRPO, GRPOConfig, supervised_warmup
    from optrun.runtime.rlvr.tasks import Problem, Task, encode_prompts, sample

    @dataclass(frozen=True)
    class Unpadded(Task):
        """Addition without zero-padded operands: prompts of different lengths, so batches are padded."""

        def problem(self, a: int, b: int, max_digits: int) -> Problem:
            return Problem(prompt=f"{a}+{b}=", answer=str(a + b), task=self.name)

    task = Unpadded("addition", "+", lambda a, b: a + b, lambda d: d + 1)
    model = load(hf_dirs["llama"])
    prompts = encode_prompts(sample(task, 16, 2, random.Random(0)), task, 2, model.tokenizer)
    assert bool((prompts[:, 0] == model.tokenizer.pad_id).any())  # some rows are left-padded
    before = fingerprint(model)
    warm = supervised_warmup(model, task, 2, steps=2, batch_size=8, learning_rate=1e-3, rng=random.Random(1))
    assert all(torch.isfinite(torch.tensor(warm["losses"])))
    config = GRPOConfig(steps=1, group_size=4, prompts_per_step=4)
    (entry,) = GRPO(model, task, 2, {"exact-match": 1.0, "format": 0.1}, config, 0).train()
    assert torch.isfinite(torch.tensor(entry["loss"])) and entry["kl"] >= 0.0
    assert fingerprint(model) != before


@pytest.mark.parametrize("chat_template", [None, True, False])
def test_rlvr_prompts_go_through_the_chat_template_unless_it_is_switched_off(
    chat_model_dir: Path, chat_template: bool | None
) -> None:
    from optrun.runtime.rlvr.tasks import encode_prompts, get_task

    task = get_task("addition")
    problems = [task.problem(12, 7, 2), task.problem(3, 45, 2)]
    source = ModelSource(path=str(chat_model_dir), chatTemplate=chat_template)
    model = hf.load(source, precision="fp32", device=CPU)
    tok = model.tokenizer.tok
    assert tok.chat_template  # the fixture's tokenizer has one
    ids = encode_prompts(problems, task, 2, model.tokenizer)
    for row, problem in zip(ids.tolist(), problems, strict=True):
        if chat_template is False:
            # chatTemplate: false: BOS and the problem's own tokens, no role headers.
            expected = [model.tokenizer.bos_id, *tok.encode(problem.prompt, add_special_tokens=False)]
        else:
            # Unset or true: the ids transformers' apply_chat_template gives a user turn with
            # the assistant's header after it.
            turn = [{"role": "user", "content": problem.prompt}]
            expected = tok.apply_chat_template(turn, add_generation_prompt=True, tokenize=True)["input_ids"]
            assert tok.decode(expected).startswith("<|user|>\n") and "<|assistant|>" in tok.decode(expected)
        assert row == expected


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_triton_kernels_on_a_hf_model_compute_the_unpatched_model(
    hf_dirs: dict[str, Path], family: str
) -> None:
    base = load(hf_dirs[family]).train()
    fused = copy.deepcopy(base)
    report = patch_model(fused, "triton")
    assert report.counts() == {
        "swiglu": {"triton": 2},
        "rms_norm": {"triton": 5},
        "cross_entropy": {"triton": 1},
        "rope": {"triton": 1},
    }
    assert_computes_the_same(fused, base)


def assert_computes_the_same(fused: hf.HFCausalLM, base: hf.HFCausalLM) -> None:
    """The patched model's logits, loss and every gradient are the unpatched model's, within
    the model tolerance of fp32."""
    assert fused.state_dict().keys() == base.state_dict().keys()
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 500, (2, 24), generator=gen)
    y = torch.randint(0, 500, (2, 24), generator=gen)
    losses = []
    for model in (base, fused):
        model.zero_grad()
        loss = model.loss(x, y)
        loss.backward()
        losses.append(loss.detach())
    assert (m := compare(losses[1], losses[0], TOL, "loss")) is None, str(m)
    assert (m := compare(fused(x), base(x), TOL, "logits")) is None, str(m)
    grads = dict(base.named_parameters())
    for name, p in fused.named_parameters():
        assert p.grad is not None and grads[name].grad is not None, name
        assert (m := compare(p.grad, grads[name].grad, TOL, f"grad {name}")) is None, str(m)


def test_liger_kernels_on_a_hf_model_compute_the_unpatched_model(hf_dirs: dict[str, Path]) -> None:
    """optrun's Liger candidate, executed: Liger-Kernel's rotary and fused linear cross-entropy
    run in Triton's interpreter, so on a CPU they patch a Llama and are held to the unpatched
    model. (Liger's RMSNorm and SwiGLU kernels do not run in the interpreter, which hands them
    Python floats where they call `.to`; tests/gpu runs all four on CUDA.)"""
    base = load(hf_dirs["llama"]).train()
    fused = copy.deepcopy(base)
    report = patch_model(fused, {"rope": "liger", "cross_entropy": "liger"})
    assert report.counts() == {
        "swiglu": {"eager": 2},
        "rms_norm": {"eager": 5},
        "cross_entropy": {"liger": 1},
        "rope": {"liger": 1},
    }
    assert {e["to"] for e in report.swapped.values()} == {"LigerRotaryApply", "LigerLMHeadLoss"}
    assert_computes_the_same(fused, base)


@pytest.mark.parametrize("broken", [False, True], ids=["kernels", "a-wrong-rms-norm-kernel"])
def test_the_kernel_stage_in_triton_mode_judges_a_real_swap_on_a_hf_model(
    hf_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broken: bool
) -> None:
    """On a CPU, auto mode keeps eager and the stage's parity compares eager with eager; with
    mode triton (kernels in Triton's interpreter) it judges the real swap on the user's model,
    and a kernel that computes something else fails kernels.parity."""
    from optrun.api.v1alpha1 import OptimizationRunSpec
    from optrun.runtime import kernels
    from optrun.runtime.context import RunContext
    from optrun.runtime.data import Corpus
    from optrun.runtime.hardware import detect
    from optrun.runtime.kernels import acceptance
    from optrun.runtime.kernels.modules import TritonRMSNorm

    if broken:  # 1% too large: a kernel bug far below what a crash or NaN would show
        right = TritonRMSNorm.forward
        monkeypatch.setattr(TritonRMSNorm, "forward", lambda self, x: right(self, x) * 1.01)
    model = load(hf_dirs["llama"]).train()
    spec = OptimizationRunSpec.model_validate(
        {
            "workload": {"model": {"path": str(hf_dirs["llama"])}, "sequenceLength": 32, "batchSize": 4},
            "optimizations": {"kernels": {"enabled": True, "mode": "triton"}},
        }
    )
    device, hardware = detect("cpu")
    ctx = RunContext(
        spec=spec,
        device=device,
        hardware=hardware,
        corpus=Corpus.build("pydoc", model.tokenizer, sequence_length=32),
        model_factory=lambda: model,
        output_dir=tmp_path,
        model=model,
    )
    kernels.run(ctx, model)
    k = ctx.results["kernels"]
    assert k["swapped"]["counts"] == {
        "rms_norm": {"triton": 5},
        "swiglu": {"triton": 2},
        "rope": {"triton": 1},
        "cross_entropy": {"triton": 1},
    }
    check = acceptance.parity(ctx)
    assert k["parity"]["passed"] is check.passed is (not broken), k["parity"]
    if broken:
        assert k["parity"]["reason"].startswith("logits: ")
    else:
        assert 0 < k["parity"]["worstRelativeDifference"] < 1e-4  # a real swap: not bit-identical


def test_patching_one_models_rotary_leaves_another_of_the_same_family_alone(hf_dirs: dict[str, Path]) -> None:
    calls: list[str] = []
    patched, other = load(hf_dirs["llama"]), load(hf_dirs["llama"])
    original = patched.rope.fn

    def spy(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1):
        calls.append("patched")
        return original(q, k, cos, sin, unsqueeze_dim)

    patched.rope.fn = spy
    x = tokens(patched)
    with torch.no_grad():
        other(x)
        assert calls == []  # the other model's forward went through its own site
        patched(x)
    assert calls == ["patched"] * patched.cfg.n_layers


def test_a_family_outside_the_table_runs_unpatched_with_no_look_alike_matching(tmp_path: Path) -> None:
    import transformers

    from optrun.runtime.lm.example import train_tokenizer

    tok = train_tokenizer()
    config = transformers.GemmaConfig(
        vocab_size=576,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=128,
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = load(tmp_path)
    # Gemma's norm scales by (1 + weight): an RMSNorm look-alike must not be swapped for optrun's.
    assert {b.op for _m, b in find_ops(model).values()} == {"cross_entropy"}


def test_a_factory_result_that_is_no_model_names_the_field() -> None:
    with pytest.raises(
        hf.SourceError, match=r"spec\.workload\.model: the factory returned dict; allowed: an optrun CausalLM"
    ):
        hf.wrap({"not": "a model"}, "spec.workload.model")
