"""The kernel tests run the Triton kernels on the CPU in Triton's interpreter.

The kernels decide per launch whether to interpret (optrun.runtime.kernels.ops._launch), so
setting TRITON_INTERPRET for these tests alone is enough, whatever was imported before; the
selection cache goes to a temporary directory, never to the user's ~/.cache.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from optrun.api.v1alpha1 import OptimizationRunSpec
from optrun.runtime.context import RunContext
from optrun.runtime.data import Corpus
from optrun.runtime.hardware import detect
from optrun.runtime.model import build_model


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("OPTRUN_CACHE", str(tmp_path / "cache"))


def tiny_context(tmp_path: Path, **spec_overrides: object) -> RunContext:
    """A real run context for the built-in tiny model on the CPU, with a small workload."""
    doc: dict[str, Any] = {
        "workload": {"model": "tiny-lm", "sequenceLength": 32, "batchSize": 4},
        "optimizations": {"kernels": {"enabled": True, "mode": "auto"}},
        "training": {"seed": 7},
    }
    for key, value in spec_overrides.items():
        doc[key] = value
    spec = OptimizationRunSpec.model_validate(doc)
    device, hardware = detect("cpu")
    return RunContext(
        spec=spec,
        device=device,
        hardware=hardware,
        corpus=_corpus(),
        model_factory=functools.partial(_seeded_model, spec.training.seed),
        output_dir=tmp_path / "run",
    )


def _seeded_model(seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model("tiny-lm")


@functools.cache
def _corpus() -> Corpus:
    return Corpus.build("pydoc")


@pytest.fixture
def make_context(tmp_path: Path) -> Callable[..., RunContext]:
    return functools.partial(tiny_context, tmp_path)
