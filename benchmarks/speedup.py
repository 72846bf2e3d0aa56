"""Speedup-matrix benchmark: the figures behind the default speedup ranges (docs/acceptance.md).

The runtime's own speedup matrix (optrun/runtime/speedup.py), on the quickstart's workload by
default, run `--matrices` times in this process:

- noise: the model against an identical copy of itself, a training step (the "kernels" key's
  metric) and greedy decoding without a cache (the "compression" key's): every ratio would be
  1.0 on a quiet machine; their spread is what a default floor has to allow for (`NOISE`);
- real: the int8 weight-compressed model (decoding, no cache) and the int8 KV cache, the latter
  against the full-precision cache of the run's dtype (the fair baseline) and, beside it,
  against decoding without a cache.

Per matrix and key: the median ratio, its extremes and the relative spread of the rounds, and
the host's load average when the matrix started (a shared host's other jobs show in the ratios).
Rows are appended to benchmarks/results/speedup.csv with the machine named.

    .venv/bin/python benchmarks/speedup.py                       # CPU: tiny-lm, quickstart shapes
    .venv/bin/python benchmarks/speedup.py --model small-lm --precision bf16 --sequence-length 512
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import functools
import os
import platform
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import nn

from optrun.api.v1alpha1 import OptimizationRunSpec
from optrun.runtime import speedup
from optrun.runtime.compression import weight_transform
from optrun.runtime.context import RunContext
from optrun.runtime.data import Corpus
from optrun.runtime.hardware import detect
from optrun.runtime.kvcache.cache import cache_factory
from optrun.runtime.model import PRESETS, build_model

ROOT = Path(__file__).resolve().parents[1]
CSV = ROOT / "benchmarks" / "results" / "speedup.csv"
FIELDS = [
    "time",
    "machine",
    "device",
    "torch",
    "threads",
    "model",
    "precision",
    "case",
    "key",
    "baseline",
    "matrix",
    "load1",
    "rounds",
    "median",
    "min",
    "max",
    "spread",
]


def seeded(model: str, seed: int, device: torch.device) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(model).to(device)


def main(argv: list[str] | None = None) -> int:
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--model", default="small-lm" if gpu else "tiny-lm", choices=list(PRESETS))
    ap.add_argument("--precision", default="bf16" if gpu else "fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--sequence-length", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--kv-dtype", default="int8")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per matrix (acceptance.repeats)")
    ap.add_argument("--matrices", type=int, default=5, help="matrices per case")
    ap.add_argument("--budget", type=float, default=None, help="seconds of timed rounds per matrix")
    ap.add_argument("--no-csv", action="store_true", help="print only")
    args = ap.parse_args(argv)

    device, hardware = detect(args.device)
    spec = OptimizationRunSpec.model_validate(
        {
            "workload": {
                "model": args.model,
                "sequenceLength": args.sequence_length,
                "batchSize": args.batch_size,
                "precision": args.precision,
            },
            "optimizations": {"kvCache": {"enabled": True, "dtype": args.kv_dtype}},
            "acceptance": {"repeats": args.rounds},
        }
    )
    ctx = RunContext(
        spec=spec,
        device=device,
        hardware=hardware,
        corpus=Corpus.build("pydoc"),
        model_factory=functools.partial(seeded, args.model, spec.training.seed, device),
        output_dir=ROOT / "benchmarks" / "results",
    )
    cfg = ctx.model_factory().cfg
    reference = cache_factory(cfg, args.precision, device)
    quantized = weight_transform(spec.optimizations.compression)
    cases: dict[str, dict[str, speedup.VariantBuilder]] = {
        "noise": {
            "kernels": lambda: (ctx.model_factory(), None),
            "compression": lambda: (ctx.model_factory(), None),
        },
        "real": {
            "compression": lambda: (quantized(ctx.model_factory()), None),
            "kvcache": lambda: (ctx.model_factory(), cache_factory(cfg, args.kv_dtype, device)),
        },
    }
    what = {
        ("noise", "kernels"): "identical model, train step",
        ("noise", "compression"): "identical model, decode without cache",
        ("real", "compression"): "int8 weights, decode without cache",
        ("real", "kvcache"): f"{args.kv_dtype} cache against the {args.precision} cache",
    }
    rows: list[dict[str, Any]] = []
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    common = {
        "time": now,
        "machine": f"{platform.node()} ({hardware.cpu_count} cpus)",
        "device": hardware.name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": args.model,
        "precision": args.precision,
    }
    for case, variants in cases.items():
        for m in range(args.matrices):
            load = os.getloadavg()[0]  # the host's 1-minute load when the matrix starts
            matrix = speedup.speedup_matrix(
                ctx, variants, repeats=args.rounds, budget_s=args.budget, reference_cache=reference
            )
            series = {
                **{(k, "fair"): r for k, r in matrix["ratios"].items()},
                **{(k, "no cache"): r for k, r in matrix["ratiosVsNoCache"].items()},
            }
            for (key, base), samples in series.items():
                med = statistics.median(samples)
                row = {
                    **common,
                    "case": what[case, key] if base == "fair" else f"{args.kv_dtype} cache against no cache",
                    "key": key,
                    "baseline": base,
                    "matrix": m,
                    "load1": round(load, 2),
                    "rounds": len(samples),
                    "median": round(med, 4),
                    "min": round(min(samples), 4),
                    "max": round(max(samples), 4),
                    "spread": round((max(samples) - min(samples)) / med, 4),
                }
                rows.append(row)
                print(
                    f"{row['case']:<45} matrix {m} (load {load:.1f}): median {med:.3f}x "
                    f"[{row['min']:.3f}, {row['max']:.3f}] spread {row['spread']:.1%}",
                    flush=True,
                )
    print("\nsummary (medians of the matrices, range of their medians, largest spread):")
    for name in dict.fromkeys(r["case"] for r in rows):
        mine = [r for r in rows if r["case"] == name]
        medians = [r["median"] for r in mine]
        print(
            f"  {name:<45} {statistics.median(medians):.3f}x "
            f"({min(medians):.3f}-{max(medians):.3f}), spread up to {max(r['spread'] for r in mine):.1%}"
        )
    if not args.no_csv:
        CSV.parent.mkdir(parents=True, exist_ok=True)
        new = not CSV.exists()
        with CSV.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                writer.writeheader()
            writer.writerows(rows)
        print(f"rows appended to {CSV.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
