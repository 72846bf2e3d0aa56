"""What every stage and acceptance test of a run sees: the run context.

Stages write their outputs into `results` under their own key (documented by each stage),
and acceptance tests read them back; nothing else is shared between stages. The model of the
lineage is `model`: each stage receives it and may replace it (see the orchestrator).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from optrun.api.result import HardwareInfo
from optrun.api.v1alpha1 import OptimizationRunSpec
from optrun.runtime.data import Corpus
from optrun.runtime.lm.base import DTYPES, CausalLM


@dataclass
class RunContext:
    spec: OptimizationRunSpec
    device: torch.device
    hardware: HardwareInfo
    corpus: Corpus
    # A fresh copy of the model as the user gave it, unpatched, on `device` (same weights every call).
    model_factory: Callable[[], CausalLM]
    output_dir: Path
    results: dict[str, Any] = field(default_factory=dict)
    # The model of the lineage: as given, then patched, trained, RL-trained, quantized.
    model: CausalLM | None = None
    # The trained float model (after training and RLVR, before compression): what the
    # training-side tests (checkpoints, gradient flow) look at.
    trained: CausalLM | None = None
    # Model transforms that optimizations register for the speedup matrix, by name
    # ("kernels", "compression"): each takes a model and returns the optimized model.
    transforms: dict[str, Callable[[nn.Module], nn.Module]] = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.spec.workload.precision]

    def eval_batches(
        self, seq_len: int | None = None, batch_size: int | None = None
    ) -> list[tuple[Tensor, Tensor]]:
        """The run's fixed held-out batches (the same ones for every evaluation of the run)."""
        w = self.spec.workload
        return self.corpus.eval_batches(
            seq_len or w.sequence_length, batch_size or w.batch_size, self.spec.training.eval_batches
        )
