"""A resumed CPU run ends bitwise equal to an uninterrupted one.

The uninterrupted run trains the whole schedule; the interrupted one is stopped (the `stop`
event, as SIGTERM sets it) partway, and a new Trainer with a freshly built model resumes from
the checkpoint directory. Every parameter, every optimizer state tensor, the scheduler, the
data position and the loss history must then be identical, not merely close.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from optrun.runtime.training.loop import Interrupted, Trainer
from tests.unit.runtime.runtime_support import MakeTrainer, small_spec


def assert_same_state(a: Trainer, b: Trainer) -> None:
    pa, pb = a.model.state_dict(), b.model.state_dict()
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), f"parameter {name} differs after resume"
    oa, ob = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert oa["state"].keys() == ob["state"].keys()
    for index, state in oa["state"].items():
        for key, value in state.items():
            other = ob["state"][index][key]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other), f"optimizer state {index}.{key} differs after resume"
            else:
                assert value == other, f"optimizer state {index}.{key} differs after resume"
    assert [g["lr"] for g in oa["param_groups"]] == [g["lr"] for g in ob["param_groups"]]
    assert a.scheduler.state_dict() == b.scheduler.state_dict()
    assert (a.epoch, a.step_in_epoch, a.step) == (b.epoch, b.step_in_epoch, b.step)
    assert a.losses == b.losses


def stop_after(step: int, stop: threading.Event) -> object:
    def on_step(trainer: Trainer) -> None:
        if trainer.step == step:
            stop.set()

    return on_step


# 5: mid-epoch, between two checkpoints; 6: exactly at the epoch boundary (epoch 0 has 6 steps).
@pytest.mark.parametrize("stop_at", [5, 6])
def test_resumed_run_ends_bitwise_equal_to_uninterrupted_run(
    make_trainer: MakeTrainer, tmp_path: Path, stop_at: int
) -> None:
    spec = small_spec()
    straight = make_trainer(spec, tmp_path / "straight")
    straight.fit()
    assert straight.step == 12

    stop = threading.Event()
    first = make_trainer(spec, tmp_path / "interrupted", stop=stop, on_step=stop_after(stop_at, stop))
    with pytest.raises(Interrupted):
        first.fit()
    assert first.step == stop_at

    # A new process: fresh weights (deliberately perturbed, so only the checkpoint can restore
    # them) and a new trainer over the same checkpoint directory.
    second = make_trainer(spec, tmp_path / "interrupted")
    with torch.no_grad():
        for p in second.model.parameters():
            p.add_(1.0)
    assert second.resume()
    assert second.step == stop_at
    second.fit()

    assert_same_state(straight, second)


def test_resume_without_a_checkpoint_starts_from_step_zero(make_trainer: MakeTrainer) -> None:
    trainer = make_trainer(small_spec())
    assert trainer.resume() is False
    assert trainer.step == 0


def test_resume_after_a_finished_run_changes_nothing(make_trainer: MakeTrainer, tmp_path: Path) -> None:
    spec = small_spec(training={"epochs": 1})
    done = make_trainer(spec, tmp_path / "run")
    done.fit()
    again = make_trainer(spec, tmp_path / "run")
    assert again.resume()
    summary = again.fit()
    assert summary.steps == done.step == 6
    assert_same_state(done, again)
