"""Safety gates and their recoveries, proven with the faults a user can inject (`spec.faults`).

Each test trains the tiny model for a few steps with one fault and checks what the trainer did
about it: what tripped, how often, which recovery ran, and that training still ended (or, where
the policy or the budget says so, failed the gate).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from optrun.runtime.training.faults import InjectedFault
from optrun.runtime.training.gates import SafetyGateFailed
from tests.unit.runtime.runtime_support import MakeTrainer, small_spec


def finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def events(jsonl: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in jsonl.read_text().splitlines()]


def fault_spec(*faults: dict[str, object], policy: str = "rollback", budget: int = 3, epochs: int = 1):
    return small_spec(
        training={"epochs": epochs},
        faults=list(faults),
        safety={"nonFiniteLoss": policy, "maxRecoveries": budget},
    )


def test_nan_loss_is_caught_and_rolled_back_and_training_completes(
    make_trainer: MakeTrainer, tmp_path: Path
) -> None:
    # Checkpoints every 2 steps: the fault at step 5 rolls back to the checkpoint of step 4.
    spec = fault_spec({"type": "nan-loss", "atStep": 5})
    trainer = make_trainer(spec, jsonl=tmp_path / "metrics.jsonl")
    summary = trainer.fit()

    assert trainer.book.trips == {"nan_loss": 1}
    assert trainer.book.recoveries == 1
    assert trainer.book.events[0]["rolled_back_to"] == 4
    assert trainer.book.lr_scale == 0.5
    assert summary.steps == trainer.step == 6
    assert finite(trainer.model)
    # The offending batch is skipped when it comes round again; every other step trained.
    assert [s for s, _ in trainer.losses] == [0, 1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in trainer.losses)
    logged = events(tmp_path / "metrics.jsonl")
    assert {"event": "gate", "gate": "nan_loss", "step": 5, "action": "rollback"}.items() <= logged[
        [e["event"] for e in logged].index("gate")
    ].items()
    assert any(e["event"] == "recovery" and e["action"] == "rollback" for e in logged)
    assert any(e["event"] == "skip" and e["step"] == 5 for e in logged)


def test_rollback_halves_the_learning_rate_for_the_rest_of_the_run(make_trainer: MakeTrainer) -> None:
    clean = make_trainer(small_spec(training={"epochs": 1}))
    clean.fit()
    faulty = make_trainer(fault_spec({"type": "nan-loss", "atStep": 3}))
    faulty.fit()
    assert faulty.optimizer.param_groups[0]["lr"] == pytest.approx(
        clean.optimizer.param_groups[0]["lr"] * 0.5
    )


def test_skip_policy_drops_the_batch_without_rolling_back(make_trainer: MakeTrainer) -> None:
    trainer = make_trainer(fault_spec({"type": "nan-loss", "atStep": 3}, policy="skip"))
    trainer.fit()
    assert trainer.book.trips == {"nan_loss": 1}
    assert trainer.book.recoveries == 1
    assert trainer.book.events[0]["action"] == "skip"
    assert "rolled_back_to" not in trainer.book.events[0]
    assert trainer.book.lr_scale == 1.0
    assert [s for s, _ in trainer.losses] == [0, 1, 2, 4, 5]
    assert trainer.step == 6
    assert finite(trainer.model)


def test_fail_policy_raises_at_the_first_non_finite_loss(make_trainer: MakeTrainer) -> None:
    trainer = make_trainer(fault_spec({"type": "nan-loss", "atStep": 2}, policy="fail"))
    with pytest.raises(SafetyGateFailed, match="step 2") as failed:
        trainer.fit()
    assert failed.value.gate == "nan_loss"
    assert trainer.book.recoveries == 0
    assert trainer.step == 2


@pytest.mark.parametrize("policy", ["rollback", "skip"])
def test_persistent_fault_exhausts_the_recovery_budget_and_fails_the_gate(
    make_trainer: MakeTrainer, policy: str
) -> None:
    spec = fault_spec({"type": "nan-loss", "atStep": 2, "persistent": True}, policy=policy, budget=2)
    trainer = make_trainer(spec)
    with pytest.raises(SafetyGateFailed, match="maxRecoveries 2") as failed:
        trainer.fit()
    assert failed.value.gate == "recovery_budget"
    assert trainer.book.recoveries == 3
    assert trainer.book.trips["nan_loss"] == 3


def test_zero_recovery_budget_fails_at_the_first_trip(make_trainer: MakeTrainer) -> None:
    trainer = make_trainer(fault_spec({"type": "nan-loss", "atStep": 1}, budget=0))
    with pytest.raises(SafetyGateFailed):
        trainer.fit()
    assert trainer.book.trips == {"nan_loss": 1}


def test_exploding_gradient_trips_the_gradient_gate_and_recovers(make_trainer: MakeTrainer) -> None:
    trainer = make_trainer(fault_spec({"type": "exploding-gradient", "atStep": 3}))
    trainer.fit()
    assert trainer.book.trips == {"gradient_exploding": 1}
    assert "maxNorm" in trainer.book.events[0]["detail"]
    assert trainer.book.recoveries == 1
    assert trainer.step == 6
    assert finite(trainer.model)


def test_vanishing_gradient_bound_trips_the_gradient_gate(make_trainer: MakeTrainer) -> None:
    # A floor no real gradient reaches: every step trips gradient_vanishing; the budget ends it.
    spec = small_spec(
        training={"epochs": 1},
        safety={"gradientFlow": {"minNorm": 1.0e3, "maxNorm": 1.0e4}, "maxRecoveries": 1},
    )
    trainer = make_trainer(spec)
    with pytest.raises(SafetyGateFailed):
        trainer.fit()
    assert trainer.book.trips["gradient_vanishing"] == 2


def test_simulated_oom_halves_the_micro_batch_and_gives_the_full_batch_step(
    make_trainer: MakeTrainer, tmp_path: Path
) -> None:
    spec = small_spec(training={"epochs": 1, "stepsPerEpoch": 3}, workload={"batchSize": 8})
    full = make_trainer(spec, tmp_path / "full")
    full.fit()
    halved = make_trainer(spec.model_copy(update={"faults": fault_spec({"type": "oom", "atStep": 2}).faults}))
    halved.fit()

    assert halved.book.trips == {"oom": 1}
    # A back-off of its own name, not a recovery: nothing in the training went wrong.
    assert halved.book.oom_backoffs == 1 and halved.book.recoveries == 0
    assert halved.book.micro_batches == 2
    assert halved.book.events[0]["action"] == "halve-micro-batch"
    # Steps 0 and 1 are identical; step 2 ran as two micro-batches of 4 with accumulated gradients.
    assert halved.losses[:2] == full.losses[:2]
    assert halved.losses[2][1] == pytest.approx(full.losses[2][1], rel=1e-6)
    for (name, a), b in zip(full.model.state_dict().items(), halved.model.state_dict().values(), strict=True):
        # One AdamW step moves a weight by at most about lr (3e-3 here, scaled by the warm-up);
        # the two summation orders of fp32 gradients differ far below that.
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_out_of_memory_at_micro_batch_one_fails_the_gate(make_trainer: MakeTrainer) -> None:
    spec = small_spec(
        training={"epochs": 1},
        workload={"batchSize": 2},
        faults=[{"type": "oom", "atStep": 1}, {"type": "oom", "atStep": 1}, {"type": "oom", "atStep": 1}],
    )
    trainer = make_trainer(spec)
    with pytest.raises(SafetyGateFailed, match="micro-batch size 1") as failed:
        trainer.fit()
    assert failed.value.gate == "oom"


def test_exception_fault_propagates_out_of_training(make_trainer: MakeTrainer) -> None:
    trainer = make_trainer(fault_spec({"type": "exception", "atStep": 3}))
    with pytest.raises(InjectedFault, match="step 3"):
        trainer.fit()
    assert trainer.step == 3


def test_one_shot_fault_does_not_fire_again_in_the_attempt_that_resumes(
    make_trainer: MakeTrainer, tmp_path: Path
) -> None:
    # The first attempt crashes at step 3, after its last checkpoint (step 2); the next attempt
    # resumes from step 2 and replays step 3, where the fault must not fire a second time.
    spec = fault_spec({"type": "exception", "atStep": 3})
    first = make_trainer(spec, tmp_path / "run")
    with pytest.raises(InjectedFault):
        first.fit()
    second = make_trainer(spec, tmp_path / "run")
    assert second.resume()
    assert second.step == 2
    summary = second.fit()
    assert summary.steps == 6


def test_fired_faults_survive_a_resume_after_a_rollback(make_trainer: MakeTrainer, tmp_path: Path) -> None:
    spec = fault_spec({"type": "nan-loss", "atStep": 3}, epochs=2)
    first = make_trainer(spec, tmp_path / "run")
    first.fit()
    second = make_trainer(spec, tmp_path / "run")
    assert second.resume()
    assert second.faults.state() == [0]
    assert second.book.trips == {"nan_loss": 1}
    assert second.book.recoveries == 1


def test_fp16_loss_scale_overflow_is_the_scalers_not_a_rollback(make_trainer: MakeTrainer) -> None:
    # A loss scale of 2^60 overflows every fp16 backward: the scaler's ordinary business. The
    # step is retried at half the scale until it fits; nothing trips, nothing rolls back.
    spec = small_spec(training={"epochs": 1, "stepsPerEpoch": 3}, workload={"precision": "fp16"})
    trainer = make_trainer(spec)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60)
    trainer.fit()
    assert trainer.book.trips == {} and trainer.book.recoveries == 0
    assert trainer.book.scaler_overflows >= 1
    assert trainer.scaler.get_scale() < 2.0**60
    assert [s for s, _ in trainer.losses] == [0, 1, 2]
    assert finite(trainer.model)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_one_overflowing_backward_is_the_scalers_in_fp16_and_a_rollback_in_bf16(
    make_trainer: MakeTrainer, precision: str
) -> None:
    # The first backward of step 1 overflows (its gradients reach inf), the retry's does not.
    # fp16: an overflow at a loss scale above 1 is the GradScaler's: the step is retried at half
    # the scale and trains; nothing trips, nothing rolls back. bf16 has no scaler (its range is
    # fp32's, there is no scale to lower): an inf gradient is the gate's, one trip and one
    # rollback to the checkpoint of step 0, step 1's batch skipped when it comes round.
    spec = small_spec(
        training={"epochs": 1, "stepsPerEpoch": 3},
        workload={"precision": precision},
        safety={"nonFiniteLoss": "rollback", "maxRecoveries": 3},
    )
    trainer = make_trainer(spec)
    overflowed: list[int] = []

    def overflow_once(grad: torch.Tensor) -> torch.Tensor:
        if trainer.step == 1 and not overflowed:
            overflowed.append(trainer.step)
            return torch.full_like(grad, float("inf"))
        return grad

    trainer.model.output.weight.register_hook(overflow_once)
    trainer.fit()
    assert overflowed == [1] and trainer.step == 3 and finite(trainer.model)
    if precision == "fp16":
        assert trainer.book.trips == {} and trainer.book.recoveries == 0
        assert trainer.book.scaler_overflows == 1
        assert [s for s, _ in trainer.losses] == [0, 1, 2]
    else:
        assert trainer.book.trips == {"gradient_exploding": 1} and trainer.book.recoveries == 1
        assert trainer.book.scaler_overflows == 0
        assert trainer.book.events[0]["rolled_back_to"] == 0
        assert [s for s, _ in trainer.losses] == [0, 2]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_an_exploding_gradient_still_rolls_back_in_half_precision(
    make_trainer: MakeTrainer, precision: str
) -> None:
    # An explosion no loss scale absorbs: fp16 lowers its scale to 1 and then trips the gate;
    # bf16 has no scaler and trips at once. Either way one rollback, and training completes.
    spec = small_spec(
        training={"epochs": 1, "stepsPerEpoch": 4},
        workload={"precision": precision},
        faults=[{"type": "exploding-gradient", "atStep": 3}],
        safety={"nonFiniteLoss": "rollback", "maxRecoveries": 3},
    )
    trainer = make_trainer(spec)
    trainer.fit()
    assert trainer.book.trips == {"gradient_exploding": 1} and trainer.book.recoveries == 1
    assert trainer.step == 4 and finite(trainer.model)
    # fp16 first took the explosion for an overflow and lowered its scale; bf16 has no scale.
    assert (trainer.book.scaler_overflows > 0) == (precision == "fp16")
