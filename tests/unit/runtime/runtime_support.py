"""Helpers of the runtime tests: the built-in corpus (built once per session), small specs of
the built-in tiny model on the CPU, and seeded models.

The specs are deliberately tiny (short sequences, a handful of steps) so that a test which
trains, rolls back and resumes still runs in a second or two on a 2-core machine.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from optrun.api.v1alpha1 import OptimizationRunSpec
from optrun.runtime.context import RunContext
from optrun.runtime.data import Corpus
from optrun.runtime.hardware import detect
from optrun.runtime.model import build_model
from optrun.runtime.training.loop import Trainer


@functools.cache
def pydoc_corpus() -> Corpus:
    return Corpus.build("pydoc")


def small_spec(**sections: Any) -> OptimizationRunSpec:
    """A spec of the tiny model with a short, CPU-sized training run; `sections` replace or extend
    whole top-level sections (camelCase, as in a manifest)."""
    doc: dict[str, Any] = {
        "workload": {"model": "tiny-lm", "sequenceLength": 16, "batchSize": 4},
        "optimizations": {"kernels": {"enabled": False}},
        "training": {
            "epochs": 2,
            "stepsPerEpoch": 6,
            "learningRate": 3.0e-3,
            "warmupSteps": 2,
            "evalBatches": 1,
            "seed": 1234,
            "checkpoint": {"everySteps": 2, "keep": 3},
        },
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    return OptimizationRunSpec.model_validate(doc)


def seeded_model(spec: OptimizationRunSpec) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.training.seed)
        return build_model(spec.workload.model)


# The `make_trainer` fixture's type (see conftest.py).
MakeTrainer = Callable[..., Trainer]


def run_context(spec: OptimizationRunSpec, output_dir: Path) -> RunContext:
    """A real run context on the CPU for `spec`, as the orchestrator's detect stage builds it."""
    device, hardware = detect("cpu")
    return RunContext(
        spec=spec,
        device=device,
        hardware=hardware,
        corpus=pydoc_corpus(),
        model_factory=functools.partial(seeded_model, spec),
        output_dir=output_dir,
    )
