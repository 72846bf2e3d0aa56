"""RLVR benchmark: the RLVR stage over several seeds (and optionally a grid of settings).

Each run is what the stage does (`optrun.runtime.rlvr.train_rlvr`): a fresh tiny-lm, the
supervised warm-up, held-out exact-match accuracy before RL, GRPO, accuracy after. Printed per
run and, per setting, the mean and spread over seeds of the pre-RL accuracy, the post-RL
accuracy, the improvement and the wall time of each phase. Runs go to separate processes
(`--jobs`), each limited to `--threads` threads, so a many-core machine can run seeds side by
side at the per-run speed of a small CPU.

Rows are appended to benchmarks/results/rlvr.csv with the machine named.

    .venv/bin/python benchmarks/rlvr.py                           # quickstart settings, seeds 0 1 2
    .venv/bin/python benchmarks/rlvr.py --seeds 0 1 2 3 4 --jobs 5
    .venv/bin/python benchmarks/rlvr.py --grid "learningRate=1e-4|3e-4" --grid "warmupSteps=150|300"
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import datetime as dt
import itertools
import json
import multiprocessing as mp
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CSV = ROOT / "benchmarks" / "results" / "rlvr.csv"


def _one(settings: dict[str, Any], seed: int, threads: int) -> dict[str, Any]:
    import torch

    from optrun.api.v1alpha1 import RLVR
    from optrun.runtime.model import build_model
    from optrun.runtime.rlvr import train_rlvr

    torch.set_num_threads(threads)
    cfg = RLVR.model_validate({"enabled": True, **settings})
    torch.manual_seed(seed)  # the weights of the fresh policy
    result = train_rlvr(build_model("tiny-lm"), cfg, seed=seed)
    curve = result.pop("curve")
    k = max(1, len(curve) // 6)
    result["pass_at_1_first"] = statistics.mean(c["pass_at_1"] for c in curve[:k])
    result["pass_at_1_last"] = statistics.mean(c["pass_at_1"] for c in curve[-k:])
    return result


def _parse(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="an RLVR spec field (camelCase)"
    )
    ap.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1|V2",
        help="one run per value (values split at |), crossed",
    )
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per run")
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args(argv)

    base = {k: _parse(v) for k, v in (s.split("=", 1) for s in args.set)}
    axes = [(k, [_parse(x) for x in v.split("|")]) for k, v in (g.split("=", 1) for g in args.grid)]
    settings = [
        {**base, **dict(zip([k for k, _ in axes], combo, strict=True))}
        for combo in itertools.product(*[vals for _, vals in axes])
    ]
    jobs = [(s, seed) for s in settings for seed in args.seeds]
    results: list[tuple[dict[str, Any], dict[str, Any]]] = []
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
        futures = {pool.submit(_one, s, seed, args.threads): (s, seed) for s, seed in jobs}
        for fut in cf.as_completed(futures):
            s, seed = futures[fut]
            r = fut.result()
            results.append((s, r))
            sec = r["seconds"]
            print(
                f"{json.dumps(s)} seed {seed}: pre {r['pre_accuracy']:.3f} -> post {r['post_accuracy']:.3f} "
                f"({r['improvement']:+.3f}, measurable >= {r['min_improvement']:.3f}), sampled pass@1 "
                f"{r['pass_at_1_first']:.3f} -> {r['pass_at_1_last']:.3f}, KL {r['kl_final']:.4f}, "
                f"warm-up steps {r['warmup_steps']}, "
                f"warm-up {sec['warmup']:.1f}s, RL {sec['rl']:.1f}s, total {sec['total']:.1f}s",
                flush=True,
            )

    from optrun.runtime.hardware import detect

    _, hw = detect("cpu")
    print(f"\n{hw.name}, {args.threads} threads per run, {args.jobs} runs in parallel")
    print(
        f"{'setting':<48} {'seeds':>5} {'pre':>13} {'post':>13} {'gain':>13} {'min gain':>8} {'total s':>8}"
    )
    for s in settings:
        rs = [r for s2, r in results if s2 == s]

        def ms(key: str, rs: list[dict[str, Any]] = rs) -> str:
            xs = [r[key] for r in rs]
            return f"{statistics.mean(xs):.3f}±{statistics.pstdev(xs):.3f}"

        print(
            f"{json.dumps(s) or '{}':<48} {len(rs):>5} {ms('pre_accuracy'):>13} {ms('post_accuracy'):>13} "
            f"{ms('improvement'):>13} {min(r['improvement'] - r['min_improvement'] for r in rs):>+8.3f} "
            f"{statistics.mean(r['seconds']['total'] for r in rs):>8.1f}"
        )
    if not args.no_csv:
        stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        CSV.parent.mkdir(parents=True, exist_ok=True)
        new = not CSV.exists()
        fields = [
            "time",
            "machine",
            "threads",
            "setting",
            "seed",
            "task",
            "warmup_steps",
            "pre_accuracy",
            "post_accuracy",
            "improvement",
            "min_improvement",
            "kl_final",
            "warmup_seconds",
            "rl_seconds",
            "total_seconds",
        ]
        with CSV.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                w.writeheader()
            for s, r in results:
                w.writerow(
                    {
                        **r,
                        "time": stamp,
                        "machine": hw.name,
                        "threads": args.threads,
                        "setting": json.dumps(s),
                        "warmup_seconds": r["seconds"]["warmup"],
                        "rl_seconds": r["seconds"]["rl"],
                        "total_seconds": r["seconds"]["total"],
                    }
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
