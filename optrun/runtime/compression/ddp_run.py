"""A real data-parallel comparison: the same short training run under several comm hooks.

`compare(job)` starts `world_size` processes that form a gloo process group, and in each of
them trains the same model from the same weights on the same batches once per hook ("allreduce"
first, the baseline, then each codec), one after another in the same group. Every rank draws
its own batches (rank r of step s gets batch s * world + r of a seeded stream), so the ranks'
gradients differ and the hooks have something to average. Rank 0 reports, per hook: bytes sent
per step, the step time, the training losses and the held-out loss of the final model.

The processes talk over TCP on 127.0.0.1 by default. The bandwidth-limited benchmark
(benchmarks/compression.py) runs each rank inside its own network namespace with
`python -m optrun.runtime.compression.ddp_run --rank R ...`, so the traffic crosses a shaped veth
link; the worker is the same function either way.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from optrun.runtime.compression import ddp_hooks
from optrun.runtime.data import Corpus
from optrun.runtime.model import build_model

log = logging.getLogger(__name__)


@dataclass
class DDPJob:
    """What every rank runs. `model` is a built-in preset name (each rank builds it from `seed`)."""

    model: str = "tiny-lm"
    hooks: list[str] = field(default_factory=lambda: ["allreduce", "int8"])
    steps: int = 30
    batch_size: int = 8
    seq_len: int = 64
    learning_rate: float = 1e-3
    seed: int = 1234
    eval_batches: int = 4
    max_error: float | None = None
    group_size: int = 128
    rank: int = 4
    topk_ratio: float = 0.01
    world_size: int = 2
    timeout_s: float = 120.0
    threads_per_rank: int = 0  # 0: the machine's cores split between the ranks
    # One bucket for the models used here: torch's PowerSGD hook issues its second and third
    # allreduce from future callbacks, and with several buckets in flight on gloo the ranks
    # can issue them in different orders (a collective mismatch). Same cap for every hook, so
    # the step times compare like with like.
    bucket_cap_mb: float = 512.0


class LossModule(nn.Module):
    """DDP must see the forward that produces the loss, so the loss is the wrapped forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.model.loss(x, y)


def _batches(job: DDPJob, corpus: Corpus, rank: int) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(job.seed)
    out = []
    for _ in range(job.steps):
        for r in range(job.world_size):
            b = corpus.batch("train", job.seq_len, job.batch_size, gen)
            if r == rank:
                out.append(b)
    return out


def run_rank(rank: int, job: DDPJob, init_method: str, base: nn.Module | None = None) -> list[dict[str, Any]]:
    """One rank: join the group, train once per hook, return rank 0's measurements (all ranks'
    losses agree: every rank applies the same averaged gradient)."""
    threads = job.threads_per_rank or max(1, (os.cpu_count() or 1) // job.world_size)
    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo",
        init_method=init_method,
        rank=rank,
        world_size=job.world_size,
        timeout=timedelta(seconds=job.timeout_s),
    )
    try:
        corpus = Corpus.build("pydoc")
        batches = _batches(job, corpus, rank)
        evals = corpus.eval_batches(job.seq_len, job.batch_size, job.eval_batches)
        if base is None:
            torch.manual_seed(job.seed)
            base = build_model(job.model)
        results = []
        for hook in job.hooks:
            results.append(_train(job, hook, copy.deepcopy(base), batches, evals))
        return results
    finally:
        # DDP, its reducer and the comm hooks' state sit in reference cycles that hold gloo work
        # objects; left to interpreter teardown they are freed after the group is gone, which
        # aborts the process ("terminate called without an active exception") in about one run
        # of three on a 2-core host. Collect them while the group still exists.
        gc.collect()
        dist.destroy_process_group()


def _train(
    job: DDPJob,
    hook: str,
    model: nn.Module,
    batches: list[tuple[Tensor, Tensor]],
    evals: list[tuple[Tensor, Tensor]],
) -> dict[str, Any]:
    module = LossModule(model.train())
    ddp = nn.parallel.DistributedDataParallel(module, bucket_cap_mb=job.bucket_cap_mb)
    stats = ddp_hooks.register(
        ddp,
        hook,
        max_error=job.max_error,
        group_size=job.group_size,
        rank=job.rank,
        topk_ratio=job.topk_ratio,
    )
    opt = torch.optim.AdamW(ddp.parameters(), lr=job.learning_rate, weight_decay=0.0)
    losses, times = [], []
    for x, y in batches:
        dist.barrier()  # every step starts together, so a step's time is that step's alone
        started = time.perf_counter()
        loss = ddp(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - started)
        losses.append(float(loss.detach()))
    model.eval()
    with torch.no_grad():
        eval_loss = statistics.fmean(float(model.loss(x, y)) for x, y in evals)
    # Ranks must end with identical weights; a check that costs one small allreduce.
    digest = torch.tensor(
        [sum(float(p.detach().double().sum()) for p in model.parameters())], dtype=torch.float64
    )
    spread = digest.clone()
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    lo = digest.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    # The first steps include DDP's bucket rebuild and PowerSGD's dense warm-up: time the rest.
    steady = times[2:] if len(times) > 4 else times
    return {
        **stats.to_dict(),
        "losses": losses,
        "finalLoss": losses[-1],
        "evalLoss": eval_loss,
        "stepSeconds": statistics.median(steady),
        "stepSecondsMin": min(steady),
        "stepSecondsMax": max(steady),
        "ranksAgree": bool(math.isclose(float(spread), float(lo), rel_tol=1e-9, abs_tol=1e-9)),
    }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DDPRunError(RuntimeError):
    """The multi-process run failed or did not finish in time."""


def rank_command(
    rank: int, job: DDPJob, init_method: str, out: Path | None, model_file: Path | None
) -> list[str]:
    """The command line of one rank (`python -m optrun.runtime.compression.ddp_run ...`)."""
    cmd = [
        sys.executable,
        "-m",
        "optrun.runtime.compression.ddp_run",
        "--rank",
        str(rank),
        "--init",
        init_method,
        "--job",
        json.dumps(asdict(job)),
    ]
    if out is not None:
        cmd += ["--out", str(out)]
    if model_file is not None:
        cmd += ["--model-file", str(model_file)]
    return cmd


def compare(job: DDPJob, model: nn.Module | None = None) -> dict[str, dict[str, Any]]:
    """Run `job` in `job.world_size` local processes; results by hook name (rank 0's view).

    Ranks are fresh interpreters (not forks: a forked torch can deadlock in its thread pools,
    and spawn would re-run the caller's main module). `model` (optional) is trained instead of
    the preset; it is handed to the ranks as a file."""
    with tempfile.TemporaryDirectory(prefix="optrun-ddp-") as tmp:
        out = Path(tmp) / "result.json"
        model_file = None
        if model is not None:
            model_file = Path(tmp) / "model.pt"
            torch.save(copy.deepcopy(model).cpu(), model_file)
        init = f"tcp://127.0.0.1:{free_port()}"
        logs = [Path(tmp) / f"rank{r}.log" for r in range(job.world_size)]
        procs = []
        try:
            for r in range(job.world_size):
                with logs[r].open("wb") as f:
                    procs.append(
                        subprocess.Popen(
                            rank_command(r, job, init, out if r == 0 else None, model_file),
                            stdout=f,
                            stderr=subprocess.STDOUT,
                        )
                    )
            deadline = time.monotonic() + job.timeout_s
            for p in procs:
                try:
                    p.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    raise DDPRunError(
                        f"the {job.world_size}-process gloo run did not finish within {job.timeout_s:.0f} s"
                    ) from None
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
        failed = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode != 0]
        if failed or not out.exists():
            tails = "; ".join(f"rank {r} (exit {c}): {_tail(logs[r])}" for r, c in failed)
            raise DDPRunError(f"the gloo run failed: {tails or 'rank 0 wrote no results'}")
        return {r["hook"]: r for r in json.loads(out.read_text())["results"]}


def _tail(path: Path, lines: int = 6) -> str:
    return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])


def main(argv: list[str] | None = None) -> int:
    """One rank of a job, for launching ranks by hand (in network namespaces, on other hosts)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--init", required=True, help="init method, e.g. tcp://10.0.0.1:29500")
    ap.add_argument("--job", required=True, help="DDPJob as JSON")
    ap.add_argument("--out", type=Path, help="where rank 0 writes its results (JSON)")
    ap.add_argument("--model-file", type=Path, help="a torch.save'd model to train instead of the preset")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    job = DDPJob(**json.loads(args.job))
    base = torch.load(args.model_file, weights_only=False) if args.model_file else None
    results = run_rank(args.rank, job, args.init, base)
    if args.rank == 0 and args.out is not None:
        args.out.write_text(json.dumps({"job": asdict(job), "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
