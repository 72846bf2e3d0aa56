"""Distributed runs as a user starts them (`optrun run` through torchrun), shared by the CPU
tests here and the GPU test in tests/gpu."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

EXIT_FOR = {"GO": 0, "CONDITIONAL_GO": 3, "NO_GO": 4}
EXIT_CRASH = 1  # a run that started and crashed (2 is a manifest refused before anything ran)


def manifest(
    tmp: Path, name: str, *, ranks: int, strategy: str = "ddp", timeout: int = 300, **spec: Any
) -> Path:
    """A tiny run of tiny-lm (16 steps, every optional stage off) over `ranks` processes; `spec`
    replaces whole sections."""
    doc: dict[str, Any] = {
        "apiVersion": "optrun.io/v1alpha1",
        "kind": "OptimizationRun",
        "metadata": {"name": name},
        "spec": {
            "workload": {"model": "tiny-lm", "sequenceLength": 32, "batchSize": 8},
            "optimizations": {
                "kernels": {"enabled": False},
                "compression": {"enabled": False},
                "kvCache": {"enabled": False},
            },
            "rlvr": {"enabled": False},
            "training": {
                "epochs": 2,
                "stepsPerEpoch": 8,
                "warmupSteps": 2,
                "evalBatches": 2,
                "targetAccuracy": 0.0,
                "checkpoint": {"everySteps": 4, "keep": 3},
            },
            "acceptance": {"repeats": 1},
            "distributed": {"processesPerNode": ranks, "strategy": strategy, "timeoutSeconds": timeout},
            "resources": {"gpus": 0},
            **spec,
        },
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def run(
    path: Path,
    out: Path,
    *,
    expect_crash: bool = False,
    device: str | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """`optrun run` of the manifest, as a user runs it: the report when it ended in a decision
    (its exit code the decision's), nothing when it was expected to crash (and did: exit 1).
    `env`: variables added to the child's environment."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run(
        [sys.executable, "-m", "optrun.cli", "run", str(path), "--output", str(out), "--quiet"]
        + (["--device", device] if device else []),
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    if expect_crash:
        assert done.returncode == EXIT_CRASH, (done.returncode, done.stderr[-2000:])
        return {}
    assert done.returncode in EXIT_FOR.values(), (done.stdout[-1500:], done.stderr[-3000:])
    report = json.loads((out / "report.json").read_text())
    assert done.returncode == EXIT_FOR[report["decision"]]
    return report
