"""A Hugging Face model on real model shapes: kernels, training throughput, weight-only decode
and the KV cache at equal memory, each baseline and candidate timed in this process.

The model is built from a transformers config (random weights: no download; the default is
Llama-3-8B's dimensions, hidden 4096, MLP 14336, 32/8 heads, vocab 128256, with fewer layers so a
run fits a short GPU lease; `--layers` sets them) and wrapped as optrun wraps a user's model.

1. kernels: optrun's own selection (`select_kernels`) on the model's real layer inputs: per
   operation the median forward + backward time of eager, torch.compile, optrun's Triton
   kernel and Liger-Kernel's, with parity checked; the ratios to eager.
2. train: tokens/s and peak memory of a training step (forward, backward, AdamW), eager against
   the model patched with the selection's choices.
3. decode: greedy decode tokens/s and weight memory of the bf16 model against int8 and int4
   weight-only quantization (optrun's QuantizedLinear).
4. kv cache: at one memory budget, the largest batch of a bf16 cache and of an int8 cache, and
   decode tokens/s at each of those batches.

    .venv/bin/python benchmarks/hf_model.py                 # on a GPU: Llama-3-8B shapes, bf16
    .venv/bin/python benchmarks/hf_model.py --quick         # a small model (what a CPU can run)

Rows go to benchmarks/results/hf_model.csv with the device named, each appended (and flushed)
as soon as it is measured: benchmarks/gpu.sh bounds this step in time, and a step cut short
keeps every row measured before the cut. A torch.compile candidate may take
`--compile-timeout` seconds to compile (20 on a GPU by default, so that the four operations'
compiles fit the step's 120 s with the other sections; one that overruns is recorded as such and
compile is not tried again). It asserts nothing.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gc
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from optrun.runtime.hardware import detect
from optrun.runtime.lm import hf
from optrun.runtime.timing import measure, synchronize

ROOT = Path(__file__).resolve().parents[1]
CSV = ROOT / "benchmarks" / "results" / "hf_model.csv"
LLAMA3_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
}
FIELDS = ["time", "device", "section", "what", "impl", "value", "unit", "note"]
QUICK = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "vocab_size": 2048,
    "max_position_embeddings": 1024,
}


class Tok:
    """A stand-in tokenizer: the benchmark feeds random ids and decodes nothing."""

    def __init__(self, vocab: int) -> None:
        self.vocab_size, self.bos_id, self.eos_id, self.pad_id = vocab, 1, 2, 0
        self.tok = None


def build(dims: dict[str, Any], layers: int, dtype: torch.dtype, device: torch.device) -> hf.HFCausalLM:
    import transformers

    config = transformers.LlamaConfig(num_hidden_layers=layers, tie_word_embeddings=False, **dims)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return hf.HFCausalLM(model, Tok(dims["vocab_size"])).to(device)  # type: ignore[arg-type]


def peak(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def reset(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small model (what a CPU can run)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 2; quick 2)")
    ap.add_argument(
        "--tokens", type=int, default=None, help="tokens per training batch (default 8192; quick 512)"
    )
    ap.add_argument("--csv", type=Path, default=CSV)
    ap.add_argument(
        "--compile-timeout",
        type=float,
        default=None,
        help="seconds a torch.compile candidate may take to compile (default 20 on a GPU, 2 on a CPU; 0: no compile)",
    )
    ap.add_argument("--sections", default="kernels,train,decode,kvcache")
    args = ap.parse_args(argv)
    device, hw = detect(None)
    quick = args.quick or device.type != "cuda"
    dims = QUICK if quick else LLAMA3_8B
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layers = args.layers or 2
    tokens = args.tokens or (512 if quick else 8192)
    seq = 256 if quick else 2048
    batch = max(1, tokens // seq)
    sections = set(args.sections.split(","))
    compile_timeout = (
        args.compile_timeout if args.compile_timeout is not None else (20.0 if not quick else 2.0)
    )
    rows = 0
    stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    print(
        f"device {hw.name} ({device}), {dtype}, {layers} layers of {'quick' if quick else 'Llama-3-8B'} dims"
    )

    args.csv.parent.mkdir(parents=True, exist_ok=True)

    def row(section: str, what: str, impl: str, value: float, unit: str, extra: str = "") -> None:
        """Append one measurement to the CSV at once (flushed): a timeout keeps what was measured."""
        nonlocal rows
        new = not args.csv.exists() or args.csv.stat().st_size == 0
        with args.csv.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                w.writeheader()
            w.writerow(
                {
                    "time": stamp,
                    "device": hw.name,
                    "section": section,
                    "what": what,
                    "impl": impl,
                    "value": round(value, 6),
                    "unit": unit,
                    "note": extra,
                }
            )
            f.flush()
        rows += 1

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, dims["vocab_size"], (batch, seq), generator=gen).to(device)
    y = torch.randint(0, dims["vocab_size"], (batch, seq), generator=gen).to(device)

    if "kernels" in sections or "train" in sections:
        from optrun.runtime.kernels import patch_model, select_kernels

        model = build(dims, layers, dtype, device)
        autocast = None if dtype == torch.float32 else dtype
        selections = select_kernels(
            model,
            lambda: model.loss(x, y),
            device=device,
            device_name=hw.name,
            autocast_dtype=autocast,
            cache_path=None,
            compile_timeout_s=compile_timeout,
            repeats=5,
        )
        print(
            f"{'op':<14}" + "".join(f"{c:>12}" for c in ("eager", "compile", "triton", "liger")) + "   choice"
        )
        for op, sel in selections.items():
            eager = sel.times.get("eager")
            cells = []
            for cand in ("eager", "compile", "triton", "liger"):
                t = sel.times.get(cand)
                cells.append(f"{t * 1e3:9.3f}ms" if t else f"{'-':>11}")
                if t:
                    row("kernels", op, cand, t * 1e3, "ms", f"{eager / t:.3f}x eager" if eager else "")
            print(f"{op:<14}" + " ".join(cells) + f"   {sel.choice}")
            for cand, why in sel.skipped.items():
                print(f"    {cand}: {why}")
        if "train" in sections:
            from optrun.runtime.lm.base import adamw
            from optrun.runtime.lm.base import autocast as amp

            for label, choices in (
                ("eager", "eager"),
                ("selected", {op: s.choice for op, s in selections.items()}),
            ):
                m = build(dims, layers, dtype, device)
                patch_model(m, choices)
                opt = adamw(m, 1e-5)

                def step(m: Any = m, opt: Any = opt) -> None:
                    opt.zero_grad(set_to_none=True)
                    with amp(device, dtype):
                        m.loss(x, y).backward()
                    opt.step()

                reset(device)
                t = measure(step, device, warmup=2, repeats=5)
                tps = batch * seq / t.median
                print(f"train {label:<9} {tps:12.0f} tokens/s   peak {peak(device):9.0f} MiB")
                row("train", "step", label, tps, "tokens/s", f"peak {peak(device):.0f} MiB")
                del m, opt
        del model

    if "decode" in sections:
        from optrun.runtime.compression.quantized_linear import model_weight_bytes, quantize_model
        from optrun.runtime.kvcache.generate import generate

        base = build(dims, layers, dtype, device)
        prompt = x[:1, :64]
        variants = {"bf16" if dtype == torch.bfloat16 else "fp32": base}
        for codec in ("int8", "int4"):
            variants[codec] = quantize_model(base, codec, 1.0)[0]
        for name, m in variants.items():
            reset(device)
            t = measure(
                lambda m=m: generate(
                    m, prompt, 32, eos_id=None, cache_dtype="bf16" if dtype == torch.bfloat16 else "fp32"
                ),
                device,
                warmup=1,
                repeats=3,
            )
            tps = 32 / t.median
            mib = model_weight_bytes(m) / 2**20
            print(f"decode {name:<6} {tps:10.1f} tokens/s   weights {mib:9.1f} MiB")
            row("decode", "greedy-32", name, tps, "tokens/s", f"weights {mib:.1f} MiB")
        del variants, base

    if "kvcache" in sections:
        from optrun.runtime.kvcache.cache import cache_bytes, largest_batch, make_cache

        model = build(dims, layers, dtype, device)
        context = 512 if quick else 4096
        ref = "bf16" if dtype == torch.bfloat16 else "fp32"
        budget = cache_bytes(model.cfg, 8, context, ref)  # what 8 sequences of the full-precision cache take
        for cache_dtype in (ref, "int8"):
            b = largest_batch(model.cfg, context, cache_dtype, budget)
            prompt = torch.randint(0, dims["vocab_size"], (b, context - 16), generator=gen).to(device)
            cache = make_cache(model.cfg, b, context, cache_dtype, device)
            with torch.no_grad():
                first = model(prompt, cache, 0)[:, -1].argmax(-1)

            def decode(cache: Any = cache, first: Any = first, p: int = context - 16) -> None:
                tok = first
                with torch.no_grad():
                    for i in range(16):
                        tok = model(tok[:, None], cache, p + i)[:, -1].argmax(-1)

            t = measure(decode, device, warmup=1, repeats=3)
            tps = b * 16 / t.median
            print(
                f"kv {cache_dtype:<5} batch {b:4d} in {budget / 2**20:.0f} MiB at {context} tokens: {tps:10.1f} tokens/s"
            )
            row("kvcache", f"ctx{context}-budget{budget}", cache_dtype, tps, "tokens/s", f"batch {b}")
            del cache, prompt
        synchronize(device)

    print(f"{rows} rows appended to {args.csv} ({time.process_time():.0f}s CPU)")
    # A compile candidate abandoned at its bound still runs in a (non-daemon) thread, and the
    # interpreter would wait for it at exit, spending the step's bounded time on nothing: every
    # row is on disk, so leave without it.
    abandoned = [t for t in threading.enumerate() if t.name == "optrun-compile" and t.is_alive()]
    if abandoned:
        print(f"not waiting for {len(abandoned)} abandoned torch.compile candidate(s)", flush=True)
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
