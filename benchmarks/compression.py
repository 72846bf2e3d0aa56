"""Compression benchmark: codecs, weight-only quantized inference, and compressed DDP gradients.

One run prints, side by side with their baselines:
  codecs   per codec on real model weights and on a large Gaussian tensor: bytes ratio, SQNR,
           encode and decode time;
  matmul   one quantized linear layer against the float one (CPU: torch paths; GPU: the Triton
           dequant-matmul kernels against cuBLAS);
  weights  greedy decoding (batch 1) of a float model against its int8 / int4 weight-only
           copies: weight memory and tokens per second;
  ddp      two gloo processes on 127.0.0.1: bytes per step and step time of each comm hook
           against plain allreduce;
  link     the same, with each rank in its own network namespace and the two joined by a veth
           pair shaped with `tc tbf` (default 100mbit): the setting compression exists for.
           Needs root (CAP_NET_ADMIN); skipped with a message where that is not permitted.

Rows are appended to benchmarks/results/compression.csv with the machine named.

    .venv/bin/python benchmarks/compression.py                    # everything
    .venv/bin/python benchmarks/compression.py --sections link --rate 1gbit
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from optrun.runtime.compression.codecs import CODECS, get_codec, sqnr_db
from optrun.runtime.compression.ddp_run import DDPJob, compare, rank_command
from optrun.runtime.compression.quantized_linear import (
    QuantizedLinear,
    int8_linear_torch,
    linear_weights,
    model_weight_bytes,
    quantize_model,
)
from optrun.runtime.data import encode
from optrun.runtime.hardware import detect
from optrun.runtime.model import build_model
from optrun.runtime.timing import measure

ROOT = Path(__file__).resolve().parents[1]
CSV = ROOT / "benchmarks" / "results" / "compression.csv"
SECTIONS = ("codecs", "matmul", "weights", "ddp", "link")
DDP_HOOKS = ["allreduce", "int8", "int8-block", "fp8", "int4", "topk", "lowrank"]


class Recorder:
    def __init__(self, machine: str, device: str) -> None:
        self.machine, self.device = machine, device
        self.stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self.rows: list[list[object]] = []

    def add(self, section: str, case: str, metric: str, value: float | int | str) -> None:
        if isinstance(value, float):
            value = float(f"{value:.6g}")  # six significant digits: microseconds stay visible
        self.rows.append([self.stamp, self.machine, self.device, section, case, metric, value])

    def save(self) -> None:
        CSV.parent.mkdir(parents=True, exist_ok=True)
        new = not CSV.exists()
        with CSV.open("a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["time", "machine", "device", "section", "case", "metric", "value"])
            w.writerows(self.rows)
        print(f"\n{len(self.rows)} rows appended to {CSV.relative_to(ROOT)}")


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.2f}"


# --- codecs ---------------------------------------------------------------------------------------


def bench_codecs(rec: Recorder, device: torch.device, model_name: str) -> None:
    torch.manual_seed(0)
    weights = [lin.weight.detach().to(device) for _, lin in linear_weights(build_model(model_name))]
    gauss = [torch.randn(4096, 4096, device=device)]
    print(f"\n== codecs: {model_name} linear weights ({len(weights)} tensors) and a 4096x4096 Gaussian, fp32")
    print(
        f"{'codec':<11} {'tensors':<10} {'bytes ratio':>11} {'SQNR dB':>8} {'encode ms':>10} {'decode ms':>10}"
    )
    for name in CODECS:
        codec = get_codec(name, group_size=128, rank=4, topk_ratio=0.01)
        for label, tensors in ((model_name, weights), ("gauss4096", gauss)):
            payloads = [codec.encode(t) for t in tensors]
            original = sum(t.numel() * t.element_size() for t in tensors)
            stored = sum(p.nbytes for p in payloads)
            x = torch.cat([t.reshape(-1) for t in tensors])
            y = torch.cat([codec.decode(p).reshape(-1) for p in payloads])
            sq = sqnr_db(x, y)
            enc = measure(lambda ts=tensors, c=codec: [c.encode(t) for t in ts], device, warmup=1, repeats=3)
            dec = measure(lambda ps=payloads, c=codec: [c.decode(p) for p in ps], device, warmup=1, repeats=3)
            ratio = original / stored
            print(
                f"{name:<11} {label:<10} {ratio:11.2f} {sq:8.2f} {_ms(enc.median):>10} {_ms(dec.median):>10}"
            )
            case = f"{name}/{label}"
            rec.add("codecs", case, "bytes_ratio", ratio)
            rec.add("codecs", case, "sqnr_db", sq)
            rec.add("codecs", case, "encode_seconds", enc.median)
            rec.add("codecs", case, "decode_seconds", dec.median)


# --- one linear layer -------------------------------------------------------------------------------


def bench_matmul(rec: Recorder, device: torch.device) -> None:
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = [(4096, 4096), (11008, 4096)] if cuda else [(4096, 4096)]
    print(
        f"\n== matmul: y = x @ W^T, x {str(dtype).removeprefix('torch.')}, "
        f"{'Triton dequant-matmul vs cuBLAS' if cuda else 'torch paths'}"
    )
    print(f"{'M':>3} {'N x K':>12} {'float ms':>9} {'int8 ms':>9} {'x':>6} {'int4 ms':>9} {'x':>6}")
    for n, k in shapes:
        w = torch.randn(n, k, device=device) * 0.02
        q8 = QuantizedLinear(k, n, get_codec("int8"), get_codec("int8").encode(w))
        c4 = get_codec("int4", group_size=128)
        q4 = QuantizedLinear(k, n, c4, c4.encode(w))
        wf = w.to(dtype)
        for m in (1, 16):
            x = torch.randn(m, k, device=device, dtype=dtype)
            fns = {
                "float": lambda x=x, wf=wf: F.linear(x, wf),
                "int8": lambda x=x, q8=q8: q8(x),
                "int4": lambda x=x, q4=q4: q4(x),
            }
            # Eager: one call per synchronised timing, launch overhead included.
            times = {name: measure(fn, device, warmup=3, repeats=20).median for name, fn in fns.items()}
            modes = [("eager", times)]
            if cuda:  # kernel time alone: replayed from a CUDA graph, no Python launch cost
                from triton.testing import do_bench_cudagraph

                modes.append(
                    ("graph", {name: do_bench_cudagraph(fn, rep=20) / 1e3 for name, fn in fns.items()})
                )
            for mode, t in modes:
                r8, r4 = t["float"] / t["int8"], t["float"] / t["int4"]
                print(
                    f"{m:>3} {f'{n}x{k}':>12} {_ms(t['float']):>9} {_ms(t['int8']):>9} {r8:6.2f} "
                    f"{_ms(t['int4']):>9} {r4:6.2f}  {mode}"
                )
                case = f"M{m}/{n}x{k}/{str(dtype).removeprefix('torch.')}/{mode}"
                rec.add("matmul", case, "float_seconds", t["float"])
                rec.add("matmul", case, "int8_seconds", t["int8"])
                rec.add("matmul", case, "int4_seconds", t["int4"])
                rec.add("matmul", case, "int8_speedup", r8)
                rec.add("matmul", case, "int4_speedup", r4)
    if not cuda:
        x = torch.randn(1, 4096)
        q, s = q8.w_q, q8.w_scale
        pack = measure(lambda: int8_linear_torch(x, q, s, None), device, warmup=3, repeats=20)
        deq = measure(lambda: F.linear(x, q.float() * s[:, None]), device, warmup=3, repeats=20)
        print(
            f"  int8 CPU path: _weight_int8pack_mm {_ms(pack.median)} ms vs dequantize+linear {_ms(deq.median)} ms"
        )


# --- weight-only quantized decoding --------------------------------------------------------------------


@torch.no_grad()
def _decode(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    ids = prompt
    for _ in range(new_tokens):
        ids = torch.cat((ids, model(ids)[:, -1].argmax(-1, keepdim=True)), dim=1)
    return ids


def bench_weights(rec: Recorder, device: torch.device, models: list[str], new_tokens: int) -> None:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(
        f"\n== weights: greedy decoding, batch 1, {new_tokens} new tokens (no KV cache), "
        f"{str(dtype).removeprefix('torch.')} activations"
    )
    print(
        f"{'model':<9} {'variant':<6} {'weights MB':>10} {'mem ratio':>9} {'tok/s':>9} {'speedup':>8} {'same tokens':>11}"
    )
    prompt = torch.tensor([encode("def main(argv):\n    ", bos=True)], device=device)
    for name in models:
        torch.manual_seed(0)
        base = build_model(name).to(device=device, dtype=dtype).eval()
        ref_ids = _decode(base, prompt, new_tokens)
        t_base = measure(lambda b=base: _decode(b, prompt, new_tokens), device, warmup=1, repeats=3)
        mem_base = model_weight_bytes(base)
        variants = [("float", base, t_base)]
        for codec in ("int8", "int4"):
            qmodel, _ = quantize_model(base, get_codec(codec, group_size=128), max_error=1.0)
            variants.append(
                (
                    codec,
                    qmodel,
                    measure(lambda q=qmodel: _decode(q, prompt, new_tokens), device, warmup=1, repeats=3),
                )
            )
        for variant, model, t in variants:
            tps = new_tokens / t.median
            same = float((_decode(model, prompt, new_tokens) == ref_ids).float().mean())
            mem = model_weight_bytes(model)
            print(
                f"{name:<9} {variant:<6} {mem / 1e6:10.2f} {mem_base / mem:9.2f} {tps:9.1f} "
                f"{t_base.median / t.median:8.2f} {same:11.0%}"
            )
            case = f"{name}/{variant}"
            rec.add("weights", case, "weight_bytes", mem)
            rec.add("weights", case, "tokens_per_second", tps)
            rec.add("weights", case, "speedup", t_base.median / t.median)
            rec.add("weights", case, "greedy_agreement", same)


# --- DDP on loopback --------------------------------------------------------------------------------


def _print_ddp(rec: Recorder, section: str, label: str, results: dict[str, dict]) -> None:
    base = results["allreduce"]
    print(
        f"{'hook':<11} {'bytes/step':>12} {'bytes ratio':>11} {'step ms':>9} {'step-time ratio':>15} {'eval loss':>9}"
    )
    for hook, r in results.items():
        br = base["bytesPerStep"] / r["bytesPerStep"]
        tr = base["stepSeconds"] / r["stepSeconds"]
        print(
            f"{hook:<11} {r['bytesPerStep']:12.0f} {br:11.2f} {_ms(r['stepSeconds']):>9} {tr:15.2f} "
            f"{r['evalLoss']:9.4f}"
        )
        case = f"{label}/{hook}"
        rec.add(section, case, "bytes_per_step", r["bytesPerStep"])
        rec.add(section, case, "bytes_ratio", br)
        rec.add(section, case, "step_seconds", r["stepSeconds"])
        rec.add(section, case, "step_time_ratio", tr)
        rec.add(section, case, "eval_loss", r["evalLoss"])


def bench_ddp(rec: Recorder, steps: int) -> None:
    job = DDPJob(
        model="tiny-lm",
        hooks=DDP_HOOKS,
        steps=steps,
        batch_size=8,
        seq_len=64,
        learning_rate=1e-3,
        timeout_s=600,
    )
    print(
        f"\n== ddp: 2 gloo processes on 127.0.0.1, tiny-lm, {steps} steps per hook (step time: median after 2)"
    )
    _print_ddp(rec, "ddp", "loopback/tiny-lm", compare(job))


# --- DDP over a shaped link -----------------------------------------------------------------------------


class LinkUnavailable(RuntimeError):
    pass


@contextlib.contextmanager
def shaped_link(rate: str) -> Iterator[tuple[tuple[str, str], tuple[str, str], str]]:
    """Two network namespaces joined by a veth pair, both ends shaped to `rate` with tc tbf.

    Yields ((ns0, if0), (ns1, if1), address of rank 0); everything is deleted on exit, also on
    failure (deleting a namespace deletes its end of the veth, and with it the other end)."""
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None:
        raise LinkUnavailable("needs root and iproute2 (ip, tc) to create network namespaces")
    tag = f"{os.getpid() % 100000}"
    ns = (f"optrun-bw{tag}a", f"optrun-bw{tag}b")
    ifs = (f"obw{tag}a", f"obw{tag}b")
    addrs = ("10.231.77.1", "10.231.77.2")
    created: list[str] = []

    def run(*cmd: str) -> None:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise LinkUnavailable(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()}")

    try:
        for n in ns:
            run("ip", "netns", "add", n)
            created.append(n)
        run("ip", "link", "add", ifs[0], "type", "veth", "peer", "name", ifs[1])
        for n, i, a in zip(ns, ifs, addrs, strict=True):
            run("ip", "link", "set", i, "netns", n)
            run("ip", "-n", n, "addr", "add", f"{a}/24", "dev", i)
            run("ip", "-n", n, "link", "set", i, "up")
            run("ip", "-n", n, "link", "set", "lo", "up")
            # Token bucket: `rate` sustained; a burst of 64 KB keeps tbf exact at 100 Mbit/s and more.
            run(
                "tc",
                "-n",
                n,
                "qdisc",
                "add",
                "dev",
                i,
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                "64kb",
                "latency",
                "50ms",
            )
        yield (ns[0], ifs[0]), (ns[1], ifs[1]), addrs[0]
    finally:
        for n in created:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)
        subprocess.run(["ip", "link", "del", ifs[0]], capture_output=True)  # if it never moved


def run_in_namespaces(job: DDPJob, link: tuple[tuple[str, str], tuple[str, str], str]) -> dict[str, dict]:
    (ns0, if0), (ns1, if1), addr0 = link
    with tempfile.TemporaryDirectory(prefix="optrun-link-") as tmp:
        out = Path(tmp) / "result.json"
        init = f"tcp://{addr0}:29533"
        procs, logs = [], []
        for rank, (ns, iface) in enumerate(((ns0, if0), (ns1, if1))):
            env = {**os.environ, "GLOO_SOCKET_IFNAME": iface, "PYTHONPATH": str(ROOT)}
            log = (Path(tmp) / f"rank{rank}.log").open("wb")
            logs.append(log)
            cmd = [
                "ip",
                "netns",
                "exec",
                ns,
                *rank_command(rank, job, init, out if rank == 0 else None, None),
            ]
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        try:
            for p in procs:
                p.wait(job.timeout_s)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for log in logs:
                log.close()
        if any(p.returncode for p in procs) or not out.exists():
            tails = [(Path(tmp) / f"rank{r}.log").read_text(errors="replace")[-800:] for r in range(2)]
            raise RuntimeError(f"ranks failed: {[p.returncode for p in procs]}\n" + "\n".join(tails))
        return {r["hook"]: r for r in json.loads(out.read_text())["results"]}


def bench_link(rec: Recorder, rate: str, steps: int) -> None:
    job = DDPJob(
        model="tiny-lm",
        hooks=DDP_HOOKS,
        steps=steps,
        batch_size=8,
        seq_len=64,
        learning_rate=1e-3,
        timeout_s=900,
    )
    print(
        f"\n== link: 2 gloo processes in 2 network namespaces over a veth pair shaped to {rate} (tc tbf), "
        f"tiny-lm, {steps} steps per hook"
    )
    try:
        with shaped_link(rate) as link:
            results = run_in_namespaces(job, link)
    except LinkUnavailable as exc:
        print(f"SKIPPED: bandwidth-limited link not available here: {exc}")
        return
    _print_ddp(rec, "link", f"{rate}/tiny-lm", results)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}"
    )
    ap.add_argument("--rate", default="100mbit", help="tc rate of the shaped link (100mbit, 1gbit, ...)")
    ap.add_argument("--ddp-steps", type=int, default=12, help="steps per hook in the ddp and link sections")
    ap.add_argument(
        "--new-tokens", type=int, default=32, help="tokens generated per decode in the weights section"
    )
    ap.add_argument(
        "--models",
        default="",
        help="models of the weights section (default: tiny-lm,small-lm on CPU, small-lm,base-lm on GPU)",
    )
    args = ap.parse_args()
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        ap.error(f"--sections: unknown {', '.join(unknown)}; allowed: {', '.join(SECTIONS)}")
    device, hw = detect()
    machine = (
        f"{hw.name} ({hw.cpu_count} CPUs)"
        if device.type == "cpu"
        else f"{hw.name} ({hw.cpu_count} CPUs host)"
    )
    print(f"machine: {machine}; device: {device}; torch {torch.__version__}")
    rec = Recorder(machine, str(device))
    cuda = device.type == "cuda"
    models = [m for m in args.models.split(",") if m] or (
        ["small-lm", "base-lm"] if cuda else ["tiny-lm", "small-lm"]
    )
    started = time.monotonic()
    if "codecs" in sections:
        bench_codecs(rec, device, "small-lm")
    if "matmul" in sections:
        bench_matmul(rec, device)
    if "weights" in sections:
        bench_weights(rec, device, models, args.new_tokens)
    if "ddp" in sections:
        bench_ddp(rec, args.ddp_steps)
    if "link" in sections:
        bench_link(rec, args.rate, args.ddp_steps)
    print(f"\ntotal {time.monotonic() - started:.0f} s")
    rec.save()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
