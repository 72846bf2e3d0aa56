"""The runtime's foundations: the byte tokenizer and corpus, the reference model's layers, and
hardware detection."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from optrun.runtime import data, hardware, model
from tests.unit.runtime.runtime_support import pydoc_corpus

# -- tokenizer and corpus ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "plain ascii", "naïve café — ünïcode ✓", "tabs\tand\nnewlines"])
def test_byte_tokenizer_round_trips_any_text(text: str) -> None:
    ids = data.encode(text, bos=True, eos=True)
    assert ids[0] == data.BOS and ids[-1] == data.EOS
    assert all(0 <= i < data.VOCAB_SIZE for i in ids)
    assert data.decode(ids) == text


def test_decode_stops_at_end_of_sequence_and_drops_special_tokens() -> None:
    assert data.decode([data.BOS, *b"ab", data.PAD, *b"c", data.EOS, *b"ignored"]) == "abc"


def test_unknown_dataset_names_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'wiki'; allowed: pydoc"):
        data.load_text("wiki")


def test_corpus_holds_out_a_tail_never_trained_on() -> None:
    corpus = pydoc_corpus()
    total = len(corpus.train) + len(corpus.val)
    assert total > 400_000  # the CPython documentation text, about 465 KB
    assert len(corpus.val) == pytest.approx(0.1 * total, abs=1)
    full = torch.tensor(data.encode(data.load_text("pydoc")))
    assert torch.equal(torch.cat([corpus.train, corpus.val]), full)


def test_batches_are_next_token_pairs_from_the_requested_split() -> None:
    corpus = pydoc_corpus()
    x, y = corpus.batch("val", 32, 5, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 32)
    assert torch.equal(x[:, 1:], y[:, :-1])
    # Every window lies in the held-out split.
    val = corpus.val.tolist()
    text = bytes(val).decode("latin-1")
    for row in x.tolist():
        assert bytes(row).decode("latin-1") in text


def test_batch_order_depends_only_on_seed_and_epoch() -> None:
    corpus = pydoc_corpus()

    def first_batch(seed: int, epoch: int) -> torch.Tensor:
        return corpus.batch("train", 16, 4, corpus.epoch_generator(seed, epoch))[0]

    assert torch.equal(first_batch(1, 0), first_batch(1, 0))
    assert not torch.equal(first_batch(1, 0), first_batch(1, 1))
    assert not torch.equal(first_batch(1, 0), first_batch(2, 0))


def test_eval_batches_are_the_same_every_time() -> None:
    corpus = pydoc_corpus()
    a, b = corpus.eval_batches(16, 2, 3), corpus.eval_batches(16, 2, 3)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True))


# -- the reference model -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> model.TinyLM:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return model.build_model("tiny-lm").eval()


def test_unknown_model_names_the_presets() -> None:
    with pytest.raises(ValueError, match="allowed: tiny-lm, small-lm, base-lm"):
        model.build_model("huge-lm")


def test_loss_is_the_cross_entropy_of_the_logits(tiny: model.TinyLM) -> None:
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, 1)
    with torch.no_grad():
        logits = tiny(x)
        assert logits.shape == (2, 12, tiny.cfg.vocab_size)
        expected = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        torch.testing.assert_close(tiny.loss(x, y), expected, rtol=1e-5, atol=1e-6)


def test_model_is_causal(tiny: model.TinyLM) -> None:
    x = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(2))
    changed = x.clone()
    changed[0, 7] = (x[0, 7] + 1) % 256
    with torch.no_grad():
        a, b = tiny(x), tiny(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_rms_norm_matches_its_formula() -> None:
    norm = model.RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(3))
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected, rtol=1e-6, atol=1e-6)


def test_rotary_embedding_rotates_pairs_and_keeps_norms() -> None:
    cos, sin = model.rope_tables(6, 8, 10000.0)
    x = torch.randn(1, 2, 6, 8, generator=torch.Generator().manual_seed(4))
    y = model.apply_rotary(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])  # position 0: angle 0
    # The pair (x[i], x[i + D/2]) is rotated by angle t * f_i: check one pair by hand.
    t, i = 3, 1
    angle = t * (1.0 / 10000.0 ** (2 * i / 8))
    a, b = x[0, 0, t, i], x[0, 0, t, i + 4]
    expected = torch.tensor(
        [
            a * torch.cos(torch.tensor(angle)) - b * torch.sin(torch.tensor(angle)),
            b * torch.cos(torch.tensor(angle)) + a * torch.sin(torch.tensor(angle)),
        ]
    )
    torch.testing.assert_close(
        torch.stack([y[0, 0, t, i], y[0, 0, t, i + 4]]), expected, rtol=1e-5, atol=1e-6
    )


# -- hardware --------------------------------------------------------------------------------------


def test_cpu_detection_describes_the_machine() -> None:
    device, info = hardware.detect("cpu")
    assert device.type == "cpu"
    assert info.device == "cpu" and info.device_class == "cpu"
    assert info.name and info.memory_bytes > 0 and info.cpu_count >= 1
    assert info.dtypes["fp32"] is True
    assert info.triton_native is False
    assert info.torch_version == torch.__version__


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-40GB", "a100"),
        ("NVIDIA A10G", "a10"),
        ("NVIDIA L40S", "l40s"),
        ("NVIDIA L4", "l4"),
        ("Tesla T4", "gpu"),
    ],
)
def test_gpu_names_map_to_device_classes(name: str, cls: str) -> None:
    assert hardware.device_class(name, "cuda") == cls
    assert hardware.device_class(name, "cpu") == "cpu"


def test_optrun_device_environment_variable_chooses_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPTRUN_DEVICE", "cpu")
    device, _ = hardware.detect()
    assert device.type == "cpu"
