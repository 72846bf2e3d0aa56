"""Checkpoints are atomic and bounded: a torn or half-written file never replaces a good one,
the newest complete checkpoint is the one that loads, and only the newest `keep` stay."""

from __future__ import annotations

import pickle
import threading
from pathlib import Path

import pytest
import torch

from optrun.runtime.training.checkpoint import CheckpointStore
from optrun.runtime.training.loop import Interrupted
from tests.unit.runtime.runtime_support import MakeTrainer, small_spec


def state(step: int) -> dict[str, object]:
    return {"step": step, "weights": torch.full((64, 64), float(step))}


def test_store_keeps_only_the_newest_checkpoints(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=2)
    for step in (2, 4, 6, 8, 10):
        store.save(step, state(step))
    assert [p.name for p in store.paths()] == ["step-000000008.pt", "step-000000010.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000008.pt", "step-000000010.pt"]


def test_checkpoints_are_ordered_by_step_not_by_name_or_time(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=5)
    for step in (100, 9, 1000):
        store.save(step, state(step))
    found = store.latest()
    assert found is not None
    assert found[1]["step"] == 1000


def test_leftover_temp_file_is_ignored_and_previous_checkpoint_loads(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=3)
    store.save(4, state(4))
    # A crash in the middle of the next save leaves a temp file with part of a checkpoint.
    partial = (tmp_path / "step-000000004.pt").read_bytes()[:100]
    (tmp_path / ".tmp-abc123").write_bytes(partial)
    found = store.latest()
    assert found is not None
    path, loaded = found
    assert path.name == "step-000000004.pt"
    assert torch.equal(loaded["weights"], state(4)["weights"])


@pytest.mark.parametrize("keep_bytes", [0, 200, -16], ids=["empty", "head-only", "tail-cut"])
def test_truncated_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path: Path, keep_bytes: int) -> None:
    store = CheckpointStore(tmp_path, keep=3)
    store.save(2, state(2))
    newest = store.save(4, state(4))
    data = newest.read_bytes()
    newest.write_bytes(data[:keep_bytes])
    found = store.latest()
    assert found is not None
    path, loaded = found
    assert path.name == "step-000000002.pt"
    assert loaded["step"] == 2


def test_no_loadable_checkpoint_means_none(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=3)
    assert store.latest() is None
    (tmp_path / "step-000000002.pt").write_bytes(b"not a checkpoint")
    assert store.latest() is None


def test_failed_save_leaves_no_temp_file_and_the_previous_checkpoint_intact(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=3)
    store.save(2, state(2))
    unpicklable = {"step": 4, "callback": lambda: None}  # torch.save cannot pickle a lambda
    with pytest.raises((pickle.PicklingError, AttributeError)):
        store.save(4, unpicklable)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000002.pt"]
    found = store.latest()
    assert found is not None
    assert found[1]["step"] == 2


def test_trainer_checkpoint_holds_everything_a_resume_needs(make_trainer: MakeTrainer) -> None:
    trainer = make_trainer(small_spec(training={"epochs": 1}))
    trainer.fit()
    found = trainer.store.latest()
    assert found is not None
    _, saved = found
    assert {
        "model",
        "optimizer",
        "scheduler",
        "scaler",
        "rng",
        "generator",
        "position",
        "bookkeeping",
        "faults_fired",
    } <= saved.keys()
    position = saved["position"]
    assert position["step"] == 6
    assert position["epoch"] * 6 + position["step_in_epoch"] == 6
    assert {"python", "numpy", "torch"} <= saved["rng"].keys()
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(saved["model"][name], value), name


def test_trainer_keeps_only_the_configured_number_of_checkpoints(make_trainer: MakeTrainer) -> None:
    spec = small_spec(training={"checkpoint": {"everySteps": 1, "keep": 2}})
    trainer = make_trainer(spec)
    trainer.fit()
    names = [p.name for p in trainer.store.paths()]
    assert names == ["step-000000011.pt", "step-000000012.pt"]


def test_stop_request_writes_a_checkpoint_at_the_current_step(make_trainer: MakeTrainer) -> None:
    stop = threading.Event()

    def on_step(trainer: object) -> None:
        if getattr(trainer, "step", 0) == 3:
            stop.set()

    # Checkpoints every 50 steps: the one at step 3 can only come from the stop request.
    spec = small_spec(training={"checkpoint": {"everySteps": 50, "keep": 3}})
    trainer = make_trainer(spec, stop=stop, on_step=on_step)
    with pytest.raises(Interrupted, match="step 3"):
        trainer.fit()
    assert [p.name for p in trainer.store.paths()] == ["step-000000000.pt", "step-000000003.pt"]
