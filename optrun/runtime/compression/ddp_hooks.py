"""DDP communication hooks that compress gradients, and count the bytes each rank sends.

A DDP comm hook receives a bucket (a flat buffer of several parameters' gradients) and returns
a future of the averaged buffer. Three kinds, all counting into a `CommStats`:

- ``allreduce`` (the baseline): torch's plain allreduce hook; sends the bucket as it is.
- a codec (int8, int8-block, fp8, int4, topk): each gradient of the bucket is encoded, the
  payloads are packed into one byte buffer and all-gathered, and every rank decodes all ranks'
  payloads and averages them (quantized payloads cannot be summed by an allreduce: each rank's
  scales differ). top-k runs with error feedback (what a step drops is added to the next step).
- ``lowrank``: torch's own PowerSGD hook (Vogels et al., 2019), rank r, error feedback and warm
  start on, vanilla allreduce for the first two steps (PowerSGD's minimum with error feedback).
  Bytes come from its own counters of elements allreduced.

Bytes are what this rank hands to the collectives per step. With two ranks that is also what
crosses the wire per rank for both a ring allreduce (2 (W-1)/W x n = n) and an all-gather
((W-1) x payload), so the ratio is the real traffic ratio; at larger W the all-gather path
sends (W-1)/2 times more than its payload ratio suggests, which is where PowerSGD's
allreduce-able factors win.

The reconstruction-error gate for gradients: with a bound, each rank measures its codec's
relative error per tensor, the ranks agree on the worst error with a small MAX allreduce (4
bytes per tensor, counted), and a tensor above the bound is sent in full precision that step (a
trip, recovered by sending it exactly). Error-feedback codecs (topk, lowrank) lose 50-99 % of a
single step's gradient by design and send it later, so a per-step error bound is meaningless
for them: their errors are measured and reported, and they are judged by where training ends up
(the acceptance test that compares the loss with the uncompressed run).
"""

# No `from __future__ import annotations`: DDP checks the hooks' annotations at runtime
# (the bucket must be annotated dist.GradBucket, the return torch.futures.Future[torch.Tensor]).
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

from optrun.runtime.compression.codecs import Codec, ErrorFeedback, Payload, get_codec, reconstruction_error

# PowerSGD allreduces the first steps uncompressed (its minimum with error feedback).
WARMUP_STEPS = 2
HOOK_NAMES = ("allreduce", "int8", "int8-block", "fp8", "int4", "topk", "lowrank")


@dataclass
class CommStats:
    """Bytes and gate decisions of one rank, per step."""

    name: str
    bytes_per_step: list[int] = field(default_factory=list)
    dense_bytes_per_step: list[int] = field(default_factory=list)
    gate_checks: int = 0
    gate_trips: int = 0
    errors: list[float] = field(default_factory=list)  # relative error per tensor and step (codecs)
    _bytes: int = 0
    _dense: int = 0

    def add(self, sent: int, dense: int) -> None:
        self._bytes += sent
        self._dense += dense

    def end_step(self) -> None:
        self.bytes_per_step.append(self._bytes)
        self.dense_bytes_per_step.append(self._dense)
        self._bytes = self._dense = 0

    @property
    def steady_bytes_per_step(self) -> float:
        """Median bytes per step after the first WARMUP_STEPS (PowerSGD sends those dense)."""
        steady = self.bytes_per_step[WARMUP_STEPS:] or self.bytes_per_step
        return float(statistics.median(steady)) if steady else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "hook": self.name,
            "steps": len(self.bytes_per_step),
            "bytesPerStep": self.steady_bytes_per_step,
            "denseBytesPerStep": float(statistics.median(self.dense_bytes_per_step))
            if self.dense_bytes_per_step
            else 0.0,
            "totalBytes": sum(self.bytes_per_step),
            "gate": {"checks": self.gate_checks, "trips": self.gate_trips},
            "meanError": statistics.fmean(self.errors) if self.errors else None,
            "maxError": max(self.errors) if self.errors else None,
        }


def _group(pg: dist.ProcessGroup | None) -> dist.ProcessGroup:
    return pg if pg is not None else dist.group.WORLD


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


# --- plain allreduce ------------------------------------------------------------------------


@dataclass
class AllreduceState:
    stats: CommStats
    process_group: dist.ProcessGroup | None = None


def allreduce_hook(state: AllreduceState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """torch's allreduce hook, counting the bucket's bytes."""
    buf = bucket.buffer()
    state.stats.add(_nbytes(buf), _nbytes(buf))
    if bucket.is_last():
        state.stats.end_step()
    return default_hooks.allreduce_hook(_group(state.process_group), bucket)


# --- codecs over all-gather -----------------------------------------------------------------


@dataclass
class CodecState:
    codec: Codec
    stats: CommStats
    max_error: float | None = None  # None: no gate
    process_group: dist.ProcessGroup | None = None
    feedback: ErrorFeedback = field(default_factory=ErrorFeedback)

    @property
    def gated(self) -> bool:
        return self.max_error is not None and not self.codec.error_feedback


_DENSE = "dense"


def codec_hook(state: CodecState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """Encode each gradient, all-gather the packed payloads, decode and average them."""
    group = _group(state.process_group)
    world = group.size()
    codec, stats = state.codec, state.stats
    grads = bucket.gradients()
    keys = [id(p) for p in bucket.parameters()]

    targets, payloads, decoded, errors = [], [], [], []
    for key, g in zip(keys, grads, strict=True):
        target = state.feedback.compensate(key, g) if codec.error_feedback else g
        p = codec.encode(target)
        d = codec.decode(p)
        targets.append(target)
        payloads.append(p)
        decoded.append(d)
        errors.append(reconstruction_error(target, d))
    stats.errors.extend(e for e in errors if math.isfinite(e))

    # Same decision on every rank, or the packed buffers would not line up.
    dense = [p.nbytes >= _nbytes(t) for p, t in zip(payloads, targets, strict=True)]
    if state.gated:
        worst = torch.tensor(errors, dtype=torch.float32)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
        stats.add(_nbytes(worst), 0)
        for i, e in enumerate(worst.tolist()):
            stats.gate_checks += 1
            if e > state.max_error:  # type: ignore[operator]
                stats.gate_trips += 1
                dense[i] = True

    sent: list[Payload] = []
    for i, (key, t) in enumerate(zip(keys, targets, strict=True)):
        if dense[i]:
            sent.append(Payload(_DENSE, tuple(t.shape), t.dtype, {"x": t.detach().contiguous()}))
            state.feedback.forget(key)  # sent exactly: nothing left to feed back
        else:
            sent.append(payloads[i])
            if codec.error_feedback:
                state.feedback.update(key, t, decoded[i])
    layouts = [p.layout() for p in sent]
    buf = torch.cat([p.to_bytes() for p in sent])
    stats.add(_nbytes(buf), _nbytes(bucket.buffer()))
    if bucket.is_last():
        stats.end_step()

    gathered = [torch.empty_like(buf) for _ in range(world)]
    fut = dist.all_gather(gathered, buf, group=group, async_op=True).get_future()

    def average(_: torch.futures.Future[Any]) -> Tensor:
        sums = [torch.zeros(g.shape, dtype=torch.float32, device=g.device) for g in grads]
        for rbuf in gathered:
            offset = 0
            for i, (p, layout) in enumerate(zip(sent, layouts, strict=True)):
                n = p.nbytes
                chunk = Payload.from_bytes(p.codec, p.shape, p.dtype, layout, rbuf[offset : offset + n])
                offset += n
                x = chunk.tensors["x"] if p.codec == _DENSE else codec.decode(chunk)
                sums[i] += x.float()
        for g, s in zip(grads, sums, strict=True):
            g.copy_(s.div_(world))  # the gradients are views of the bucket buffer
        return bucket.buffer()

    return fut.then(average)


# --- low-rank: torch's PowerSGD ---------------------------------------------------------------


@dataclass
class PowerSGDCommState:
    psgd: powerSGD_hook.PowerSGDState
    stats: CommStats


def lowrank_hook(state: PowerSGDCommState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """torch's PowerSGD hook; bytes from its count of elements allreduced."""
    buf = bucket.buffer()
    before = state.psgd.total_numel_after_compression
    fut = powerSGD_hook.powerSGD_hook(state.psgd, bucket)
    after = state.psgd.total_numel_after_compression
    # Its counters only move on compressed steps; the warm-up steps allreduce the whole bucket.
    sent = (after - before) * buf.element_size() if after != before else _nbytes(buf)
    state.stats.add(sent, _nbytes(buf))
    if bucket.is_last():
        state.stats.end_step()
    return fut


# --- registration ---------------------------------------------------------------------------


def register(
    ddp: nn.parallel.DistributedDataParallel,
    hook: str,
    *,
    max_error: float | None = None,
    group_size: int = 128,
    rank: int = 4,
    topk_ratio: float = 0.01,
    process_group: dist.ProcessGroup | None = None,
) -> CommStats:
    """Register the named hook ("allreduce" or a codec) on `ddp`; returns its live `CommStats`."""
    if hook not in HOOK_NAMES:
        raise ValueError(f"hook: unknown hook {hook!r}; allowed: {', '.join(HOOK_NAMES)}")
    stats = CommStats(hook)
    if hook == "allreduce":
        ddp.register_comm_hook(AllreduceState(stats, process_group), allreduce_hook)
    elif hook == "lowrank":
        psgd = powerSGD_hook.PowerSGDState(
            process_group=process_group,
            matrix_approximation_rank=rank,
            start_powerSGD_iter=WARMUP_STEPS,
            use_error_feedback=True,
            warm_start=True,
            random_seed=0,
        )
        ddp.register_comm_hook(PowerSGDCommState(psgd, stats), lowrank_hook)
    else:
        codec = get_codec(hook, group_size=group_size, rank=rank, topk_ratio=topk_ratio)
        ddp.register_comm_hook(CodecState(codec, stats, max_error, process_group), codec_hook)
    return stats
