"""The patcher: which layers it swaps, what it reports, and that the patched model computes the
same function (logits, loss, every gradient) with the same state_dict and shared parameters."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optrun.runtime.kernels.modules import FusedLMHeadLoss, TritonRMSNorm, TritonRotaryEmbedding, TritonSwiGLU
from optrun.runtime.kernels.ops._launch import TritonUnavailableError
from optrun.runtime.kernels.parity import MODEL_TOLERANCE, compare
from optrun.runtime.kernels.patcher import Binding, find_ops, patch_model
from optrun.runtime.model import RMSNorm, SwiGLU, build_model


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return build_model("tiny-lm")


def batch(seed: int = 1) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (2, 24), generator=gen), torch.randint(0, 256, (2, 24), generator=gen)


def run(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    logits = model(x)
    loss = model.loss(x, y)
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_triton_patch_swaps_every_layer_of_the_builtin_model_and_reports_it() -> None:
    model = tiny()
    report = patch_model(model, "triton")
    assert report.counts() == {
        "rms_norm": {"triton": 5},
        "rope": {"triton": 2},
        "swiglu": {"triton": 2},
        "cross_entropy": {"triton": 1},
    }
    assert isinstance(model.norm, TritonRMSNorm)
    assert isinstance(model.layers[1].ffn, TritonSwiGLU)
    assert isinstance(model.layers[0].attn.rotary, TritonRotaryEmbedding)
    assert isinstance(model.loss_fn, FusedLMHeadLoss)
    assert report.swapped["layers.1.ffn"] == {
        "op": "swiglu",
        "choice": "triton",
        "from": "SwiGLU",
        "to": "TritonSwiGLU",
    }
    assert find_ops(model) == {}  # nothing left to swap: patching is one-way


def test_patched_model_shares_parameters_and_state_dict_with_the_original() -> None:
    model = tiny()
    before = {n: p for n, p in model.named_parameters()}
    state = copy.deepcopy(model.state_dict())
    patch_model(model, "triton")
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    assert all(after[n] is before[n] for n in before)  # an optimizer built before patching still works
    assert model.state_dict().keys() == state.keys()
    reloaded = tiny()
    patch_model(reloaded, "triton")
    reloaded.load_state_dict(state)  # checkpoints interchange both ways
    tiny().load_state_dict(model.state_dict())


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast"])
def test_patched_tiny_model_matches_unpatched_logits_loss_and_gradients(precision: str) -> None:
    x, y = batch()
    base, fused = tiny(), tiny()
    patch_model(
        fused, {"rms_norm": "triton", "swiglu": "triton", "rope": "triton", "cross_entropy": "triton"}
    )
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "fp32")
    with amp:
        expected = run(base, x, y)
    with amp:
        actual = run(fused, x, y)
    tol = MODEL_TOLERANCE[dtype]
    assert (m := compare(actual[0], expected[0], tol, "logits")) is None, str(m)
    assert (m := compare(actual[1], expected[1], tol, "loss")) is None, str(m)
    for name, grad in expected[2].items():
        assert (m := compare(actual[2][name], grad, tol, f"grad {name}")) is None, str(m)


def test_eager_choice_leaves_the_model_untouched_and_says_so() -> None:
    model = tiny()
    report = patch_model(model, {"rms_norm": "eager"})
    assert report.swapped == {}
    assert report.counts()["rms_norm"] == {"eager": 5}
    assert report.counts()["swiglu"] == {"eager": 2}  # operations left out stay eager
    assert type(model.norm) is RMSNorm and "forward" not in vars(model.norm)


class LlamaRMSNorm(nn.Module):
    """Hugging Face's layout: weight and variance_epsilon; rounds to the input dtype before w."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(dim))
        self.variance_epsilon = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * xf.to(x.dtype)


class LlamaMLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ScaleNorm(nn.Module):
    """A norm with its own attribute names: found only through a declared mapping."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(1 + 0.1 * torch.randn(dim))
        self.epsilon = 1e-5

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.epsilon) * self.scale


class ForeignBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(48)
        self.mlp = LlamaMLP(48, 100)
        self.post = ScaleNorm(48)

    def forward(self, x: Tensor) -> Tensor:
        return self.post(x + self.mlp(self.input_layernorm(x)))


def test_llama_style_layers_are_recognised_by_structure_and_declared_ones_by_mapping() -> None:
    torch.manual_seed(2)
    base = ForeignBlock()
    fused = copy.deepcopy(base)
    report = patch_model(
        fused, "triton", mapping={ScaleNorm: Binding("rms_norm", {"weight": "scale", "eps": "epsilon"})}
    )
    assert {p: e["to"] for p, e in report.swapped.items()} == {
        "input_layernorm": "TritonRMSNorm",
        "mlp": "TritonSwiGLU",
        "post": "TritonRMSNorm",
    }
    assert fused.state_dict().keys() == base.state_dict().keys()
    x = torch.randn(3, 11, 48, requires_grad=True)
    xf = x.detach().clone().requires_grad_()
    yb, yf = base(x), fused(xf)
    (gb,) = torch.autograd.grad(yb.square().sum(), x)
    (gf,) = torch.autograd.grad(yf.square().sum(), xf)
    tol = MODEL_TOLERANCE[torch.float32]
    assert (m := compare(yf, yb, tol, "output")) is None, str(m)
    assert (m := compare(gf, gb, tol, "input gradient")) is None, str(m)


def test_a_module_without_the_llama_structure_is_not_swapped() -> None:
    class GeluMLP(LlamaMLP):
        def __init__(self) -> None:
            super().__init__(8, 16)
            self.act_fn = nn.GELU()  # not SwiGLU: the fused gate would compute something else

    assert find_ops(GeluMLP()) == {}


@pytest.mark.slow  # a first torch.compile on a CPU takes seconds
def test_compile_choice_keeps_type_and_state_dict_and_computes_the_same() -> None:
    torch.manual_seed(3)
    base = SwiGLU(16, 40)
    fused = copy.deepcopy(base)
    report = patch_model(fused, {"swiglu": "compile"})
    assert type(fused) is SwiGLU and report.swapped[""]["to"] == "SwiGLU (compiled)"
    x = torch.randn(4, 16)
    assert (m := compare(fused(x), base(x), MODEL_TOLERANCE[torch.float32], "output")) is None, str(m)


def test_bad_choices_and_bindings_are_refused_with_the_allowed_values() -> None:
    with pytest.raises(ValueError, match="choices: unknown operation 'layernorm'; allowed: rms_norm"):
        patch_model(tiny(), {"layernorm": "triton"})
    with pytest.raises(
        ValueError, match=r"choices\['rope'\]: unknown choice 'cuda'; allowed: triton, liger, compile, eager"
    ):
        patch_model(tiny(), {"rope": "cuda"})
    with pytest.raises(
        ValueError, match=r"Binding\.attrs for swiglu: expected roles gate, up, down; missing \[.down.\]"
    ):
        Binding("swiglu", {"gate": "a", "up": "b"})


def test_triton_choice_on_a_cpu_without_the_interpreter_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(TritonUnavailableError, match=r"triton needs a CUDA device.*TRITON_INTERPRET=1"):
        patch_model(tiny(), "triton")


def test_fused_head_loss_is_a_drop_in_for_the_eager_loss_function() -> None:
    gen = torch.Generator().manual_seed(4)
    h, w = torch.randn(2, 5, 16, generator=gen), torch.randn(30, 16, generator=gen)
    y = torch.randint(0, 30, (2, 5), generator=gen)
    expected = F.cross_entropy((h.reshape(-1, 16) @ w.t()), y.reshape(-1))
    got = FusedLMHeadLoss()(h, w, y)
    assert (m := compare(got, expected, MODEL_TOLERANCE[torch.float32], "loss")) is None, str(m)
