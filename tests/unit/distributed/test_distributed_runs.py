"""`optrun run` past one process, as a user runs it: torchrun starts the ranks (gloo on the CPU),
DDP or FSDP2 trains with the global batch split over them, and the result compares with a
one-process run of the same global batch.

- 2 ranks under DDP and under FSDP end where one process ends: the held-out loss at every
  evaluation, and the global training loss at every step, within LOSS_RTOL.
- A NaN injected on one rank trips the gate on every rank, and all of them roll back together;
  an out-of-memory error on one rank halves every rank's micro-batches; a rank that hangs ends
  the attempt within the collective timeout, one that crashes at once.
- Gradient compression runs as DDP's comm hook in the training itself.
- A checkpoint of 2 ranks resumes in 1 process, and one of 1 process in 2 ranks, under DDP and
  under FSDP; at the same world size a resumed run ends bitwise where an uninterrupted one ends.

The runs are tiny (a few steps of the built-in model, every optional stage off) so that a test
costs seconds of training plus torchrun's start-up. Start-up is most of it (the interpreter and
torch in the launcher and in every rank), so a run that several tests judge is one module-scoped
fixture: the 2-rank runs beside the one-process run, and the rank that crashes alone, whose
resumed run is also the one compared bitwise.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch

from tests.unit.distributed.distributed_support import manifest, run

pytestmark = pytest.mark.slow

# Relative difference allowed between a 2-rank and a 1-process run of the same global batch:
# the same arithmetic summed in another order (each rank averages its rows, then the ranks
# average), drifting a little over the steps; a rank that trained on the wrong rows or missed a
# gradient all-reduce is off by percents after the first step.
LOSS_RTOL = 1e-3
# int8 gradients (per-channel absmax, error at most maxReconstructionError 0.02 per tensor) move
# each step a little off the exact one: the held-out loss after 16 steps stays within this of
# the uncompressed run's (measured: 2e-5 relative, on 2 gloo ranks).
COMPRESSED_RTOL = 0.01


def curves(report: dict[str, Any], out: Path) -> tuple[list[float], list[float]]:
    evals = [e["loss"] for e in report["details"]["train"]["evals"]]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [s["loss"] for s in steps if s.get("event") == "step"]
    return evals, losses


def close(a: list[float], b: list[float], rtol: float = LOSS_RTOL) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= rtol * abs(y) for x, y in zip(a, b, strict=True))


def resumed_at(out: Path) -> list[int]:
    """The steps every run into `out` resumed from, in order (metrics.jsonl is appended to)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if r.get("event") == "resume"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    tmp = tmp_path_factory.mktemp("one")
    return run(manifest(tmp, "one", ranks=1), tmp / "out"), tmp / "out"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[dict[str, Any], Path]]:
    """The uninterrupted 2-rank run of a strategy (the one-process manifest over 2 ranks), run once
    for every test that reads it."""
    runs: dict[str, tuple[dict[str, Any], Path]] = {}

    def get(strategy: str) -> tuple[dict[str, Any], Path]:
        if strategy not in runs:
            tmp = tmp_path_factory.mktemp(f"two-{strategy}")
            runs[strategy] = run(manifest(tmp, "two", ranks=2, strategy=strategy), tmp / "out"), tmp / "out"
        return runs[strategy]

    return get


class CrashedAlone(NamedTuple):
    seconds: float  # the crashed attempt, from `optrun run` to its exit
    first: dict[str, str]  # every rank's log of the crashed attempt, by rank
    report: dict[str, Any]  # of the same command run again
    out: Path


@pytest.fixture(scope="module")
def crashed_alone(tmp_path_factory: pytest.TempPathFactory) -> CrashedAlone:
    """2 ranks under DDP; rank 1 alone raises at step 10 (checkpoint 8 is the newest), then the same
    command again."""
    tmp = tmp_path_factory.mktemp("crash")
    crash = [{"type": "exception", "atStep": 10, "rank": 1}]
    path = manifest(tmp, "crash", ranks=2, timeout=300, faults=crash, backoffLimit=0)
    out = tmp / "out"
    started = time.monotonic()
    run(path, out, expect_crash=True)
    seconds = time.monotonic() - started
    first = {p.parent.name: p.read_text() for p in (out / "ranks").rglob("stderr.log")}
    return CrashedAlone(seconds, first, run(path, out), out)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_end_where_one_process_ends(
    one_process: tuple[dict[str, Any], Path],
    two_ranks: Callable[[str], tuple[dict[str, Any], Path]],
    strategy: str,
) -> None:
    report, out = two_ranks(strategy)
    assert report["distributed"] == {
        "worldSize": 2,
        "nodes": 1,
        "processesPerNode": 2,
        "strategy": strategy,
        "backend": "gloo",
    }
    evals, losses = curves(report, out)
    ref_evals, ref_losses = curves(*one_process)
    assert len(losses) == 16 and len(evals) >= 8  # every step logged, every evaluation kept
    assert close(evals, ref_evals), (evals, ref_evals)
    assert close(losses, ref_losses), (losses, ref_losses)
    ranks = report["details"]["train"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["steps"] == 16 for r in ranks)
    if strategy == "ddp":
        assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"]  # the replicas stayed identical
    # Every rank logged; only rank 0 wrote the report.
    logs = list((out / "ranks").rglob("stderr.log"))
    assert len(logs) == 2 and all("rank " in log.read_text() for log in logs)


def test_a_nan_on_one_rank_rolls_every_rank_back(tmp_path: Path) -> None:
    path = manifest(tmp_path, "nan", ranks=2, faults=[{"type": "nan-loss", "atStep": 5, "rank": 1}])
    report = run(path, tmp_path / "out")
    assert report["safety"]["trips"].get("nan_loss") == 1
    assert report["safety"]["recoveries"] == 1
    (event,) = [e for e in report["safety"]["events"] if e["gate"] == "nan_loss"]
    # Rank 0 never saw a NaN itself: it rolled back because rank 1 did, to the same checkpoint.
    assert event["step"] == 5 and event["rolled_back_to"] == 4
    assert "another rank" in event["detail"]
    assert report["training"]["steps"] == 16
    ranks = report["details"]["train"]["ranks"]
    assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"]


def test_an_out_of_memory_error_on_one_rank_halves_every_ranks_micro_batches(
    one_process: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    # Rank 1 alone runs out of memory at step 5: a back-off on that rank only would leave it
    # with twice the gradient all-reduces of rank 0 per step, and the run hung until the timeout.
    path = manifest(tmp_path, "oom", ranks=2, timeout=60, faults=[{"type": "oom", "atStep": 5, "rank": 1}])
    report = run(path, tmp_path / "out")
    assert report["safety"]["oomBackoffs"] == 1 and report["safety"]["recoveries"] == 0
    (event,) = [e for e in report["safety"]["events"] if e["gate"] == "oom"]
    # Rank 0 (the report's) never ran out of memory itself: it backed off because rank 1 did.
    assert event["step"] == 5 and event["action"] == "halve-micro-batch"
    assert "another rank" in event["detail"]
    ranks = report["details"]["train"]["ranks"]
    assert [(r["oomBackoffs"], r["microBatches"], r["steps"]) for r in ranks] == [(1, 2, 16), (1, 2, 16)]
    assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"]
    # Accumulated over two micro-batches, the same global batch: the one-process curve.
    evals, losses = curves(report, tmp_path / "out")
    ref_evals, ref_losses = curves(*one_process)
    assert close(losses, ref_losses), (losses, ref_losses)
    assert close(evals, ref_evals), (evals, ref_evals)


def test_gradient_compression_runs_in_the_distributed_training_itself(
    one_process: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    compression = {"enabled": True, "target": "gradients", "codec": "int8"}
    optimizations = {"kernels": {"enabled": False}, "compression": compression, "kvCache": {"enabled": False}}
    report = run(manifest(tmp_path, "int8", ranks=2, optimizations=optimizations), tmp_path / "out")
    g = report["details"]["compression"]["gradients"]
    # Measured by the DDP comm hook in the run's own training, not by the 2-process side comparison.
    assert g["source"] == "training" and g["worldSize"] == 2 and g["steps"] == 16, g
    assert g["bytesPerStep"] < g["baselineBytesPerStep"] / 3, g  # int8 of fp32: about a quarter
    assert g["ranksAgree"] and g["gate"]["tensors"] > 0 and not g["gate"]["failed"], g
    tests = {t["name"]: t for t in report["tests"]}
    for name in ("compression.gradients.bytes_ratio", "compression.gradients.loss_parity"):
        assert tests[name]["passed"], tests[name]["reason"]
    # Trained on int8 gradients, the held-out loss ends near the uncompressed run's.
    plain = one_process[0]["training"]["finalLoss"]
    assert math.isfinite(report["training"]["finalLoss"])
    assert report["training"]["finalLoss"] == pytest.approx(plain, rel=COMPRESSED_RTOL), plain


@pytest.mark.parametrize(
    "strategy", [pytest.param("ddp", id="ddp-2-1-2"), pytest.param("fsdp", id="fsdp-2-1-2")]
)
def test_a_checkpoint_resumes_with_another_world_size(
    one_process: tuple[dict[str, Any], Path], tmp_path: Path, strategy: str
) -> None:
    # One output directory, three runs: 2 ranks crash at step 10, 1 process resumes from their
    # checkpoint 8 (2 -> 1) and crashes at step 14, 2 ranks resume from its checkpoint 12 (1 -> 2).
    # Under FSDP the 2 ranks write (2 -> 1) or read (1 -> 2) the tensors as shards of half the rows.
    # Every evaluation after a resume is that world size's: the curve holds both directions.
    crashes = [{"type": "exception", "atStep": 10}, {"type": "exception", "atStep": 14}]
    out = tmp_path / "out"

    def launch(ranks: int, **kw: Any) -> dict[str, Any]:
        path = manifest(tmp_path, "resume", ranks=ranks, strategy=strategy, faults=crashes, backoffLimit=0)
        return run(path, out, **kw)

    launch(2, expect_crash=True)
    assert (out / "checkpoints" / "step-000000008").is_dir()
    assert not (out / "checkpoints" / "step-000000012").exists()
    launch(1, expect_crash=True)
    assert (out / "checkpoints" / "step-000000012").is_dir()
    report = launch(2)
    assert resumed_at(out) == [8, 12]
    assert report["training"]["steps"] == 16
    assert report["distributed"]["worldSize"] == 2
    evals, _ = curves(report, out)
    ref_evals, _ = curves(*one_process)
    assert close(evals, ref_evals), (evals, ref_evals)


def test_at_the_same_world_size_a_resumed_run_ends_bitwise_where_an_uninterrupted_one_ends(
    two_ranks: Callable[[str], tuple[dict[str, Any], Path]], crashed_alone: CrashedAlone
) -> None:
    # The resumed run: 2 ranks crashed at step 10 (rank 1 raised) and the same 2 ranks resumed.
    assert resumed_at(crashed_alone.out) == [8]
    from optrun.runtime.model import build_model
    from optrun.runtime.training.checkpoint import CheckpointStore

    weights = []
    for out in (two_ranks("ddp")[1], crashed_alone.out):
        store = CheckpointStore(out / "checkpoints", keep=3)
        found = store.latest()
        assert found is not None and found.step == 16
        model = build_model("tiny-lm")
        store.restore(found, model)
        weights.append(model.state_dict())
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name


def test_a_rank_that_hangs_ends_the_attempt_within_the_collective_timeout(tmp_path: Path) -> None:
    stall = [{"type": "stall", "atStep": 3, "durationSeconds": 600, "rank": 1}]
    path = manifest(tmp_path, "hang", ranks=2, timeout=10, faults=stall, backoffLimit=0)
    started = time.monotonic()
    # The stalled rank cannot checkpoint when torchrun's SIGTERM comes: it ends when its grace
    # (OPTRUN_TERM_GRACE, 20 s by default) runs out, which is no part of the bound tested here.
    run(path, tmp_path / "out", expect_crash=True, env={"OPTRUN_TERM_GRACE": "1"})
    # torchrun's start-up, rank 0's 10 s wait in the gradient all-reduce (10 s: the smallest
    # timeoutSeconds allowed), the group torn down: far below the 600 s the stalled rank would
    # have held the others.
    assert time.monotonic() - started < 120
    logs = {p.parent.name: p.read_text() for p in (tmp_path / "out" / "ranks").rglob("stderr.log")}
    # Both ranks reached step 3 (no collective timed out before the stall)...
    assert "injecting a stall of 600.0s at step 3" in logs["1"], logs["1"][-3000:]
    # ...and rank 0 gave up on rank 1 after the 10 s timeout.
    failed = "attempt 1 of training failed" in logs["0"]
    assert failed and "Timed out waiting 10000ms" in logs["0"], logs["0"][-3000:]


def test_a_rank_that_crashes_alone_ends_the_attempt_at_once_and_its_fault_is_not_replayed(
    crashed_alone: CrashedAlone,
) -> None:
    # Rank 1 records the fault in the checkpoint and exits; torchrun ends rank 0 with it. Had
    # rank 1 waited alone in a collective, both would have waited out the 300 s timeout.
    assert crashed_alone.seconds < 120
    first = crashed_alone.first
    assert "attempt 1 of training failed: injected exception at step 10" in first["1"], first["1"][-3000:]
    # The next run resumes from step 8 and replays step 10 without the fault: it was recorded.
    assert crashed_alone.report["training"]["steps"] == 16
    rank1 = [p.read_text() for p in (crashed_alone.out / "ranks").rglob("1/stderr.log")]
    assert len(rank1) == 2 and sum(log.count("injecting fault exception") for log in rank1) == 1


def test_a_hf_model_under_fsdp_hands_the_whole_trained_model_on(tmp_path: Path) -> None:
    from optrun.runtime.lm.example import make_model, write_dataset

    model = make_model(tmp_path / "llama", "llama")
    data = write_dataset(tmp_path / "train.jsonl")
    path = manifest(
        tmp_path,
        "hf",
        ranks=2,
        strategy="fsdp",
        workload={
            "model": {"path": str(model)},
            "dataset": {"path": str(data)},
            "sequenceLength": 32,
            "batchSize": 8,
        },
        optimizations={
            "kernels": {"enabled": True},
            "compression": {"enabled": True},
            "kvCache": {"enabled": False},
        },
    )
    report = run(path, tmp_path / "out")
    assert report["distributed"]["strategy"] == "fsdp"
    tests = {t["name"]: t for t in report["tests"]}
    # Rank 0 gathered the shards into one model: the lineage is unbroken and that model, quantized,
    # is the artifact that from_pretrained loads.
    for name in (
        "infra.lineage-unbroken",
        "infra.artifact-reloads",
        "infra.checkpoint-restores",
        "kernels.parity",
    ):
        assert tests[name]["passed"], tests[name]["reason"]
