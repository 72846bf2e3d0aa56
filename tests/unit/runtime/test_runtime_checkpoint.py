"""Checkpoints are atomic and bounded: a torn or half-written checkpoint never replaces a good
one, the newest complete checkpoint is the one that loads, and only the newest `keep` stay."""

from __future__ import annotations

import copy
import pickle
import threading
from pathlib import Path

import pytest
import torch

from optrun.runtime.training.checkpoint import CheckpointStore
from optrun.runtime.training.loop import Interrupted
from tests.unit.runtime.runtime_support import MakeTrainer, small_spec


def meta(step: int) -> dict[str, object]:
    return {"step": step, "note": f"checkpoint {step}"}


def model(value: float) -> torch.nn.Module:
    m = torch.nn.Linear(64, 64)
    with torch.no_grad():
        m.weight.fill_(value)
    return m


def test_store_keeps_only_the_newest_checkpoints(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=2)
    for step in (2, 4, 6, 8, 10):
        store.save(step, meta(step), model=model(step))
    assert [p.name for p in store.paths()] == ["step-000000008", "step-000000010"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000008", "step-000000010"]


def test_checkpoints_are_ordered_by_step_not_by_name_or_time(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=5)
    for step in (100, 9, 1000):
        store.save(step, meta(step))
    found = store.latest()
    assert found is not None
    assert found.step == 1000 and found.meta["step"] == 1000


def test_a_checkpoint_restores_its_tensors_into_a_live_model(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=3)
    store.save(4, meta(4), model=model(4.0))
    target = model(0.0)
    found = store.latest()
    assert found is not None
    store.restore(found, target)
    assert torch.equal(target.weight, torch.full((64, 64), 4.0))


def test_leftover_temp_directory_is_ignored_and_previous_checkpoint_loads(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=3)
    store.save(4, meta(4), model=model(4.0))
    # A crash in the middle of the next save leaves its temporary directory, partly written.
    partial = tmp_path / ".tmp-step-000000006"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"half")
    found = store.latest()
    assert found is not None and found.path.name == "step-000000004"
    target = model(0.0)
    store.restore(found, target)
    assert torch.equal(target.weight, torch.full((64, 64), 4.0))


@pytest.mark.parametrize("breakage", ["meta-empty", "meta-truncated", "tensors-missing"])
def test_a_broken_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path: Path, breakage: str) -> None:
    store = CheckpointStore(tmp_path, keep=3)
    store.save(2, meta(2), model=model(2.0))
    newest = store.save(4, meta(4), model=model(4.0))
    if breakage == "meta-empty":
        (newest / "meta.pt").write_bytes(b"")
    elif breakage == "meta-truncated":
        data = (newest / "meta.pt").read_bytes()
        (newest / "meta.pt").write_bytes(data[:-16])
    else:
        (newest / ".metadata").unlink()
    found = store.latest()
    assert found is not None
    assert found.path.name == "step-000000002" and found.meta["step"] == 2


def test_no_loadable_checkpoint_means_none(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=3)
    assert store.latest() is None
    (tmp_path / "step-000000002").mkdir()
    (tmp_path / "step-000000002" / "meta.pt").write_bytes(b"not a checkpoint")
    assert store.latest() is None


def test_failed_save_leaves_no_temp_directory_and_the_previous_checkpoint_intact(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=3)
    store.save(2, meta(2))
    unpicklable = {"step": 4, "callback": lambda: None}  # torch.save cannot pickle a lambda
    with pytest.raises((pickle.PicklingError, AttributeError)):
        store.save(4, unpicklable)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000002"]
    found = store.latest()
    assert found is not None
    assert found.meta["step"] == 2


def test_trainer_checkpoint_holds_everything_a_resume_needs(make_trainer: MakeTrainer) -> None:
    trainer = make_trainer(small_spec(training={"epochs": 1}))
    trainer.fit()
    found = trainer.store.latest()
    assert found is not None
    saved = found.meta
    assert {
        "scheduler",
        "scaler",
        "rng",
        "generator",
        "position",
        "bookkeeping",
        "faults_fired",
    } <= saved.keys()
    assert saved["saved"] == ["model", "optimizer"]
    position = saved["position"]
    assert position["step"] == 6
    assert position["epoch"] * 6 + position["step_in_epoch"] == 6
    assert {"python", "numpy", "torch"} <= saved["rng"].keys()
    fresh = copy.deepcopy(trainer.model)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    trainer.store.restore(found, fresh)
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name


def test_trainer_keeps_only_the_configured_number_of_checkpoints(make_trainer: MakeTrainer) -> None:
    spec = small_spec(training={"checkpoint": {"everySteps": 1, "keep": 2}})
    trainer = make_trainer(spec)
    trainer.fit()
    names = [p.name for p in trainer.store.paths()]
    assert names == ["step-000000011", "step-000000012"]


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
    assert [p.name for p in trainer.store.paths()] == ["step-000000000", "step-000000003"]
