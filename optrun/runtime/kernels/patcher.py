"""The patcher: swaps a model's layers for fused ones, per operation, and says what it swapped.

A layer is matched to an operation by its type through a declared mapping (`Binding`: which
operation, and the names of the module's attributes the fused module needs). The built-in
model's layer types are mapped by default; Llama-style layers of other models (Hugging Face's
`*RMSNorm` with `weight` and `variance_epsilon`, `*MLP` with `gate_proj`/`up_proj`/`down_proj`
and a SiLU) are recognised by their structure; anything else can be declared:

    patch_model(model, {"rms_norm": "triton"}, mapping={MyNorm: Binding("rms_norm", {"weight": "scale", "eps": "eps"})})

Per operation the choice is one of
- `triton`: the module is replaced by its counterpart in `modules.py` (sharing parameters);
- `compile`: the module stays, its `forward` becomes `torch.compile(type(module).forward)`,
  compiled once per layer type and shared by every instance (state_dict and type unchanged);
- `eager`: the module stays as it is.
Patching happens in place and is one-way: a swapped layer is never matched again.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from optrun.runtime import model as builtin
from optrun.runtime.kernels.modules import (
    FusedLMHeadLoss,
    TritonRMSNorm,
    TritonRotaryApply,
    TritonRotaryEmbedding,
    TritonSwiGLU,
)
from optrun.runtime.kernels.ops._launch import TritonUnavailableError, triton_runs_on

log = logging.getLogger(__name__)

OPS = ("rms_norm", "swiglu", "rope", "cross_entropy")
CHOICES = ("triton", "liger", "compile", "eager")
# The forms an operation's layer comes in, and the attributes its fused module reads from the
# layer it replaces. rope "tables": the built-in layer, (q, k, start) over cos/sin tables;
# rope "hf": transformers' apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim) as a module.
ROLES: dict[tuple[str, str], tuple[str, ...]] = {
    ("rms_norm", "default"): ("weight", "eps"),
    ("swiglu", "default"): ("gate", "up", "down"),
    ("rope", "tables"): ("cos", "sin"),
    ("rope", "hf"): (),
    ("cross_entropy", "default"): (),
}
_DEFAULT_FORM = {"rope": "tables"}


@dataclass(frozen=True)
class Binding:
    """How a module type maps onto an operation: the operation, and per role the name of the
    module's attribute that plays it (e.g. {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}).
    The module's forward must compute what the operation's reference computes."""

    op: str
    attrs: Mapping[str, str] = field(default_factory=dict)
    form: str = ""  # "" is the operation's default form (see ROLES)

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"Binding.op: unknown operation {self.op!r}; allowed: {', '.join(OPS)}")
        if not self.form:
            object.__setattr__(self, "form", _DEFAULT_FORM.get(self.op, "default"))
        forms = [f for o, f in ROLES if o == self.op]
        if (self.op, self.form) not in ROLES:
            raise ValueError(
                f"Binding.form for {self.op}: {self.form!r} is not allowed; allowed: {', '.join(forms)}"
            )
        roles = ROLES[self.op, self.form]
        missing = [r for r in roles if r not in self.attrs]
        extra = [r for r in self.attrs if r not in roles]
        if missing or extra:
            raise ValueError(
                f"Binding.attrs for {self.op}: expected roles {', '.join(roles) or '(none)'}; "
                f"missing {missing}, unknown {extra}"
            )

    def fused_module(self, module: nn.Module, kind: str = "triton") -> nn.Module:
        """The fused counterpart of `module` (optrun's Triton kernels, or Liger-Kernel's when
        `kind` is "liger"), sharing its parameters and buffers."""
        a = dict(self.attrs)
        if kind == "liger":
            from optrun.runtime.kernels import liger

            return liger.module_for(self.op, self.form, module, a)
        if kind != "triton":
            raise ValueError(f"kind: {kind!r} is not allowed; allowed: triton, liger")
        if self.op == "rms_norm":
            return TritonRMSNorm.from_module(module, weight=a["weight"], eps=a["eps"])
        if self.op == "swiglu":
            return TritonSwiGLU.from_module(module, gate=a["gate"], up=a["up"], down=a["down"])
        if self.op == "rope" and self.form == "hf":
            return TritonRotaryApply.from_module(module)
        if self.op == "rope":
            return TritonRotaryEmbedding.from_module(module, cos=a["cos"], sin=a["sin"])
        return FusedLMHeadLoss.from_module(module)

    def triton_module(self, module: nn.Module) -> nn.Module:
        return self.fused_module(module, "triton")


DEFAULT_MAPPING: dict[type[nn.Module], Binding] = {
    builtin.RMSNorm: Binding("rms_norm", {"weight": "weight", "eps": "eps"}),
    builtin.SwiGLU: Binding("swiglu", {"gate": "w1", "up": "w3", "down": "w2"}),
    builtin.RotaryEmbedding: Binding("rope", {"cos": "cos", "sin": "sin"}),
    builtin.LMHeadLoss: Binding("cross_entropy", {}),
}


def llama_style_binding(module: nn.Module) -> Binding | None:
    """A binding for a Llama-style layer recognised by structure, or None.

    RMSNorm: a class named *RMSNorm with a 1-D `weight` and a float `variance_epsilon` or `eps`.
    SwiGLU: `gate_proj`, `up_proj`, `down_proj` linear layers and a SiLU `act_fn`."""
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    if name.endswith("RMSNorm") and isinstance(weight, nn.Parameter) and weight.dim() == 1:
        for eps in ("variance_epsilon", "eps"):
            if isinstance(getattr(module, eps, None), float):
                return Binding("rms_norm", {"weight": "weight", "eps": eps})
    projections = [getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    act = getattr(module, "act_fn", None)
    if all(isinstance(p, nn.Linear) for p in projections) and type(act).__name__ in (
        "SiLU",
        "SiLUActivation",
    ):
        return Binding("swiglu", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"})
    return None


def binding_for(
    module: nn.Module, mapping: Mapping[type[nn.Module], Binding] | None = None, *, structural: bool = True
) -> Binding | None:
    """How `module` maps onto an operation: a declared mapping first, then the defaults, then
    (with `structural`) Llama-style structure; None for modules no operation covers (and for
    already fused ones)."""
    if getattr(module, "optrun_fused", False):
        return None
    for table in (mapping or {}, DEFAULT_MAPPING):
        if type(module) in table:
            return table[type(module)]
    return llama_style_binding(module) if structural else None


def model_mapping(
    model: nn.Module, mapping: Mapping[type[nn.Module], Binding] | None = None
) -> tuple[dict[type[nn.Module], Binding], bool]:
    """The bindings a model declares (`CausalLM.patch_mapping`) with the caller's on top, and
    whether layers may also be recognised by structure (not for models whose families are
    declared: a look-alike norm such as Gemma's (1 + weight) would compute something else)."""
    declared = getattr(model, "patch_mapping", None)
    merged: dict[type[nn.Module], Binding] = dict(declared()) if callable(declared) else {}
    merged.update(mapping or {})
    return merged, bool(getattr(model, "recognise_by_structure", True))


def find_ops(
    model: nn.Module, mapping: Mapping[type[nn.Module], Binding] | None = None
) -> dict[str, tuple[nn.Module, Binding]]:
    """Every module of `model` that an operation covers, by qualified name, in model order."""
    table, structural = model_mapping(model, mapping)
    found = {}
    for name, module in model.named_modules():
        binding = binding_for(module, table, structural=structural)
        if binding is not None:
            found[name] = (module, binding)
    return found


_COMPILED: dict[type[nn.Module], Callable[..., Any]] = {}


def compiled_forward(cls: type[nn.Module]) -> Callable[..., Any]:
    """torch.compile of `cls.forward`, one per layer type: instances share the compiled code
    (parameters are graph inputs), so a 32-layer model compiles each operation once."""
    if cls not in _COMPILED:
        _COMPILED[cls] = torch.compile(cls.forward)
    return _COMPILED[cls]


def use_compiled(module: nn.Module) -> nn.Module:
    """Run `module` through its compiled forward (in place; type and state_dict unchanged)."""
    module.forward = types.MethodType(compiled_forward(type(module)), module)
    return module


@dataclass
class PatchReport:
    """What `patch_model` did: per module path the operation, the choice and the types."""

    entries: dict[str, dict[str, str]] = field(default_factory=dict)

    def add(self, path: str, op: str, choice: str, before: nn.Module, after: nn.Module) -> None:
        self.entries[path] = {
            "op": op,
            "choice": choice,
            "from": type(before).__name__,
            "to": type(after).__name__ + (" (compiled)" if choice == "compile" else ""),
        }

    @property
    def swapped(self) -> dict[str, dict[str, str]]:
        """The modules that changed (triton or compile), by path."""
        return {p: e for p, e in self.entries.items() if e["choice"] != "eager"}

    def counts(self) -> dict[str, dict[str, int]]:
        """How many modules of each operation got each choice."""
        out: dict[str, dict[str, int]] = {}
        for e in self.entries.values():
            per = out.setdefault(e["op"], {})
            per[e["choice"]] = per.get(e["choice"], 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"counts": self.counts(), "modules": self.entries}


def _check_choices(choices: Mapping[str, str] | str) -> dict[str, str]:
    if isinstance(choices, str):
        choices = dict.fromkeys(OPS, choices)
    for op, choice in choices.items():
        if op not in OPS:
            raise ValueError(f"choices: unknown operation {op!r}; allowed: {', '.join(OPS)}")
        if choice not in CHOICES:
            raise ValueError(f"choices[{op!r}]: unknown choice {choice!r}; allowed: {', '.join(CHOICES)}")
    return dict(choices)


def _device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def patch_model(
    model: nn.Module,
    choices: Mapping[str, str] | str,
    mapping: Mapping[type[nn.Module], Binding] | None = None,
) -> PatchReport:
    """Swap `model`'s layers in place per operation: choices maps an operation (rms_norm, swiglu,
    rope, cross_entropy) to triton, compile or eager (a single string applies to all; an
    operation left out stays eager). Returns what was swapped."""
    wanted = _check_choices(choices)
    device = _device(model)
    if {"triton", "liger"} & set(wanted.values()) and not triton_runs_on(device):
        raise TritonUnavailableError(
            f"choices: triton needs a CUDA device, the model is on {device.type}; "
            "set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter (tests only)"
        )
    report = PatchReport()
    for path, (module, binding) in find_ops(model, mapping).items():
        choice = wanted.get(binding.op, "eager")
        if choice in ("triton", "liger"):
            new = binding.fused_module(module, choice)
            _replace(model, path, new)
        elif choice == "compile":
            new = use_compiled(module)
        else:
            new = module
        report.add(path, binding.op, choice, module, new)
    log.info("kernels patched: %s", report.counts())
    return report


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if not name:
        raise ValueError("patch_model: the model itself is a single operation; wrap it in a container module")
    parent._modules[name] = new  # works for ModuleList/ModuleDict children as for attributes
