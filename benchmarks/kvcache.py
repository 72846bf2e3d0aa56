"""KV-cache benchmark: the scaling sweep, each cache dtype against the full-precision cache.

Per (dtype, batch, context): decode tokens/s, prefill tokens/s, cache bytes per token, peak
memory (CUDA: allocator peak of one generation, weights excluded; CPU: the cache's bytes) and
the largest batch whose cache fits the memory budget, with ratios to the full-precision cache
(the model's parameter dtype) at the same cell. Also decoding with the cache against decoding
without one (every step re-runs the prefix) at one shape: what the cache is for.

Rows are appended to benchmarks/results/kvcache.csv with the machine named.

    .venv/bin/python benchmarks/kvcache.py                   # CPU: tiny-lm, quickstart shapes
    .venv/bin/python benchmarks/kvcache.py --model small-lm --precision bf16 \\
        --batch-sizes 1 16 64 --contexts 512 2048     # the GPU defaults
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import sys
import time
from pathlib import Path

import torch

from optrun.runtime.data import Corpus
from optrun.runtime.hardware import detect
from optrun.runtime.kvcache.cache import CACHE_DTYPES
from optrun.runtime.kvcache.generate import generate
from optrun.runtime.kvcache.sweep import default_budget, run_sweep, supported_dtypes
from optrun.runtime.model import PRESETS, build_model
from optrun.runtime.timing import measure

ROOT = Path(__file__).resolve().parents[1]
CSV = ROOT / "benchmarks" / "results" / "kvcache.csv"
FIELDS = [
    "time",
    "machine",
    "device",
    "torch",
    "model",
    "precision",
    "dtype",
    "batch",
    "context",
    "new_tokens",
    "tokens_per_second",
    "ratio_tokens_per_second",
    "prefill_tokens_per_second",
    "bytes_per_token",
    "ratio_bytes_per_token",
    "peak_memory_bytes",
    "ratio_peak_memory",
    "largest_batch",
    "ratio_largest_batch",
    "memory_budget_bytes",
]
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--model", default="small-lm" if gpu else "tiny-lm", choices=list(PRESETS))
    ap.add_argument("--precision", default="bf16" if gpu else "fp32", choices=list(PRECISIONS))
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64] if gpu else [1, 4, 16])
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 2048] if gpu else [64, 256])
    ap.add_argument("--dtypes", nargs="+", default=list(CACHE_DTYPES), choices=list(CACHE_DTYPES))
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--budget-gib", type=float, default=None, help="cache memory budget (default: a quarter of memory)"
    )
    ap.add_argument("--no-csv", action="store_true", help="print only")
    args = ap.parse_args(argv)

    device, hw = detect(args.device)
    torch.manual_seed(0)
    model = build_model(args.model).to(device=device, dtype=PRECISIONS[args.precision]).eval()
    budget = int(args.budget_gib * 2**30) if args.budget_gib else default_budget(device, hw.memory_bytes)
    usable, unsupported = supported_dtypes(device)
    for d, why in unsupported.items():
        print(f"skipping {d}: {why}")
    corpus = Corpus.build("pydoc")
    head = (
        f"{'dtype':>5} {'B':>5} {'C':>6} {'decode tok/s':>13} {'x ref':>6} {'prefill tok/s':>14} "
        f"{'B/token':>9} {'x ref':>6} {'peak MiB':>9} {'x ref':>6} {'max batch':>10} {'x ref':>6}"
    )
    print(
        f"\nKV-cache sweep: {args.model} {args.precision} on {hw.name} ({device}), budget {budget / 2**30:.2f} GiB, "
        f"{args.new_tokens} decoded tokens, median of {args.repeats}; ratios (x ref) against the cache in the "
        f"model's dtype\n"
    )
    print(head)
    print("-" * len(head))

    def show(r: dict) -> None:
        print(
            f"{r['dtype']:>5} {r['batch']:>5} {r['context']:>6} {r['tokens_per_second']:>13.0f} "
            f"{r['ratio_tokens_per_second']:>6.2f} {r['prefill_tokens_per_second']:>14.0f} "
            f"{r['bytes_per_token']:>9.1f} {r['ratio_bytes_per_token']:>6.3f} "
            f"{r['peak_memory_bytes'] / 2**20:>9.2f} {r['ratio_peak_memory']:>6.3f} "
            f"{r['largest_batch']:>10} {r['ratio_largest_batch']:>6.2f}",
            flush=True,
        )

    started = time.monotonic()
    sweep = run_sweep(
        model,
        batch_sizes=args.batch_sizes,
        context_lengths=args.contexts,
        dtypes=[d for d in args.dtypes if d in usable],
        memory_budget_bytes=budget,
        new_tokens=args.new_tokens,
        prompt_tokens=corpus.val,
        repeats=args.repeats,
        on_row=show,
    )
    print(f"({time.monotonic() - started:.0f} s)")
    for s in sweep["skipped"]:
        print(f"skipped: {s}")

    # What the cache buys: the same greedy decode with and without it, at the largest cell.
    b, c = max(args.batch_sizes), min(max(args.contexts), model.cfg.max_seq_len)
    n = min(args.new_tokens, c // 2)
    prompt = torch.randint(0, 256, (b, c - n), generator=torch.Generator().manual_seed(0)).to(device)
    with_cache = measure(lambda: generate(model, prompt, n, eos_id=None), device, warmup=1, repeats=3)
    without = measure(
        lambda: generate(model, prompt, n, use_cache=False, eos_id=None), device, warmup=1, repeats=3
    )
    print(
        f"\ngreedy decode of {n} tokens at B={b}, C={c}: with the {sweep['reference']} cache "
        f"{with_cache.median * 1e3:.1f} ms, without {without.median * 1e3:.1f} ms: "
        f"{without.median / with_cache.median:.2f}x"
    )

    if not args.no_csv:
        stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        CSV.parent.mkdir(parents=True, exist_ok=True)
        new = not CSV.exists()
        with CSV.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
            if new:
                w.writeheader()
            for r in sweep["rows"]:
                w.writerow(
                    {
                        **{k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()},
                        "time": stamp,
                        "machine": hw.name,
                        "device": str(device),
                        "torch": torch.__version__,
                        "model": args.model,
                        "precision": args.precision,
                        "new_tokens": args.new_tokens,
                        "memory_budget_bytes": budget,
                    }
                )
            w.writerow(
                {
                    "time": stamp,
                    "machine": hw.name,
                    "device": str(device),
                    "torch": torch.__version__,
                    "model": args.model,
                    "precision": args.precision,
                    "dtype": "nocache-vs-cache",
                    "batch": b,
                    "context": c,
                    "new_tokens": n,
                    "ratio_tokens_per_second": round(without.median / with_cache.median, 4),
                }
            )
        print(f"{len(sweep['rows']) + 1} rows appended to {CSV.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
