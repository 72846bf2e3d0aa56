"""Deliberate fault injection (`spec.faults`), so a user can prove that the gates work.

A fault fires at a global optimizer step. A one-shot fault fires once per run (a rollback
that replays the step does not fire it again: that is what lets a recovery succeed). A
persistent fault fires at its step and at every step after it, which no recovery can fix
(skipping the batch does not help either). Which one-shot faults fired is part of the
checkpoint, so a resumed attempt does not fire them again.
"""

from __future__ import annotations

import logging
import time

import torch

from optrun.api.v1alpha1 import Fault

log = logging.getLogger(__name__)


class InjectedFault(RuntimeError):
    """The `exception` fault: an error the training loop does not know how to recover from."""


class SimulatedOOM(torch.OutOfMemoryError):
    """The `oom` fault: raised where a real out-of-memory error would be."""


class FaultInjector:
    def __init__(self, faults: list[Fault], rank: int = 0) -> None:
        self.faults = list(faults)
        self.rank = rank
        self.fired: set[int] = set()  # indexes of one-shot faults that already fired
        # Step at which each loss-side fault fired in this process: it keeps firing for the whole
        # of that step, so a step retried (at a lower fp16 loss scale) meets the same fault.
        self.firing: dict[int, int] = {}

    def _fires(self, i: int, f: Fault, step: int) -> bool:
        if f.rank is not None and f.rank != self.rank:
            return False
        if f.persistent:
            return step >= f.at_step
        return step == f.at_step and i not in self.fired

    def _due(self, step: int, kind: str, *, whole_step: bool = False) -> bool:
        for i, f in enumerate(self.faults):
            if f.type == kind and whole_step and self.firing.get(i) == step:
                return True
            if f.type == kind and self._fires(i, f, step):
                self.firing[i] = step
                self.fired.add(i)
                log.warning(
                    "injecting fault %s at step %d%s", kind, step, " (persistent)" if f.persistent else ""
                )
                return True
        return False

    def before_step(self, step: int) -> None:
        """Faults that happen before the forward pass: exception, stall."""
        if self._due(step, "exception"):
            raise InjectedFault(f"injected exception at step {step}")
        for i, f in enumerate(self.faults):
            if f.type == "stall" and self._fires(i, f, step):
                self.fired.add(i)
                log.warning("injecting a stall of %.1fs at step %d", f.duration_seconds, step)
                time.sleep(f.duration_seconds)  # the fault itself: a step that hangs

    def after_forward(self, step: int) -> None:
        """The oom fault, raised at the end of a forward: where a real one strikes (activations
        are what runs out), and past the forward's own collectives (DDP's buffer broadcast,
        FSDP's all-gathers), where the ranks can still agree on it (Trainer._forward_backward)."""
        if self._due(step, "oom"):
            raise SimulatedOOM(f"injected out-of-memory at step {step}")

    def corrupt_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """The loss-side faults: a non-finite loss, or an exploding gradient (loss scaled by 1e12)."""
        if self._due(step, "nan-loss", whole_step=True):
            return loss * float("nan")
        if self._due(step, "exploding-gradient", whole_step=True):
            return loss * 1e12
        return loss

    def state(self) -> list[int]:
        return sorted(self.fired)

    def load_state(self, fired: list[int]) -> None:
        self.fired = set(fired)
