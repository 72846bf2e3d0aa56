"""Liger-Kernel's kernels as measured candidates, in the patcher's drop-in form.

Liger-Kernel (`liger-kernel`, LinkedIn) is what many teams already apply to Llama-family
models; optrun measures it beside its own kernels and torch.compile on the run's shapes and
keeps whichever is fastest and correct, so the kernel table says who won. Its kernels are
Triton, so like optrun's they are candidates on CUDA only (on a CPU only in Triton's
interpreter, for tests). Each module below shares the parameters of the layer it replaces and
calls Liger's functional API (`liger_kernel.transformers.functional`), the same functions its
`apply_liger_kernel_to_*` patches install.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn


def available() -> tuple[bool, str]:
    """Whether Liger-Kernel is installed, and why not when it is not."""
    if importlib.util.find_spec("liger_kernel") is None:
        return False, "liger-kernel is not installed (pip install liger-kernel)"
    return True, ""


def _functional() -> Any:
    from liger_kernel.transformers import functional

    return functional


def _call(name: str, x: Tensor, *args: Any, **kwargs: Any) -> Any:
    """Liger's functional `name` on `x`. On a CPU (Triton's interpreter: tests only) the call runs
    with triton's own library functions routed to the interpreter, as optrun's kernels run there
    (`ops/_launch.py`): they were built compiled when triton was imported, before a test set
    TRITON_INTERPRET. Routing the forward is enough: the backward passes of Liger's rotary and
    fused cross-entropy (the ones that run in the interpreter) call no library function."""
    fn = getattr(_functional(), name)
    if x.device.type == "cuda":
        return fn(x, *args, **kwargs)
    from optrun.runtime.kernels.ops._launch import _interpreting

    with _interpreting():
        return fn(x, *args, **kwargs)


class LigerRMSNorm(nn.Module):
    optrun_fused = True

    def __init__(self, weight: nn.Parameter, eps: float, weight_name: str = "weight") -> None:
        super().__init__()
        self.eps, self._weight_name = eps, weight_name
        self.register_parameter(weight_name, weight)

    def forward(self, x: Tensor) -> Tensor:
        # casting_mode "llama": fp32 inside, rounded to the input dtype before the weight, as
        # transformers' Llama-family norms do; not in place (autograd may still need x).
        return _call("liger_rms_norm", x, getattr(self, self._weight_name), self.eps, in_place=False)


class LigerSwiGLU(nn.Module):
    optrun_fused = True

    def __init__(self, gate: nn.Module, up: nn.Module, down: nn.Module, names: tuple[str, str, str]) -> None:
        super().__init__()
        self._names = names
        for name, layer in zip(names, (gate, up, down), strict=True):
            self.add_module(name, layer)

    def forward(self, x: Tensor) -> Tensor:
        gate, up, down = (getattr(self, n) for n in self._names)
        return down(_call("liger_swiglu", gate(x), up(x)))


class LigerRotaryTables(nn.Module):
    """The built-in RotaryEmbedding's call, (q, k, start) over (T, D/2) tables, through Liger's
    rope, which takes transformers' (1, T, D) duplicated-half cos and sin."""

    optrun_fused = True

    def __init__(self, cos: Tensor, sin: Tensor) -> None:
        super().__init__()
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, q: Tensor, k: Tensor, start: int = 0) -> tuple[Tensor, Tensor]:
        t = q.shape[-2]
        c, s = self.cos[start : start + t], self.sin[start : start + t]
        cos, sin = torch.cat((c, c), -1)[None].to(q.dtype), torch.cat((s, s), -1)[None].to(q.dtype)
        q2, k2 = _call("liger_rope", q, k, cos, sin)
        return q2, k2


class LigerRotaryApply(nn.Module):
    """transformers' apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim) through Liger's rope."""

    optrun_fused = True

    def forward(
        self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1
    ) -> tuple[Tensor, Tensor]:
        q2, k2 = _call("liger_rope", q, k, cos, sin, None, unsqueeze_dim)
        return q2, k2


class LigerLMHeadLoss(nn.Module):
    """Mean cross-entropy of hidden @ weight^T against targets with Liger's fused linear
    cross-entropy (the logits never exist whole)."""

    optrun_fused = True

    def __init__(self, ignore_index: int = -100) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
        loss = _call(
            "liger_fused_linear_cross_entropy",
            hidden.reshape(-1, hidden.shape[-1]),
            weight,
            targets.reshape(-1),
            ignore_index=self.ignore_index,
        )
        return loss[0] if isinstance(loss, tuple) else loss


_BUILDERS: dict[tuple[str, str], Callable[[nn.Module, Mapping[str, str]], nn.Module]] = {
    ("rms_norm", "default"): lambda m, a: LigerRMSNorm(
        getattr(m, a["weight"]), float(getattr(m, a["eps"])), a["weight"]
    ),
    ("swiglu", "default"): lambda m, a: LigerSwiGLU(
        getattr(m, a["gate"]), getattr(m, a["up"]), getattr(m, a["down"]), (a["gate"], a["up"], a["down"])
    ),
    ("rope", "tables"): lambda m, a: LigerRotaryTables(getattr(m, a["cos"]), getattr(m, a["sin"])),
    ("rope", "hf"): lambda m, a: LigerRotaryApply(),
    ("cross_entropy", "default"): lambda m, a: LigerLMHeadLoss(int(getattr(m, "ignore_index", -100))),
}


def module_for(op: str, form: str, module: nn.Module, attrs: Mapping[str, str]) -> nn.Module:
    """Liger's counterpart of `module` for operation `op` in `form` (see patcher.ROLES)."""
    ok, why = available()
    if not ok:
        raise RuntimeError(why)
    return _BUILDERS[op, form](module, attrs)
