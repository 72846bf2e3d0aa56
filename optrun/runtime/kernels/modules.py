"""The modules a model uses to run the Triton kernels: drop-in replacements for the layers of
optrun.runtime.model (and of Llama-style models that declare their attribute names).

Each replacement keeps the replaced module's parameter and buffer names, and `from_module`
shares the very same Parameter and buffer objects, so a state_dict saved from either loads into
the other and an optimizer built before patching still updates the weights the model uses.
The kernels themselves live in `ops/`; the patcher (`patcher.py`) decides which layers to swap.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from optrun.runtime.kernels.ops.cross_entropy import IGNORE_INDEX, fused_linear_cross_entropy
from optrun.runtime.kernels.ops.rms_norm import rms_norm
from optrun.runtime.kernels.ops.rope import rotary
from optrun.runtime.kernels.ops.swiglu import swiglu


class TritonRMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight with the Triton kernel. The weight keeps the name
    of the module it replaces (`weight` in RMSNorm and Hugging Face's norms)."""

    optrun_fused = True  # the patcher never matches a fused module again

    def __init__(self, dim: int, eps: float = 1e-5, weight_name: str = "weight") -> None:
        super().__init__()
        self.eps = eps
        self._weight_name = weight_name
        self.register_parameter(weight_name, nn.Parameter(torch.ones(dim)))

    @classmethod
    def from_module(cls, module: nn.Module, *, weight: str = "weight", eps: str = "eps") -> TritonRMSNorm:
        """Wrap `module`'s weight (shared, not copied); `weight` and `eps` name its attributes."""
        w = getattr(module, weight)
        new = cls(w.shape[0], float(getattr(module, eps)), weight)
        setattr(new, weight, w)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, getattr(self, self._weight_name), self.eps)

    def extra_repr(self) -> str:
        return f"{getattr(self, self._weight_name).shape[0]}, eps={self.eps}"


class TritonSwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with the fused Triton gate; the projections keep their names
    (w1, w3, w2 in the built-in model; gate_proj, up_proj, down_proj in Llama-style models)."""

    optrun_fused = True  # the patcher never matches a fused module again

    def __init__(
        self,
        gate: nn.Module,
        up: nn.Module,
        down: nn.Module,
        names: tuple[str, str, str] = ("w1", "w3", "w2"),
    ) -> None:
        super().__init__()
        self._names = names
        for name, layer in zip(names, (gate, up, down), strict=True):
            self.add_module(name, layer)

    @classmethod
    def from_module(
        cls, module: nn.Module, *, gate: str = "w1", up: str = "w3", down: str = "w2"
    ) -> TritonSwiGLU:
        """Reuse `module`'s projection layers (shared, not copied)."""
        return cls(getattr(module, gate), getattr(module, up), getattr(module, down), (gate, up, down))

    def forward(self, x: Tensor) -> Tensor:
        gate, up, down = (getattr(self, n) for n in self._names)
        return down(swiglu(gate(x), up(x)))


class TritonRotaryEmbedding(nn.Module):
    """Rotary embedding of q and k with the Triton kernel; holds the same (non-persistent)
    cos/sin tables (max_seq_len, head_dim / 2) as RotaryEmbedding."""

    optrun_fused = True  # the patcher never matches a fused module again

    def __init__(self, cos: Tensor, sin: Tensor) -> None:
        super().__init__()
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @classmethod
    def from_module(cls, module: nn.Module, *, cos: str = "cos", sin: str = "sin") -> TritonRotaryEmbedding:
        return cls(getattr(module, cos), getattr(module, sin))

    def forward(self, q: Tensor, k: Tensor, start: int = 0) -> tuple[Tensor, Tensor]:
        t = q.shape[-2]
        if start + t > self.cos.shape[0]:
            raise ValueError(
                f"start: positions up to {start + t} exceed the {self.cos.shape[0]} the tables hold"
            )
        return rotary(q, k, self.cos[start : start + t], self.sin[start : start + t])


class TritonRotaryApply(nn.Module):
    """transformers' apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim) with the Triton kernel,
    a drop-in for `optrun.runtime.lm.hf.RotaryApply`. transformers hands cos and sin as (B, T, D)
    with duplicated halves (rotate-half); when every row of the batch shares its positions
    (B == 1, as in training and cached decoding) the kernel takes their first half as its
    (T, D/2) tables; per-row positions go to the module's eager function."""

    optrun_fused = True

    def __init__(self, fallback: Callable[..., tuple[Tensor, Tensor]]) -> None:
        super().__init__()
        self.fallback = fallback

    @classmethod
    def from_module(cls, module: nn.Module) -> TritonRotaryApply:
        return cls(module.fn)

    def forward(
        self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1
    ) -> tuple[Tensor, Tensor]:
        if unsqueeze_dim != 1 or cos.dim() != 3 or cos.shape[0] != 1:
            return self.fallback(q, k, cos, sin, unsqueeze_dim)
        d2 = cos.shape[-1] // 2
        return rotary(q, k, cos[0, :, :d2].float(), sin[0, :, :d2].float())


class FusedLMHeadLoss(nn.Module):
    """Mean cross-entropy of hidden @ weight^T against targets (ignore_index -100), fused and
    chunked so the (tokens x vocab) logits never exist; a drop-in for LMHeadLoss."""

    optrun_fused = True  # the patcher never matches a fused module again

    def __init__(self, ignore_index: int = IGNORE_INDEX, chunk_rows: int | None = None) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.chunk_rows = chunk_rows

    @classmethod
    def from_module(cls, module: nn.Module) -> FusedLMHeadLoss:
        return cls(int(getattr(module, "ignore_index", IGNORE_INDEX)))

    def forward(self, hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
        return fused_linear_cross_entropy(hidden, weight, targets, self.ignore_index, self.chunk_rows)
