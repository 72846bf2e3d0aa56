"""What every stage and acceptance test of a run sees: the run context.

Stages write their outputs into `results` under their own key (documented by each stage),
and acceptance tests read them back; nothing else is shared between stages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from optrun.api.result import HardwareInfo
from optrun.api.v1alpha1 import OptimizationRunSpec
from optrun.runtime.data import Corpus

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class RunContext:
    spec: OptimizationRunSpec
    device: torch.device
    hardware: HardwareInfo
    corpus: Corpus
    # A fresh, seeded, unpatched model on `device` (same weights every call).
    model_factory: Callable[[], nn.Module]
    output_dir: Path
    results: dict[str, Any] = field(default_factory=dict)
    # The trained (and optimized) model, once the train stage has run.
    model: nn.Module | None = None
    # Model transforms that optimizations register for the speedup matrix, by name
    # ("kernels", "compression"): each takes a model and returns the optimized model.
    transforms: dict[str, Callable[[nn.Module], nn.Module]] = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.spec.workload.precision]
