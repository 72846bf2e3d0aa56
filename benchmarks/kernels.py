"""Kernel benchmark: each fused kernel against eager PyTorch and torch.compile, forward + backward.

Per kernel and shape it prints the median time of one forward + backward and the peak memory it
allocates, for eager, torch.compile (of the same eager function) and the Triton kernel, with the
ratios, and appends one row per implementation to benchmarks/results/kernels.csv with the device
named. Before timing, each candidate's outputs and gradients are checked against eager
(`parity.MODEL_TOLERANCE`); a mismatch is printed and recorded, never hidden.

Kernels: rms_norm, swiglu (the fused gate silu(a) * b), rope (q and k), cross_entropy (over
given logits), fused_linear_cross_entropy (projection + loss, chunked: its point is memory).

    .venv/bin/python benchmarks/kernels.py                 # on a GPU: model-sized shapes, bf16
    .venv/bin/python benchmarks/kernels.py --full          # more shapes (fits 5 minutes on an H100)
    .venv/bin/python benchmarks/kernels.py --quick         # small shapes; on a CPU, Triton is skipped

Targets on an H100 (after Liger-Kernel's figures on an A100): rms_norm >= 2.5x and
cross_entropy >= 2x faster than eager, and neither slower than torch.compile. The script
prints how each measured ratio compares; it asserts nothing.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gc
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import triton
from torch import Tensor

from optrun.runtime.hardware import detect
from optrun.runtime.kernels.ops import cross_entropy as ce
from optrun.runtime.kernels.ops.rms_norm import rms_norm, rms_norm_reference
from optrun.runtime.kernels.ops.rope import rotary, rotary_reference
from optrun.runtime.kernels.ops.swiglu import swiglu, swiglu_reference
from optrun.runtime.kernels.parity import MODEL_TOLERANCE, compare
from optrun.runtime.model import rope_tables
from optrun.runtime.timing import measure

ROOT = Path(__file__).resolve().parents[1]
CSV = ROOT / "benchmarks" / "results" / "kernels.csv"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IMPLS = ("eager", "compile", "triton")
# Targets from the issue, for an H100: kernel -> (min speedup over eager, must match compile).
TARGETS = {"rms_norm": 2.5, "cross_entropy": 2.0}


@dataclass
class Case:
    kernel: str
    shape: str
    make: Callable[[], list[Tensor]]  # inputs; floating ones get gradients
    eager: Callable[..., Any]
    triton: Callable[..., Any]
    results: dict[str, dict[str, Any]] = field(default_factory=dict)


def cases(device: torch.device, dtype: torch.dtype, size: str) -> list[Case]:
    """The benchmark cases; size is quick (CPU-sized), default or full."""

    def rnd(*shape: int, scale: float = 1.0, dt: torch.dtype = dtype) -> Tensor:
        return (torch.randn(*shape, device=device) * scale).to(dt)

    def labels(n: int, v: int) -> Tensor:
        return torch.randint(0, v, (n,), device=device)

    def rms(n: int, d: int) -> Case:
        return Case(
            "rms_norm",
            f"{n}x{d}",
            lambda: [rnd(n, d), 1 + rnd(d, scale=0.1)],
            lambda x, w: rms_norm_reference(x, w, 1e-5),
            lambda x, w: rms_norm(x, w, 1e-5),
        )

    def gate(n: int, h: int) -> Case:
        return Case("swiglu", f"{n}x{h}", lambda: [rnd(n, h, scale=2), rnd(n, h)], swiglu_reference, swiglu)

    def rope(b: int, t: int, hq: int, hk: int, d: int) -> Case:
        cos, sin = rope_tables(t, d, 500000.0, device=device)
        return Case(
            "rope",
            f"b{b} t{t} h{hq}/{hk} d{d}",
            lambda: [rnd(b, t, hq, d).transpose(1, 2), rnd(b, t, hk, d).transpose(1, 2)],
            lambda q, k: rotary_reference(q, k, cos, sin),
            lambda q, k: rotary(q, k, cos, sin),
        )

    def xent(n: int, v: int) -> Case:
        y = labels(n, v)
        return Case(
            "cross_entropy",
            f"{n}x{v}",
            lambda: [rnd(n, v, scale=2)],
            lambda z: ce.cross_entropy_reference(z, y),
            lambda z: ce.cross_entropy(z, y),
        )

    def flce(n: int, d: int, v: int) -> Case:
        y = labels(n, v)
        return Case(
            "fused_linear_cross_entropy",
            f"{n}x{d} v{v}",
            lambda: [rnd(n, d), rnd(v, d, scale=d**-0.5)],
            lambda h, w: ce.linear_cross_entropy_reference(h, w, y),
            lambda h, w: ce.fused_linear_cross_entropy(h, w, y),
        )

    if size == "quick":
        return [
            rms(2048, 512),
            gate(2048, 1376),
            rope(2, 128, 8, 8, 64),
            xent(512, 8192),
            flce(512, 512, 8192),
        ]
    out = [
        rms(16384, 4096),
        gate(8192, 14336),
        rope(4, 2048, 32, 8, 128),
        xent(8192, 128256),
        flce(8192, 4096, 128256),
    ]
    if size == "full":
        out += [
            rms(32768, 8192),
            rms(4 * 423, 213),
            gate(3 * 423, 213),
            rope(3, 423, 3, 1, 26),
            xent(8192, 32000),
            flce(8192, 4096, 32000),
            flce(16384, 4096, 128256),
        ]
    return out


def fwd_bwd(
    fn: Callable[..., Any], inputs: list[Tensor]
) -> Callable[[], tuple[list[Tensor], tuple[Tensor, ...]]]:
    """One forward + backward of fn on fresh leaf copies of inputs, against a fixed upstream gradient."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    wanted = [t for t in leaves if t.requires_grad]
    grad_out: list[Tensor] = []

    def step() -> tuple[list[Tensor], tuple[Tensor, ...]]:
        out = fn(*leaves)
        outs = list(out) if isinstance(out, tuple) else [out]
        if not grad_out:
            gen = torch.Generator(device=outs[0].device).manual_seed(0)
            grad_out.extend(
                torch.ones_like(o)
                if o.dim() == 0
                else torch.randn(o.shape, generator=gen, device=o.device).to(o.dtype)
                for o in outs
            )
        return [o.detach() for o in outs], torch.autograd.grad(outs, wanted, grad_out)

    return step


def time_ms(step: Callable[[], object], device: torch.device, quick: bool) -> float:
    if device.type == "cuda":
        return float(triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median"))
    return measure(step, device, warmup=1, repeats=3 if quick else 5).median * 1e3


def peak_mib(step: Callable[[], object], device: torch.device) -> float | None:
    """Memory a step allocates beyond what existed before it, at its peak (CUDA only)."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def parity(
    got: tuple[list[Tensor], tuple[Tensor, ...]],
    ref: tuple[list[Tensor], tuple[Tensor, ...]],
    dtype: torch.dtype,
) -> str:
    tol = MODEL_TOLERANCE[dtype]
    for i, (a, e) in enumerate(zip([*got[0], *got[1]], [*ref[0], *ref[1]], strict=True)):
        m = compare(a, e, tol, f"tensor {i}")
        if m is not None:
            return f"FAIL {m}"
    return "ok"


def run_case(
    case: Case, device: torch.device, dtype: torch.dtype, args: argparse.Namespace, deadline: float
) -> None:
    inputs = case.make()
    eager = fwd_bwd(case.eager, inputs)
    reference = eager()
    impls: dict[str, Callable[..., Any] | str] = {"eager": case.eager}
    impls["compile"] = (
        "skipped: --no-compile"
        if args.no_compile
        else "skipped: time budget spent"
        if time.monotonic() > deadline
        else torch.compile(case.eager, dynamic=False)
    )
    impls["triton"] = (
        case.triton
        if device.type == "cuda"
        else f"skipped: no CUDA device (Triton runs on a {device.type} only in its interpreter, a correctness tool)"
    )
    for name, fn in impls.items():
        if isinstance(fn, str):
            case.results[name] = {"skipped": fn}
            continue
        step = eager if name == "eager" else fwd_bwd(fn, inputs)
        started = time.monotonic()
        try:
            first = step()  # compiles (Inductor or Triton JIT) and checks parity
        except Exception as exc:  # a benchmark reports a broken candidate and goes on
            case.results[name] = {"skipped": f"failed: {type(exc).__name__}: {exc}"[:300]}
            continue
        compile_s = time.monotonic() - started
        case.results[name] = {
            "ms": time_ms(step, device, args.quick),
            "peak_mib": peak_mib(step, device),
            "parity": "reference" if name == "eager" else parity(first, reference, dtype),
            "first_call_s": compile_s,
        }
        del first
    del eager, reference, inputs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fmt(v: float | None, unit: str = "") -> str:
    return "-" if v is None else f"{v:.3f}{unit}" if v < 10 else f"{v:.1f}{unit}"


def report(all_cases: Sequence[Case], device_name: str, dtype_name: str) -> None:
    print(f"\n{device_name}, {dtype_name}, forward + backward (median), peak memory allocated by the step")
    head = (
        f"{'kernel':28} {'shape':22} {'eager ms':>9} {'compile ms':>10} {'triton ms':>9} "
        f"{'vs eager':>8} {'vs compile':>10} {'eager MiB':>10} {'compile MiB':>11} {'triton MiB':>10}"
    )
    print(head)
    print("-" * len(head))
    for c in all_cases:
        r = c.results
        ms = {k: r.get(k, {}).get("ms") for k in IMPLS}
        mib = {k: r.get(k, {}).get("peak_mib") for k in IMPLS}
        vs_e = ms["eager"] / ms["triton"] if ms["eager"] and ms["triton"] else None
        vs_c = ms["compile"] / ms["triton"] if ms["compile"] and ms["triton"] else None
        print(
            f"{c.kernel:28} {c.shape:22} {fmt(ms['eager']):>9} {fmt(ms['compile']):>10} {fmt(ms['triton']):>9} "
            f"{fmt(vs_e, 'x'):>8} {fmt(vs_c, 'x'):>10} {fmt(mib['eager']):>10} {fmt(mib['compile']):>11} "
            f"{fmt(mib['triton']):>10}"
        )
    notes = [
        (c, k, v)
        for c in all_cases
        for k, v in c.results.items()
        if "skipped" in v or v.get("parity", "ok") not in ("ok", "reference")
    ]
    for c, k, v in notes:
        print(f"  {c.kernel} {c.shape} {k}: {v.get('skipped') or 'parity ' + v['parity']}")
    for c in all_cases:
        target = TARGETS.get(c.kernel)
        ms = {k: c.results.get(k, {}).get("ms") for k in IMPLS}
        if target is None or not ms["triton"]:
            continue
        vs_e = ms["eager"] / ms["triton"]
        line = f"  target {c.kernel} {c.shape}: {vs_e:.2f}x vs eager (target {target}x: {'met' if vs_e >= target else 'NOT met'})"
        if ms["compile"]:
            vs_c = ms["compile"] / ms["triton"]
            line += f", {vs_c:.2f}x vs compile ({'not slower' if vs_c >= 1.0 else 'SLOWER'})"
        print(line)


def append_csv(
    path: Path, all_cases: Sequence[Case], device_name: str, device_class: str, dtype_name: str
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(
                [
                    "time",
                    "device",
                    "device_class",
                    "torch",
                    "triton",
                    "kernel",
                    "shape",
                    "dtype",
                    "impl",
                    "ms",
                    "peak_mib",
                    "speedup_vs_eager",
                    "parity",
                    "note",
                ]
            )
        for c in all_cases:
            eager_ms = c.results.get("eager", {}).get("ms")
            for impl in IMPLS:
                r = c.results.get(impl, {})
                ms = r.get("ms")
                w.writerow(
                    [
                        now,
                        device_name,
                        device_class,
                        torch.__version__,
                        triton.__version__,
                        c.kernel,
                        c.shape,
                        dtype_name,
                        impl,
                        "" if ms is None else round(ms, 4),
                        "" if r.get("peak_mib") is None else round(r["peak_mib"], 1),
                        "" if not (ms and eager_ms) else round(eager_ms / ms, 3),
                        r.get("parity", ""),
                        r.get("skipped", ""),
                    ]
                )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small shapes (the default on a CPU)")
    size.add_argument("--full", action="store_true", help="more shapes, odd ones included")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--kernels", nargs="+", help="only these kernels")
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    p.add_argument(
        "--budget",
        type=float,
        help="seconds after which no new torch.compile is started (default 90; 240 with --full)",
    )
    p.add_argument("--csv", type=Path, default=CSV, help=f"where rows are appended (default {CSV})")
    args = p.parse_args(argv)

    device, hw = detect()
    if device.type != "cuda" and not args.quick:
        print("no CUDA device: running the --quick shapes on the CPU (Triton is skipped there)")
        args.quick = True
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[dtype_name]
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32, for eager and compile alike
    size_name = "quick" if args.quick else "full" if args.full else "default"
    todo = cases(device, dtype, size_name)
    if args.kernels:
        unknown = sorted(set(args.kernels) - {c.kernel for c in todo})
        if unknown:
            p.error(
                f"--kernels: unknown {', '.join(unknown)}; allowed: {', '.join(sorted({c.kernel for c in todo}))}"
            )
        todo = [c for c in todo if c.kernel in args.kernels]
    print(
        f"device {hw.name} ({hw.device_class}), torch {torch.__version__}, triton {triton.__version__}, "
        f"{dtype_name}, {len(todo)} cases"
    )
    if device.type != "cuda":
        print(
            "triton: skipped on this CPU; the Triton interpreter checks correctness (tests), it is no speed candidate"
        )
    started = time.monotonic()
    deadline = started + (args.budget if args.budget is not None else 240.0 if args.full else 90.0)
    torch.manual_seed(0)
    for case in todo:
        t0 = time.monotonic()
        run_case(case, device, dtype, args, deadline)
        print(f"  {case.kernel} {case.shape}: {time.monotonic() - t0:.1f}s", flush=True)
    report(todo, hw.name, dtype_name)
    append_csv(args.csv, todo, hw.name, hw.device_class, dtype_name)
    print(f"\nrows appended to {args.csv}; total {time.monotonic() - started:.0f}s")
    failed = [c for c in todo for r in c.results.values() if str(r.get("parity", "")).startswith("FAIL")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
