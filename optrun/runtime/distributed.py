"""torch.distributed for the train stage: the process group, DDP or FSDP2, collective gates.

A run with more than one rank is started by torchrun (torch.distributed.run): locally by
`optrun run` itself (`launch_command`), in the cluster by the operator's pods, one per node.
Every rank runs the same orchestrator; torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) says which rank this is, and `init` joins the group (gloo on a CPU,
NCCL on GPUs) with `distributed.timeoutSeconds` as the collective timeout, so a rank that hangs
or dies ends the attempt on every other rank with a reason instead of blocking it forever.

Training is data parallel over the ranks with the run's global batch split evenly: rank r of W
trains on rows [r*B/W, (r+1)*B/W) of the batch a one-process run would draw, so a result
compares with a one-process run. `wrap` puts the model under DDP (each rank holds the model;
gradient compression hooks when `compression.target` includes gradients) or FSDP2
(`fully_shard` on every decoder layer, then the model: parameters, gradients and optimizer
state sharded). Safety gates are collective: a tripped flag or an out-of-memory error on any
rank is every rank's (`max_over_ranks`), and gradient norms of sharded parameters are summed
over the ranks, so all ranks take the same recovery, or back-off, at the same step.

After training, rank 0 gathers the full model and carries on alone (RLVR, compression, the
KV-cache sweep, the artifact and acceptance run in one process); the other ranks leave.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from optrun.api.v1alpha1 import OptimizationRunSpec

log = logging.getLogger(__name__)


@dataclass
class Dist:
    """This process's place in the group."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    strategy: str
    nodes: int
    processes_per_node: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        return {
            "worldSize": self.world_size,
            "nodes": self.nodes,
            "processesPerNode": self.processes_per_node,
            "strategy": self.strategy,
            "backend": self.backend,
        }


def from_environment() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when torchrun started this process with more than one rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def init(spec: OptimizationRunSpec, device: torch.device) -> Dist | None:
    """Join the process group torchrun set up (None in a one-process run)."""
    env = from_environment()
    if env is None:
        return None
    rank, world, local = env
    if world != spec.world_size:
        raise RuntimeError(
            f"torchrun started {world} ranks but the spec asks for {spec.world_size} "
            "(distributed.nodes x processesPerNode)"
        )
    backend = spec.distributed.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend,
            timeout=dt.timedelta(seconds=spec.distributed.timeout_seconds),
            # NCCL binds the group to this rank's own GPU: torch refuses a device without an
            # index, and every rank on "cuda" would be every rank on GPU 0.
            device_id=device_for(local, device) if device.type == "cuda" else None,
        )
    log.info("rank %d of %d (%s, %s)", rank, world, backend, spec.distributed.strategy)
    return Dist(
        rank=rank,
        world_size=world,
        local_rank=local,
        backend=backend,
        strategy=spec.distributed.strategy,
        nodes=spec.distributed.nodes,
        processes_per_node=spec.processes_per_node,
    )


def device_for(local_rank: int, device: torch.device) -> torch.device:
    """Each rank of a GPU pod takes its own GPU."""
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return device


def max_over_ranks(value: int, d: Dist | None, device: torch.device) -> int:
    """The largest of an integer over the ranks (a MAX all-reduce): the same answer on every rank."""
    if d is None:
        return value
    t = torch.tensor([float(value)], device=device if d.backend == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def mean_over_ranks(value: float, d: Dist | None, device: torch.device) -> float:
    """The mean of a scalar over the ranks (each rank's loss is its rows' mean: equal rows per
    rank make this the global batch's loss)."""
    if d is None:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device if d.backend == "nccl" else "cpu")
    dist.all_reduce(t)
    return float(t.item()) / d.world_size


def sum_over_ranks(values: dict[str, float], d: Dist | None, device: torch.device) -> dict[str, float]:
    """Per-key sums over the ranks (the squared gradient norms of sharded parameters)."""
    if d is None or not values:
        return values
    keys = sorted(values)
    t = torch.tensor(
        [values[k] for k in keys], dtype=torch.float64, device=device if d.backend == "nccl" else "cpu"
    )
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist(), strict=True))


def wrap(model: nn.Module, d: Dist, spec: OptimizationRunSpec) -> tuple[nn.Module, Any]:
    """The model as the train stage calls it on this rank: DDP or FSDP2 (see the module doc),
    and the gradient-compression statistics when a codec hook was registered."""
    if d.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        blocks = model.blocks() if hasattr(model, "blocks") else []
        for block in blocks:
            fully_shard(block)
        fully_shard(model)
        return model, None
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=None)
    c = spec.optimizations.compression
    stats = None
    if c.enabled and c.target in ("gradients", "both"):
        from optrun.runtime.compression import ddp_hooks

        stats = ddp_hooks.register(
            ddp,
            c.codec,
            max_error=c.max_reconstruction_error,
            group_size=c.group_size,
            rank=c.rank,
            topk_ratio=c.topk_ratio,
        )
    return ddp, stats


def gather_rank_figures(trainer: Any, d: Dist) -> list[dict[str, Any]]:
    """Each rank's own training figures (its step times), gathered on every rank: rank 0's
    report shows them side by side."""
    import statistics

    times = trainer.step_times
    from optrun.runtime.lm.base import fingerprint

    mine = {
        "rank": d.rank,
        "device": str(trainer.device),  # on GPUs, each rank's own (cuda:LOCAL_RANK)
        # DDP replicas must end identical; FSDP's shards differ by design.
        "fingerprint": fingerprint(trainer.model) if d.strategy == "ddp" else None,
        "steps": len(times),
        # Agreed over the ranks (see Trainer._forward_backward): equal on every rank.
        "oomBackoffs": trainer.book.oom_backoffs,
        "microBatches": trainer.book.micro_batches,
        "medianStepSeconds": statistics.median(times) if times else None,
        "tokensPerSecond": (trainer.rows.stop - trainer.rows.start)
        * trainer.seq_len
        / statistics.median(times)
        if times
        else None,
    }
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, mine)
    return out


def full_state_on_main(model: nn.Module, d: Dist) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict on rank 0 (gathered from the shards under FSDP), None elsewhere."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if d.is_main else None


def leave(d: Dist | None) -> None:
    """Leave the group (after collecting DDP's reference cycles, which hold gloo work objects:
    freed after the group is gone they abort the process at exit)."""
    if d is None or not dist.is_initialized():
        return
    import gc

    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def launch_command(spec_file: str, output: str, spec: OptimizationRunSpec, extra: list[str]) -> list[str]:
    """torchrun for a local multi-process run: one node, processesPerNode ranks, a standalone
    rendezvous; rank 0's log goes to the terminal, every rank's to <output>/ranks/."""
    n = spec.processes_per_node
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(n),
        "--max-restarts",
        "0",
        "--log-dir",
        os.path.join(output, "ranks"),
        "--redirects",
        "3",
        "--tee",
        "0:3",
        "-m",
        "optrun.cli",
        "runtime",
        "--spec",
        spec_file,
        "--output",
        output,
        "--termination-log",
        os.path.join(output, "result.json"),
        *extra,
    ]
