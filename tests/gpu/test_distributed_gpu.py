"""`optrun run` over two GPUs of one machine, as a user runs it: torchrun starts two ranks, each
binds NCCL to its own GPU (cuda:LOCAL_RANK), DDP trains tiny-lm with the global batch split, and
rank 0 writes a report with a decision. Skipped on a machine with fewer than two GPUs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.unit.distributed.distributed_support import manifest, run

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]


def test_two_ranks_on_two_gpus_train_over_nccl_and_end_in_a_decision(tmp_path: Path) -> None:
    path = manifest(tmp_path, "two-gpus", ranks=2, timeout=120, resources={"gpus": 2})
    report = run(path, tmp_path / "out", device="cuda")
    assert report["distributed"] == {
        "worldSize": 2,
        "nodes": 1,
        "processesPerNode": 2,
        "strategy": "ddp",
        "backend": "nccl",
    }
    assert report["decision"] in ("GO", "CONDITIONAL_GO", "NO_GO")
    assert report["training"]["steps"] == 16
    ranks = report["details"]["train"]["ranks"]
    # Each rank on its own GPU; the replicas, all-reduced over NCCL, ended identical.
    assert [(r["rank"], r["device"], r["steps"]) for r in ranks] == [(0, "cuda:0", 16), (1, "cuda:1", 16)]
    assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"]
