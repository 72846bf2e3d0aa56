"""Scaling efficiency of the train stage on torch.distributed: tokens/s of N ranks against N
times one rank, with the per-rank batch held fixed (weak scaling, how data parallelism adds
throughput), each configuration run the way a user runs it (`optrun run` through torchrun).

    .venv/bin/python benchmarks/distributed.py                       # 1 and 2 ranks, DDP, on the CPU (gloo)
    .venv/bin/python benchmarks/distributed.py --ranks 1 8 --strategy fsdp --device cuda

Efficiency = tokens/s(N) / (N x tokens/s(1)): 1.0 is perfect scaling. The throughput is the
median over the training steps of each rank's own step time, summed over the ranks. Rows go
to benchmarks/results/distributed.csv with the device named. It asserts nothing.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CSV = ROOT / "benchmarks" / "results" / "distributed.csv"


def manifest(
    ranks: int, per_rank_batch: int, strategy: str, model: str, steps: int, gpus: int
) -> dict[str, Any]:
    return {
        "apiVersion": "optrun.io/v1alpha1",
        "kind": "OptimizationRun",
        "metadata": {"name": f"scale-{ranks}"},
        "spec": {
            "workload": {"model": model, "sequenceLength": 64, "batchSize": per_rank_batch * ranks},
            "optimizations": {
                "kernels": {"enabled": False},
                "compression": {"enabled": False},
                "kvCache": {"enabled": False},
            },
            "rlvr": {"enabled": False},
            "training": {
                "epochs": 1,
                "stepsPerEpoch": steps,
                "warmupSteps": 2,
                "evalBatches": 1,
                "targetAccuracy": 0.0,
                "checkpoint": {"everySteps": 10_000, "keep": 1},
            },
            "acceptance": {"repeats": 1},
            "distributed": {"processesPerNode": ranks, "strategy": strategy},
            "resources": {"gpus": gpus},
        },
    }


def measure(ranks: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    spec = manifest(
        ranks,
        args.per_rank_batch,
        args.strategy,
        args.model,
        args.steps,
        ranks if args.device == "cuda" else 0,
    )
    path = tmp / f"scale-{ranks}.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp / f"out-{ranks}"
    cmd = [sys.executable, "-m", "optrun.cli", "run", str(path), "--output", str(out), "--quiet"]
    if args.device:
        cmd += ["--device", args.device]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    subprocess.run(cmd, check=False, env=env, capture_output=True, timeout=args.timeout)
    report = json.loads((out / "report.json").read_text())
    train = report["details"]["train"]
    ranks_info = train.get("ranks") or [
        {"rank": 0, "tokensPerSecond": report["training"]["tokensPerSecond"], "medianStepSeconds": None}
    ]
    if ranks == 1:
        # A one-process run's own figure: median step time over its steps.
        steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        times = sorted(s["seconds"] for s in steps if s.get("event") == "step")
        median = times[len(times) // 2]
        ranks_info = [
            {"rank": 0, "tokensPerSecond": args.per_rank_batch * 64 / median, "medianStepSeconds": median}
        ]
    return {
        "ranks": ranks,
        "tokensPerSecond": sum(r["tokensPerSecond"] for r in ranks_info),
        "device": report["hardware"]["name"],
        "perRank": ranks_info,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp")
    ap.add_argument("--model", default="tiny-lm")
    ap.add_argument("--per-rank-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (OMP_NUM_THREADS)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None)
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument("--csv", type=Path, default=CSV)
    args = ap.parse_args(argv)
    stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    with tempfile.TemporaryDirectory(prefix="optrun-scale-") as tmp:
        results = [measure(n, args, Path(tmp)) for n in args.ranks]
    base = next((r for r in results if r["ranks"] == 1), None)
    rows = []
    print(
        f"{'ranks':>5} {'tokens/s':>12} {'per rank':>12} {'efficiency':>10}   ({args.strategy}, {args.model}, batch {args.per_rank_batch}/rank)"
    )
    for r in results:
        eff = r["tokensPerSecond"] / (r["ranks"] * base["tokensPerSecond"]) if base else None
        print(
            f"{r['ranks']:>5} {r['tokensPerSecond']:>12.0f} {r['tokensPerSecond'] / r['ranks']:>12.0f} "
            f"{eff if eff is not None else float('nan'):>10.3f}"
        )
        rows.append(
            {
                "time": stamp,
                "device": r["device"],
                "strategy": args.strategy,
                "model": args.model,
                "ranks": r["ranks"],
                "perRankBatch": args.per_rank_batch,
                "threadsPerRank": args.threads,
                "tokensPerSecond": round(r["tokensPerSecond"], 1),
                "efficiency": round(eff, 4) if eff is not None else "",
            }
        )
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    new = not args.csv.exists()
    with args.csv.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
