"""The training loop: epochs, evaluation, a warm-up + cosine schedule, checkpoints, and the
safety gates with their recoveries.

Determinism: weights, data order and every random draw come from the seed; the data position
is (epoch, step in epoch, the epoch generator's state), saved with each checkpoint, so a
resumed CPU run ends bitwise equal to an uninterrupted one.

Recovery: a tripped gate (non-finite loss, vanished or exploded gradients) is answered per
`spec.safety.nonFiniteLoss`: `rollback` restores the last good checkpoint, skips the offending
batch when it comes round again and halves the learning rate; `skip` drops the batch; `fail`
stops. An out-of-memory error halves the micro-batch (gradient accumulation keeps the
effective batch), on every rank of a distributed run when it strikes any of them: an
out-of-memory back-off, counted as such, not as a recovery. One in the optimizer step (its
state, not the batch) fails the oom gate. Each recovery
(rollback, skip) counts against `maxRecoveries`; past it the gate fails. The
recovery bookkeeping (trips, recoveries, skipped steps, learning-rate scale) is never rolled
back: a rollback undoes training, not the memory of why it happened.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from optrun.api.result import TrainingSummary
from optrun.api.v1alpha1 import OptimizationRunSpec
from optrun.runtime import distributed
from optrun.runtime.data import Corpus
from optrun.runtime.distributed import Dist
from optrun.runtime.lm.base import DTYPES, adamw, autocast, evaluate
from optrun.runtime.metrics import Metrics
from optrun.runtime.training.checkpoint import Checkpoint, CheckpointStore, rng_state, set_rng_state
from optrun.runtime.training.faults import FaultInjector, InjectedFault
from optrun.runtime.training.gates import (
    SafetyGateFailed,
    Trip,
    check_gradients,
    check_loss,
    group_grad_norms,
)

log = logging.getLogger(__name__)


class Interrupted(RuntimeError):
    """Training stopped on request (SIGTERM) after writing a checkpoint."""


# How a micro-batch's forward went, agreed over the ranks (the worst wins): see _forward_backward.
_OK, _TRIPPED, _OUT_OF_MEMORY = 0, 1, 2


class _ScalerOverflow(Exception):
    """The fp16 loss scale overflowed the gradients of this step (see Trainer._scaler_overflow)."""


@dataclass
class Bookkeeping:
    """What survives a rollback."""

    lr_scale: float = 1.0
    micro_batches: int = 1
    skip_steps: set[int] = field(default_factory=set)
    recoveries: int = 0
    trips: dict[str, int] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    # fp16: steps whose scaled gradients overflowed and were retried at a lower loss scale (the
    # GradScaler's ordinary business, not a gate trip: nothing is rolled back).
    scaler_overflows: int = 0
    # Out-of-memory back-offs: each halves the micro-batch (bounded by the batch size, so no
    # budget of its own; not a recovery: nothing was wrong with the training).
    oom_backoffs: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "lr_scale": self.lr_scale,
            "micro_batches": self.micro_batches,
            "skip_steps": sorted(self.skip_steps),
            "recoveries": self.recoveries,
            "trips": dict(self.trips),
            "events": list(self.events),
            "scaler_overflows": self.scaler_overflows,
            "oom_backoffs": self.oom_backoffs,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Bookkeeping:
        return cls(
            lr_scale=d["lr_scale"],
            micro_batches=d["micro_batches"],
            skip_steps=set(d["skip_steps"]),
            recoveries=d["recoveries"],
            trips=dict(d["trips"]),
            events=list(d["events"]),
            scaler_overflows=d.get("scaler_overflows", 0),  # older checkpoints have none
            oom_backoffs=d.get("oom_backoffs", 0),
        )


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine decay to 0.1 of the peak at `total` steps."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


class Trainer:
    def __init__(
        self,
        spec: OptimizationRunSpec,
        model: nn.Module,
        corpus: Corpus,
        device: torch.device,
        store: CheckpointStore,
        metrics: Metrics,
        *,
        stop: threading.Event | None = None,
        on_step: Callable[[Trainer], None] | None = None,
        dist: Dist | None = None,
    ) -> None:
        self.spec = spec
        self.model = model
        self.dist = dist
        # What a step calls: the model itself, or its DDP / FSDP2 form on this rank. FSDP2 turns
        # the parameters into sharded DTensors, so the optimizer is built after wrapping.
        self.module, self.comm_stats = (model, None) if dist is None else distributed.wrap(model, dist, spec)
        self.corpus = corpus
        self.device = device
        self.store = store
        self.metrics = metrics
        self.stop = stop or threading.Event()
        self.on_step = on_step
        t = spec.training
        w = spec.workload
        self.seq_len, self.batch_size = w.sequence_length, w.batch_size
        # This rank's rows of the global batch (all of it in a one-process run).
        world, rank = (dist.world_size, dist.rank) if dist is not None else (1, 0)
        self.rows = slice(rank * self.batch_size // world, (rank + 1) * self.batch_size // world)
        self.steps_per_epoch = t.steps_per_epoch or corpus.batches_per_epoch(self.seq_len, self.batch_size)
        self.total_steps = self.steps_per_epoch * t.epochs
        self.eval_every = max(1, self.steps_per_epoch // 4)
        self.eval_set = corpus.eval_batches(self.seq_len, self.batch_size, t.eval_batches)
        self.optimizer = adamw(model, t.learning_rate, t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(t.warmup_steps, self.total_steps)
        )
        self.amp_dtype = DTYPES[w.precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=w.precision == "fp16")
        self.faults = FaultInjector(spec.faults, rank=dist.rank if dist is not None else 0)
        self.book = Bookkeeping()
        # Position and history (rolled back with the weights).
        self.epoch = 0
        self.step_in_epoch = 0
        self.step = 0
        self.gen = corpus.epoch_generator(t.seed, 0)
        self.losses: list[tuple[int, float]] = []
        self.evals: list[dict[str, float]] = []
        self.last_checkpoint_step = -1
        self.step_times: list[float] = []  # this process's step durations (not checkpointed)

    # -- state ------------------------------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        """Everything a checkpoint holds beside the model's and the optimizer's tensors."""
        return {
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "generator": self.gen.get_state(),
            "position": {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "step": self.step},
            "history": {"losses": list(self.losses), "evals": list(self.evals)},
            "bookkeeping": self.book.to_dict(),
            "faults_fired": self.faults.state(),
            "world": self.dist.describe() if self.dist is not None else {"worldSize": 1},
        }

    def _load(self, ckpt: Checkpoint, *, bookkeeping: bool) -> None:
        self.store.restore(ckpt, self.model, self.optimizer)
        meta = ckpt.meta
        self.scheduler.load_state_dict(meta["scheduler"])
        self.scaler.load_state_dict(meta["scaler"])
        set_rng_state(meta["rng"])
        pos = meta["position"]
        self.epoch, self.step_in_epoch, self.step = pos["epoch"], pos["step_in_epoch"], pos["step"]
        self.gen = torch.Generator().manual_seed(0)
        self.gen.set_state(meta["generator"])
        self.losses = [tuple(x) for x in meta["history"]["losses"]]  # type: ignore[misc]
        self.evals = list(meta["history"]["evals"])
        if bookkeeping:
            self.book = Bookkeeping.from_dict(meta["bookkeeping"])
            self.faults.load_state(meta["faults_fired"])

    def checkpoint(self) -> None:
        self.store.save(self.step, self.meta(), model=self.model, optimizer=self.optimizer)
        self.last_checkpoint_step = self.step
        self.metrics.record("checkpoint", step=self.step)

    def resume(self) -> bool:
        """Continue from the newest complete checkpoint, if any; True when one was loaded."""
        found = self.store.latest()
        if found is None:
            return False
        self._load(found, bookkeeping=True)
        self.last_checkpoint_step = self.step
        log.info("resumed from %s (epoch %d, step %d)", found.path.name, self.epoch, self.step)
        self.metrics.record("resume", step=self.step, checkpoint=found.path.name)
        return True

    # -- the loop ---------------------------------------------------------------------------

    def fit(self) -> TrainingSummary:
        t = self.spec.training
        self.model.train()
        if self.last_checkpoint_step < 0:
            self.checkpoint()  # step 0: a rollback always has somewhere to go
        started, start_step = time.monotonic(), self.step
        while self.epoch < t.epochs:
            while self.step_in_epoch < self.steps_per_epoch:
                if self.stop.is_set():
                    self.checkpoint()
                    raise Interrupted(f"stopped at step {self.step}; checkpoint written")
                self._one_step()
                if self.on_step is not None:
                    self.on_step(self)
            self.epoch += 1
            self.step_in_epoch = 0
            self.gen = self.corpus.epoch_generator(t.seed, self.epoch)
            if not self.evals or self.evals[-1]["step"] != self.step:
                self.evaluate()
        if self.last_checkpoint_step != self.step:
            self.checkpoint()
        elapsed = time.monotonic() - started
        steps = self.step - start_step
        last = self.evals[-1] if self.evals else {"loss": float("nan"), "accuracy": 0.0}
        return TrainingSummary(
            epochs=self.epoch,
            steps=self.step,
            final_loss=last["loss"],
            final_accuracy=last["accuracy"],
            tokens_per_second=steps * self.seq_len * self.batch_size / elapsed if elapsed > 0 else 0.0,
        )

    def _one_step(self) -> None:
        step = self.step
        x, y = self.corpus.batch("train", self.seq_len, self.batch_size, self.gen)
        x, y = x[self.rows], y[self.rows]  # every rank draws the global batch, and trains on its rows
        if step in self.book.skip_steps:
            self._advance(skipped=True)
            self.metrics.record("skip", step=step)
            return
        started = time.perf_counter()
        while True:  # retried only after an out-of-memory error halved the micro-batch
            try:
                self.faults.before_step(step)
                trip, loss = self._forward_backward(x.to(self.device), y.to(self.device), step)
                break
            except InjectedFault:
                self._remember_fired_faults()
                raise
            except _ScalerOverflow:
                # The step again at half the loss scale (the scaler would skip it and lose the batch).
                self.scaler.update(self.scaler.get_scale() / 2.0)  # also ends the scaler's step
                self.book.scaler_overflows += 1
                self.metrics.record("scaler-overflow", step=step, scale=self.scaler.get_scale())
                continue
            except torch.OutOfMemoryError as exc:
                self.optimizer.zero_grad(set_to_none=True)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                self._trip(Trip("oom", str(exc)[:200]), step, action="halve-micro-batch")
                if self.book.micro_batches * 2 > self.rows.stop - self.rows.start:  # this rank's rows
                    raise SafetyGateFailed(
                        "oom", f"out of memory at micro-batch size 1 (step {step})"
                    ) from exc
                self.book.micro_batches *= 2
                self.book.oom_backoffs += 1
                self.metrics.oom_backoff(step=step, micro_batches=self.book.micro_batches)
        if trip is not None:
            self._handle(trip, step)
            return
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.spec.training.grad_clip)
        self._optimizer_step(step)
        seconds = time.perf_counter() - started
        self.step_times.append(seconds)
        loss = distributed.mean_over_ranks(loss, self.dist, self.device)  # the global batch's loss
        self.losses.append((step, loss))
        self.metrics.train_step(
            epoch=self.epoch,
            step=step,
            loss=loss,
            lr=self.optimizer.param_groups[0]["lr"],
            seconds=seconds,
            tokens=self.seq_len * self.batch_size,
        )
        self._advance(skipped=False)

    def _optimizer_step(self, step: int) -> None:
        """The optimizer's update. Its memory is the optimizer's state (AdamW's two moments, made
        at the first step), which no smaller micro-batch shrinks: an out-of-memory error here
        fails the oom gate with what ran out, and the run reports it (safety.run-gates)."""
        try:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        except torch.OutOfMemoryError as exc:
            self.optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._trip(Trip("oom", str(exc)[:200]), step, action="fail")
            raise SafetyGateFailed(
                "oom",
                f"out of memory in the optimizer step at step {step} (the optimizer's state does not fit; "
                "a smaller micro-batch does not shrink it)",
            ) from exc
        self.optimizer.zero_grad(set_to_none=True)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return autocast(self.device, self.amp_dtype)

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[Trip | None, float]:
        """Gradients of the mean loss over micro-batches; a tripped gate instead of a step.

        Before each backward the ranks agree on how the forward went (one MAX all-reduce of
        OK < TRIPPED < OUT_OF_MEMORY): a rank that skipped its backward, or halved its
        micro-batches alone, would leave the others waiting in a gradient all-reduce it never
        joins. So a trip or an out-of-memory error on any rank is every rank's, at the same
        micro-batch. An out-of-memory error inside a collective's reach cannot be agreed on (in
        the backward, where DDP's all-reduces run; under FSDP, between a forward's all-gathers):
        when it strikes one rank alone, the others' collective times out
        (distributed.timeoutSeconds) and the attempt ends with that reason."""
        n = self.book.micro_batches
        total = 0.0
        for xs, ys in zip(x.chunk(n), y.chunk(n), strict=True):
            trip, oom = None, None
            try:
                with self._autocast():
                    loss = self.module(xs, targets=ys) * (xs.shape[0] / x.shape[0])
                self.faults.after_forward(step)
                loss = self.faults.corrupt_loss(step, loss)
                trip = check_loss(loss)
            except torch.OutOfMemoryError as exc:
                oom = exc
            agreed = distributed.max_over_ranks(
                _OUT_OF_MEMORY if oom is not None else _TRIPPED if trip is not None else _OK,
                self.dist,
                self.device,
            )
            if agreed == _OUT_OF_MEMORY:  # every rank backs off (see _one_step)
                self.optimizer.zero_grad(set_to_none=True)
                raise oom or torch.OutOfMemoryError(f"out of memory on another rank (step {step})")
            if agreed == _TRIPPED:
                self.optimizer.zero_grad(set_to_none=True)
                return trip or Trip("nan_loss", "non-finite loss on another rank"), float("nan")
            self.scaler.scale(loss).backward()
            total += loss.item()
        self.scaler.unscale_(self.optimizer)
        sharded = self.dist is not None and self.dist.strategy == "fsdp"
        norms = group_grad_norms(
            self.model,
            reduce=(lambda sq: distributed.sum_over_ranks(sq, self.dist, self.device)) if sharded else None,
        )
        trip = check_gradients(norms, self.spec.safety.gradient_flow)
        if trip is not None:
            self.optimizer.zero_grad(set_to_none=True)
            if self._scaler_overflow(norms):
                raise _ScalerOverflow
            if self.scaler.is_enabled():  # no optimizer step follows: end the scaler's step as it stands
                self.scaler.update(self.scaler.get_scale())
        return trip, total

    def _scaler_overflow(self, norms: dict[str, float]) -> bool:
        """fp16: non-finite gradients while the loss scale can still come down are the scaled
        backward overflowing, which the GradScaler answers by lowering the scale. At a scale of
        1 or below they are the gradients' own, and the gate's."""
        if not self.scaler.is_enabled() or all(math.isfinite(n) for n in norms.values()):
            return False
        return self.scaler.get_scale() > 1.0

    def _advance(self, *, skipped: bool) -> None:
        self.scheduler.step()
        if self.book.lr_scale != 1.0:
            for g in self.optimizer.param_groups:
                g["lr"] *= self.book.lr_scale
        self.step += 1
        self.step_in_epoch += 1
        if self.step % self.eval_every == 0:
            self.evaluate()
        if self.step % self.spec.training.checkpoint.every_steps == 0:
            self.checkpoint()

    def _remember_fired_faults(self) -> None:
        """Before a crash: record the one-shot faults that fired in the newest checkpoint.

        That checkpoint predates the fault, so without this the attempt that resumes from it
        would replay the step and fire the same fault again, every attempt. Only the record of
        fired faults changes; the training state in the checkpoint stays as it was.

        No collective: the fault may have struck this rank alone, while the others wait in the
        step's first all-reduce. This rank records what it fired (with what the checkpoint
        already holds) and ends; its exit ends the attempt for all (torchrun stops the group, the
        others' collectives fail on the closed connection) instead of every rank waiting out
        distributed.timeoutSeconds."""
        found = self.store.latest_here()
        if found is not None:
            fired = set(found.meta.get("faults_fired", [])) | set(self.faults.state())
            self.store.update_meta(found, faults_fired=sorted(fired))

    # -- gates and recovery ---------------------------------------------------------------

    def _trip(self, trip: Trip, step: int, *, action: str) -> None:
        self.book.trips[trip.gate] = self.book.trips.get(trip.gate, 0) + 1
        self.book.events.append({"gate": trip.gate, "step": step, "action": action, "detail": trip.detail})
        self.metrics.gate_trip(trip.gate, step=step, action=action, detail=trip.detail)
        log.warning("safety gate %s tripped at step %d: %s (%s)", trip.gate, step, trip.detail, action)

    def _recovered(self, step: int, action: str) -> None:
        self.book.recoveries += 1
        self.metrics.recovery(step=step, action=action)
        if self.book.recoveries > self.spec.safety.max_recoveries:
            raise SafetyGateFailed(
                "recovery_budget",
                f"{self.book.recoveries} recoveries exceed maxRecoveries {self.spec.safety.max_recoveries}",
            )

    def _handle(self, trip: Trip, step: int) -> None:
        policy = self.spec.safety.non_finite_loss
        self._trip(trip, step, action=policy)
        if policy == "fail":
            raise SafetyGateFailed(trip.gate, f"{trip.gate} at step {step}: {trip.detail} (policy fail)")
        self.book.skip_steps.add(step)
        if policy == "skip":
            self._recovered(step, "skip")
            self._advance(skipped=True)
            return
        found = self.store.latest()
        if found is None:
            raise SafetyGateFailed(trip.gate, "no checkpoint to roll back to")
        path = found.path
        self._load(found, bookkeeping=False)
        self.book.lr_scale *= 0.5
        for g, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
            g["lr"] = lr * self.book.lr_scale
        self.book.events[-1]["rolled_back_to"] = self.step
        log.warning(
            "rolled back to %s (step %d); learning rate scale now %.3g",
            path.name,
            self.step,
            self.book.lr_scale,
        )
        self._recovered(step, "rollback")

    # -- evaluation -----------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        # Under FSDP every rank runs the forward (the shards are gathered collectively).
        result = evaluate(
            self.module if self.dist is not None else self.model, self.eval_set, self.device, self.amp_dtype
        )
        point = {"epoch": self.epoch, "step": self.step, **result}
        self.evals.append(point)
        self.metrics.evaluation(
            epoch=self.epoch, step=self.step, loss=result["loss"], accuracy=result["accuracy"]
        )
        return point
