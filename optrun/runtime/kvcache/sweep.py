"""The KV-cache scaling sweep: batch sizes x context lengths x cache dtypes.

For each cell (dtype, batch B, context C) the prompt fills C - N positions and N tokens are
decoded greedily, so the cache ends full at C. Measured per cell:
  - decode tokens/s: B * N / seconds of the N decode steps (prefill excluded: it is timed apart
    as prefill tokens/s, B * (C - N) / seconds), median of repeats (optrun.runtime.timing);
  - cache bytes per token slot and the cache's total bytes for (B, C);
  - peak memory: on CUDA the allocator's peak over one generation (torch.cuda.max_memory_allocated,
    weights excluded), elsewhere the cache's bytes (the only allocation that grows with B x C);
  - the largest batch whose cache for C tokens fits the memory budget (cache bytes are linear
    in the batch, so this is computed, not searched by allocation);
and the ratios of each to the full-precision cache (the model's parameter dtype) at the same cell.
A cell that runs out of memory is skipped with the reason (all dtypes of it when the reference's
does): the edge of what the device holds, reported, never a crashed sweep.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from optrun.runtime.kvcache.cache import (
    CACHE_DTYPES,
    cache_bytes,
    check_dtype,
    fp8_supported,
    largest_batch,
    make_cache,
)
from optrun.runtime.kvcache.generate import model_cache_dtype
from optrun.runtime.timing import measure, synchronize

log = logging.getLogger(__name__)

DEFAULT_NEW_TOKENS = 16


def supported_dtypes(device: torch.device) -> tuple[list[str], dict[str, str]]:
    """Cache dtypes usable on `device`, and the reason for each one left out."""
    ok, skipped = [], {}
    for dtype in CACHE_DTYPES:
        if dtype == "fp8":
            supported, why = fp8_supported(device)
            if not supported:
                skipped[dtype] = why
                continue
        ok.append(dtype)
    return ok, skipped


@torch.no_grad()
def _decode(model: nn.Module, cache: Any, first: Tensor, start: int, steps: int) -> Tensor:
    """`steps` greedy decode steps from token `first` (B,) at position `start`; the last token."""
    tok = first
    for i in range(steps):
        tok = model(tok[:, None], cache, start + i)[:, -1].argmax(-1)
    return tok


def _prompt(tokens: Tensor | None, vocab: int, batch: int, length: int, device: torch.device) -> Tensor:
    """(batch, length) prompt: windows of `tokens` when given (held-out text), else a fixed draw."""
    if tokens is not None and len(tokens) >= length + batch:
        rows = [tokens[i * 7 : i * 7 + length] for i in range(batch)]
        if all(len(r) == length for r in rows):
            return torch.stack(rows).to(device)
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (batch, length), generator=gen).to(device)


def measure_cell(
    model: nn.Module,
    dtype: str,
    batch: int,
    context: int,
    *,
    new_tokens: int,
    prompt_tokens: Tensor | None,
    repeats: int,
    warmup: int,
) -> dict[str, float]:
    """Timings and memory of one (dtype, batch, context) cell; see the module doc."""
    cfg = model.cfg
    device = next(model.parameters()).device
    n = min(new_tokens, context - 1)
    p = context - n
    prompt = _prompt(prompt_tokens, cfg.vocab_size, batch, p, device)
    model.eval()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    cache = make_cache(cfg, batch, context, dtype, device)
    with torch.no_grad():
        first = model(prompt, cache, 0)[:, -1].argmax(-1)
    # Decoding rewrites positions [p, C) each repeat; the prefilled prefix stays as it is.
    decode = measure(lambda: _decode(model, cache, first, p, n), device, warmup=warmup, repeats=repeats)
    if device.type == "cuda":
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = cache.nbytes()

    def prefill() -> None:
        with torch.no_grad():
            model(prompt, make_cache(cfg, batch, context, dtype, device), 0)

    pre = measure(prefill, device, warmup=warmup, repeats=repeats)
    return {
        "tokens_per_second": batch * n / decode.median,
        "tokens_per_second_min": batch * n / decode.max,
        "tokens_per_second_max": batch * n / decode.min,
        "decode_seconds": decode.median,
        "prefill_tokens_per_second": batch * p / pre.median,
        "peak_memory_bytes": int(peak),
        "cache_bytes": cache.nbytes(),
        "bytes_per_token": cache.nbytes() / (batch * context),
    }


def run_sweep(
    model: nn.Module,
    *,
    batch_sizes: Sequence[int],
    context_lengths: Sequence[int],
    dtypes: Sequence[str],
    memory_budget_bytes: int,
    new_tokens: int = DEFAULT_NEW_TOKENS,
    prompt_tokens: Tensor | None = None,
    repeats: int = 3,
    warmup: int = 1,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Measure every cell; returns {"rows": [...], "reference": dtype, "skipped": [...], ...}.

    Contexts longer than the model's max_seq_len are skipped (and listed), as are dtypes the
    device cannot store. Each row carries ratios to the reference (full-precision) cache;
    `on_row` sees each row as soon as it is measured."""
    cfg = model.cfg
    device = next(model.parameters()).device
    for d in dtypes:
        check_dtype(d)
    reference = model_cache_dtype(model)
    usable, unsupported = supported_dtypes(device)
    order = [reference] + [d for d in dtypes if d != reference]
    skipped: list[dict[str, Any]] = [{"dtype": d, "reason": unsupported[d]} for d in order if d not in usable]
    order = [d for d in order if d in usable]
    rows: list[dict[str, Any]] = []
    # One untimed cell first: thread pools, allocator and kernels warm up here, not in cell one.
    fits = [c for c in context_lengths if 2 <= c <= cfg.max_seq_len]
    if fits and order:
        try:
            measure_cell(
                model,
                reference,
                min(batch_sizes),
                min(fits),
                new_tokens=new_tokens,
                prompt_tokens=prompt_tokens,
                repeats=1,
                warmup=1,
            )
        except torch.OutOfMemoryError:  # the cells below say so, one by one
            _free(device)
    for context in context_lengths:
        if context > cfg.max_seq_len or context < 2:
            skipped.append(
                {"context": context, "reason": f"outside the model's 2..{cfg.max_seq_len} positions"}
            )
            continue
        for batch in batch_sizes:
            ref_row: dict[str, Any] | None = None
            for dtype in order:
                try:
                    cell = measure_cell(
                        model,
                        dtype,
                        batch,
                        context,
                        new_tokens=new_tokens,
                        prompt_tokens=prompt_tokens,
                        repeats=repeats,
                        warmup=warmup,
                    )
                except torch.OutOfMemoryError as exc:
                    # The cell does not fit the device: the sweep's edge, reported, not a crash.
                    # Without the reference cell the others have nothing to be a ratio of.
                    _free(device)
                    cell_dtypes = order if dtype == reference else [dtype]
                    skipped += [
                        {"dtype": d, "batch": batch, "context": context, "reason": f"out of memory: {exc}"}
                        for d in cell_dtypes
                    ]
                    log.warning("kv sweep %s B=%d C=%d: out of memory, skipped", dtype, batch, context)
                    if dtype == reference:
                        break
                    continue
                row: dict[str, Any] = {"dtype": dtype, "batch": batch, "context": context, **cell}
                row["largest_batch"] = largest_batch(cfg, context, dtype, memory_budget_bytes)
                if ref_row is None:
                    ref_row = row
                row["ratio_tokens_per_second"] = row["tokens_per_second"] / ref_row["tokens_per_second"]
                row["ratio_bytes_per_token"] = row["bytes_per_token"] / ref_row["bytes_per_token"]
                row["ratio_peak_memory"] = row["peak_memory_bytes"] / max(ref_row["peak_memory_bytes"], 1)
                row["ratio_largest_batch"] = row["largest_batch"] / max(ref_row["largest_batch"], 1)
                log.info(
                    "kv sweep %s B=%d C=%d: %.0f tok/s (%.2fx), %.1f B/token (%.3fx), largest batch %d",
                    dtype,
                    batch,
                    context,
                    row["tokens_per_second"],
                    row["ratio_tokens_per_second"],
                    row["bytes_per_token"],
                    row["ratio_bytes_per_token"],
                    row["largest_batch"],
                )
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    return {
        "reference": reference,
        "dtypes": order,
        "rows": rows,
        "skipped": skipped,
        "memory_budget_bytes": int(memory_budget_bytes),
        "new_tokens": new_tokens,
        "repeats": repeats,
    }


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def allocated_bytes(model_cfg: Any, context: int, dtype: str, device: torch.device | str = "cpu") -> int:
    """Bytes a cache for one sequence of `context` tokens takes when it is allocated: the
    allocator's peak above what was held before on a GPU, the tensors' storage bytes on the CPU
    (which has no allocator statistics)."""
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        cache = make_cache(model_cfg, 1, context, dtype, device)
        synchronize(device)
        used = torch.cuda.max_memory_allocated(device) - before
        del cache
        return int(used)
    cache = make_cache(model_cfg, 1, context, dtype, device)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in cache._tensors.values()}
    return int(sum(storages.values()))


def capacity(
    model_cfg: Any,
    context: int,
    dtypes: Sequence[str],
    budget_bytes: int,
    device: torch.device | str = "cpu",
) -> dict[str, dict[str, float]]:
    """Per dtype: bytes per token slot and largest batch at `context` within `budget_bytes`, from
    a cache allocated on `device` (a cache is linear in the batch, so one sequence's allocation
    says how many fit), and the layout formula's figures beside (`layout_*`)."""
    out = {}
    for d in dtypes:
        per_sequence = allocated_bytes(model_cfg, context, d, device)
        formula = cache_bytes(model_cfg, 1, context, d)
        out[d] = {
            "bytes_per_token": per_sequence / context,
            "largest_batch": int(budget_bytes // per_sequence) if per_sequence else 0,
            "layout_bytes_per_token": formula / context,
            "layout_largest_batch": largest_batch(model_cfg, context, d, budget_bytes),
        }
    return out


def plot(sweep: dict[str, Any], path: Path) -> Path:
    """Two panels: decode tokens/s against batch (one line per dtype and context) and the
    largest batch within the budget per dtype (at the longest context). PNG, Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sweep["rows"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    contexts = sorted({r["context"] for r in rows})
    styles = ["-", "--", ":", "-."]
    for dtype in sweep["dtypes"]:
        for i, c in enumerate(contexts):
            pts = sorted(
                (r["batch"], r["tokens_per_second"])
                for r in rows
                if r["dtype"] == dtype and r["context"] == c
            )
            if pts:
                ax1.plot(*zip(*pts, strict=True), styles[i % len(styles)], marker="o", label=f"{dtype} C={c}")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("batch size")
    ax1.set_ylabel("decode tokens / s")
    ax1.set_title("Decode throughput")
    ax1.legend(fontsize=7, ncol=2)
    if contexts:
        longest = contexts[-1]
        per_dtype = {r["dtype"]: r["largest_batch"] for r in rows if r["context"] == longest}
        ax2.bar(list(per_dtype), list(per_dtype.values()), color="tab:blue")
        for x, (d, v) in enumerate(per_dtype.items()):
            bpt = next(r["bytes_per_token"] for r in rows if r["dtype"] == d and r["context"] == longest)
            ax2.annotate(f"{v}\n{bpt:.0f} B/tok", (x, v), ha="center", va="bottom", fontsize=7)
        budget = sweep["memory_budget_bytes"] / 2**30
        ax2.set_title(f"Largest batch at C={longest} in {budget:.2f} GiB")
        ax2.set_ylabel("sequences")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def default_budget(device: torch.device, memory_bytes: int) -> int:
    """A quarter of the device's memory (host memory on CPU)."""
    if device.type == "cuda":
        memory_bytes = torch.cuda.get_device_properties(device).total_memory
    return max(1, memory_bytes // 4)
