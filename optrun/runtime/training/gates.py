"""Safety gates: what counts as a broken step, measured per step.

- non-finite loss: NaN or Inf;
- gradient flow, per layer group (embeddings, each block, head): a group whose gradient norm
  is below `minNorm` has vanished, one above `maxNorm` (or non-finite) has exploded.

The gates only judge; the trainer decides the recovery (rollback, skip, halve the micro-batch)
and counts recoveries against `maxRecoveries`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from optrun.api.v1alpha1 import GradientFlow


class SafetyGateFailed(RuntimeError):
    """A gate tripped more often than the recovery budget allows (or policy is `fail`)."""

    def __init__(self, gate: str, message: str) -> None:
        self.gate = gate
        super().__init__(message)


@dataclass(frozen=True)
class Trip:
    gate: str  # nan_loss | gradient_vanishing | gradient_exploding | oom | hang | exception
    detail: str


def layer_group(param_name: str) -> str:
    """Group parameters by layer: 'layers.3.attn.wq.weight' -> 'layers.3'; others by first name."""
    m = re.match(r"^(.*?layers\.\d+)\.", param_name)
    return m.group(1) if m else param_name.split(".", 1)[0]


def group_grad_norms(model: nn.Module) -> dict[str, float]:
    """L2 norm of the gradient per layer group (parameters without a gradient are skipped); the
    groups are the model's own (`CausalLM.layer_group`), by name pattern otherwise."""
    group_of = getattr(model, "layer_group", layer_group)
    sq: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = group_of(name)
        val = p.grad.detach().float().pow(2).sum()
        sq[g] = sq[g] + val if g in sq else val
    return {g: math.sqrt(v.item()) for g, v in sq.items()}


def check_loss(loss: torch.Tensor) -> Trip | None:
    if not torch.isfinite(loss).all():
        return Trip("nan_loss", f"loss is {loss.item()}")
    return None


def check_gradients(norms: dict[str, float], bounds: GradientFlow) -> Trip | None:
    for group, norm in norms.items():
        if not math.isfinite(norm) or norm > bounds.max_norm:
            return Trip(
                "gradient_exploding", f"{group}: gradient norm {norm:.3g} > maxNorm {bounds.max_norm:g}"
            )
    for group, norm in norms.items():
        if norm < bounds.min_norm:
            return Trip(
                "gradient_vanishing", f"{group}: gradient norm {norm:.3g} < minNorm {bounds.min_norm:g}"
            )
    return None
