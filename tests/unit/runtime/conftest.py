"""Fixtures of the runtime tests: trainers of the tiny model over a temporary checkpoint directory.

Torch runs on one thread here: the tiny model's kernels are far too small to share out, and on
a busy 2-core machine two OpenMP threads spin against each other (a step measured 100x slower).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from optrun.api.v1alpha1 import OptimizationRunSpec
from optrun.runtime.metrics import Metrics
from optrun.runtime.training.checkpoint import CheckpointStore
from optrun.runtime.training.loop import Trainer
from tests.unit.runtime.runtime_support import MakeTrainer, pydoc_corpus, seeded_model


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def make_trainer(tmp_path: Path) -> MakeTrainer:
    """Trainer(spec) with a fresh seeded model, checkpoints in `directory` (default tmp/ckpt)."""

    def make(
        spec: OptimizationRunSpec,
        directory: Path | None = None,
        *,
        stop: threading.Event | None = None,
        on_step: Callable[[Trainer], None] | None = None,
        jsonl: Path | None = None,
    ) -> Trainer:
        store = CheckpointStore(directory or tmp_path / "ckpt", keep=spec.training.checkpoint.keep)
        return Trainer(
            spec,
            seeded_model(spec),
            pydoc_corpus(),
            torch.device("cpu"),
            store,
            Metrics(jsonl),
            stop=stop,
            on_step=on_step,
        )

    return make
