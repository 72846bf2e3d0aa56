"""Two real processes in a gloo group on 127.0.0.1: bytes per step of each codec against plain
allreduce, and where training ends up with compressed gradients."""

from __future__ import annotations

import pytest

from optrun.runtime.compression.ddp_run import DDPJob, DDPRunError, compare

pytestmark = pytest.mark.slow

LOSS_TOLERANCE = 0.05  # the spec's default lossTolerance: relative held-out loss difference


@pytest.fixture(scope="module")
def tiny():
    """tiny-lm, 20 steps of AdamW on 2 ranks, once per hook from the same weights and batches."""
    return compare(
        DDPJob(
            model="tiny-lm",
            hooks=["allreduce", "int8", "lowrank"],
            steps=20,
            batch_size=8,
            seq_len=64,
            learning_rate=1e-3,
            timeout_s=120,
        )
    )


@pytest.fixture(scope="module")
def small():
    """small-lm (512-wide, 8 layers): its large matrices are where rank 4 pays. Three steps: two
    of PowerSGD's dense warm-up, one compressed; bytes do not depend on the batch, so it is tiny."""
    return compare(
        DDPJob(
            model="small-lm",
            hooks=["allreduce", "lowrank"],
            steps=3,
            batch_size=1,
            seq_len=16,
            timeout_s=150,
        )
    )


def _ratio(results, hook):
    return results["allreduce"]["bytesPerStep"] / results[hook]["bytesPerStep"]


def test_int8_sends_about_four_times_fewer_bytes_than_allreduce(tiny):
    assert tiny["allreduce"]["bytesPerStep"] == tiny["allreduce"]["denseBytesPerStep"]
    assert 3.5 <= _ratio(tiny, "int8") <= 4.0


def test_lowrank_rank_4_sends_at_least_30_times_fewer_bytes_on_the_large_model(small):
    assert _ratio(small, "lowrank") >= 30
    # The first two steps are PowerSGD's dense warm-up; the steady steps are compressed.
    assert small["lowrank"]["steps"] == 3


@pytest.mark.parametrize("hook", ["int8", "lowrank"])
def test_compressed_training_ends_within_tolerance_of_the_uncompressed_loss(tiny, hook):
    base, comp = tiny["allreduce"], tiny[hook]
    assert base["evalLoss"] < base["losses"][0] - 1.0  # the run really trained
    assert abs(comp["evalLoss"] - base["evalLoss"]) / base["evalLoss"] <= LOSS_TOLERANCE


def test_every_rank_ends_with_the_same_weights(tiny, small):
    assert all(r["ranksAgree"] for res in (tiny, small) for r in res.values())


def test_a_failing_rank_is_reported_with_its_error():
    with pytest.raises(DDPRunError, match="unknown built-in model 'no-such-lm'"):
        compare(DDPJob(model="no-such-lm", hooks=["allreduce"], steps=3, timeout_s=60))
