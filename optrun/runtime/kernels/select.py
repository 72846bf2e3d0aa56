"""Kernel selection: per operation and shape, measure the candidates on the device and keep the
fastest one that computes the same thing.

Candidates are `triton` (optrun's fused kernels), `liger` (Liger-Kernel's, when installed),
`compile` (torch.compile of the layer's own forward) and `eager`. Each is timed forward + backward on the inputs the model really gives
that layer (captured with a hook during one forward on a sample batch, so shapes, dtypes,
strides and autocast are those of the run), with `optrun.runtime.timing.measure`. A candidate
whose outputs or gradients differ from eager beyond `parity.MODEL_TOLERANCE` is rejected, with
the place where it differs as the reason. Nothing is chosen by assumption; what could not be
measured is recorded with why:
- on a CPU, Triton (optrun's kernels and Liger's) is not a candidate: it runs there only in its interpreter, a correctness
  tool (the kernels' CPU tests use it) that is orders of magnitude slower than eager;
- torch.compile must compile within `compile_timeout_s` (by default 2 s on a CPU, where
  Inductor's C++ toolchain takes several seconds even warm, and the quickstart's whole budget
  is minutes; 300 s on a GPU; 0 leaves compile out). A compile that overruns is abandoned (it
  finishes in a background thread, which later timing waits for) and compile is not tried
  again in this selection.

Results are cached in a JSON file per (device name, operation, input signature, autocast dtype,
torch and triton versions), under `$OPTRUN_CACHE/kernels/` or `~/.cache/optrun/kernels/`, so a
second run on the same machine starts at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import triton
from torch import Tensor, nn

from optrun.runtime.kernels import liger
from optrun.runtime.kernels.ops._launch import TritonUnavailableError, triton_runs_on
from optrun.runtime.kernels.parity import MODEL_TOLERANCE, Mismatch, compare, tolerance
from optrun.runtime.kernels.patcher import CHOICES, Binding, compiled_forward, find_ops
from optrun.runtime.timing import measure

log = logging.getLogger(__name__)

MODES = ("auto", *CHOICES)
_KIND_NAMES = {"triton": "optrun's Triton kernels", "liger": "Liger-Kernel's Triton kernels"}
CACHE_VERSION = 1


def default_compile_timeout(device: torch.device) -> float:
    """Seconds a torch.compile candidate may take to compile (see the module docstring)."""
    return 300.0 if device.type == "cuda" else 2.0


def cache_file() -> Path:
    """The selection cache: $OPTRUN_CACHE/kernels/selection.json, else ~/.cache/optrun/kernels/."""
    root = os.environ.get("OPTRUN_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "optrun"
    return base / "kernels" / "selection.json"


@dataclass
class Selection:
    """The outcome for one operation: the choice, each candidate's median seconds (forward +
    backward), and why a candidate was not measured or not kept."""

    op: str
    path: str  # the first module of this operation, whose inputs were measured
    signature: str  # shapes and dtypes of its inputs
    choice: str
    times: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    cached: bool = False
    mode: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Sample:
    path: str
    module: nn.Module
    binding: Binding
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    @property
    def signature(self) -> str:
        def sig(a: Any) -> str:
            if isinstance(a, Tensor):
                return f"{str(a.dtype).removeprefix('torch.')}{list(a.shape)}"
            return repr(a)

        parts = [sig(a) for a in self.args] + [f"{k}={sig(v)}" for k, v in sorted(self.kwargs.items())]
        return f"{type(self.module).__name__}(" + ", ".join(parts) + ")"


def _clone(a: Any) -> Any:
    return a.detach().clone() if isinstance(a, Tensor) else a


def capture(
    model: nn.Module, run: Callable[[], object], mapping: Mapping[type[nn.Module], Binding] | None = None
) -> dict[str, _Sample]:
    """The inputs of the first module of each operation during `run()` (one forward, no grad)."""
    samples: dict[str, _Sample] = {}
    handles = []
    seen: set[str] = set()
    for path, (module, binding) in find_ops(model, mapping).items():
        if binding.op in seen:
            continue
        seen.add(binding.op)

        def hook(
            mod: nn.Module,
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
            *,
            _p: str = path,
            _b: Binding = binding,
        ) -> None:
            if _b.op not in samples:
                samples[_b.op] = _Sample(
                    _p, mod, _b, tuple(_clone(a) for a in args), {k: _clone(v) for k, v in kwargs.items()}
                )

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return samples


def _flat_tensors(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, tuple | list):
        return [t for o in out for t in _flat_tensors(o)]
    return []


class _Step:
    """Forward + backward of one candidate on a sample's inputs; gradients go to fresh leaves and
    are returned (torch.autograd.grad), so the model's own .grad stays untouched."""

    def __init__(
        self,
        fn: Callable[..., Any],
        sample: _Sample,
        params: list[nn.Parameter],
        autocast: Callable[[], contextlib.AbstractContextManager[Any]],
    ) -> None:
        self.fn, self.sample, self.params, self.autocast = fn, sample, params, autocast
        self.args = [
            a.requires_grad_() if isinstance(a, Tensor) and a.is_floating_point() else a
            for a in (_clone(a) for a in sample.args)
        ]
        self.leaves = [a for a in self.args if isinstance(a, Tensor) and a.requires_grad] + list(params)
        self.grad_out: list[Tensor] | None = None

    def __call__(self) -> tuple[list[Tensor], tuple[Tensor | None, ...]]:
        with self.autocast():
            out = self.fn(*self.args, **self.sample.kwargs)
        outs = [o for o in _flat_tensors(out) if o.requires_grad]
        if self.grad_out is None:  # fixed per sample, so every candidate sees the same upstream gradient
            gen = torch.Generator(device=outs[0].device).manual_seed(0)
            self.grad_out = [
                torch.ones_like(o)
                if o.dim() == 0
                else torch.randn(o.shape, generator=gen, device=o.device, dtype=o.dtype)
                for o in outs
            ]
        grads = torch.autograd.grad(outs, self.leaves, self.grad_out, allow_unused=True)
        return [o.detach() for o in outs], grads


def _parity(
    candidate: tuple[list[Tensor], tuple[Tensor | None, ...]],
    reference: tuple[list[Tensor], tuple[Tensor | None, ...]],
    dtype: torch.dtype,
) -> Mismatch | None:
    tol = tolerance(dtype, MODEL_TOLERANCE)
    for i, (a, e) in enumerate(zip(candidate[0], reference[0], strict=True)):
        if (m := compare(a, e, tol, f"output {i}")) is not None:
            return m
    for i, (a, e) in enumerate(zip(candidate[1], reference[1], strict=True)):
        if a is None or e is None:
            continue
        if (m := compare(a, e, tol, f"gradient {i}")) is not None:
            return m
    return None


def _params(sample: _Sample) -> list[nn.Parameter]:
    return [p for p in sample.module.parameters() if p.requires_grad]


def _try(
    sel: Selection,
    name: str,
    step: _Step,
    reference: tuple[list[Tensor], tuple[Tensor | None, ...]],
    autocast_dtype: torch.dtype | None,
    device: torch.device,
    warmup: int,
    repeats: int,
    timeout: float | None,
) -> str | None:
    """Run a candidate once (within `timeout` when given), check parity, time it into `sel`.
    Returns why later candidates of this kind should not be tried (an overrun or a crash), or None."""
    if timeout is not None:
        status, got = _within(step, timeout)
        if status == "timeout":
            sel.skipped[name] = f"did not finish compiling within {timeout:g}s"
            return f"an earlier {name} candidate did not finish compiling within {timeout:g}s"
        if status == "error":
            sel.skipped[name] = f"failed: {type(got).__name__}: {got}"
            return f"an earlier {name} candidate failed: {type(got).__name__}"
    else:
        try:
            got = step()
        except torch.OutOfMemoryError as exc:  # this candidate does not fit; the others may
            _free(device)
            sel.skipped[name] = f"out of memory: {exc}"
            return None
        # Triton's own errors (a kernel that fails to compile for this shape or GPU, runs out of
        # shared memory or registers: CompilationError, OutOfResources, PTXASError) are not
        # RuntimeErrors; they only occur natively, and must skip the candidate, not end the run.
        except (RuntimeError, ValueError, AssertionError, triton.TritonError) as exc:
            sel.skipped[name] = f"failed: {type(exc).__name__}: {exc}"
            return None
    mismatch = _parity(got, reference, autocast_dtype or reference[0][0].dtype)
    if mismatch is not None:
        sel.skipped[name] = f"parity: {mismatch}"
        return None
    try:
        sel.times[name] = measure(step, device, warmup=warmup, repeats=repeats).median
    except torch.OutOfMemoryError as exc:  # timing runs it again and again (autotuning, caches)
        _free(device)
        sel.skipped[name] = f"out of memory while timing: {exc}"
    return None


def _free(device: torch.device) -> None:
    """After an out-of-memory error: hand the cached blocks back before the next candidate."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _within(fn: Callable[[], Any], timeout: float) -> tuple[str, Any]:
    """Run fn in a worker thread for at most `timeout` seconds: ("ok", result), ("error", exc) or
    ("timeout", None). A timed-out call keeps running in the background until it finishes; the
    thread is not a daemon, so the process waits for it at exit instead of aborting a compile
    half-way (which kills the interpreter from inside Inductor's C++ workers)."""
    box: dict[str, Any] = {}

    def work() -> None:
        started = time.monotonic()
        try:
            box["ok"] = fn()
        except Exception as exc:  # reported as the candidate's skip reason
            box["error"] = exc
        box["seconds"] = time.monotonic() - started

    worker = threading.Thread(target=work, name="optrun-compile", daemon=False)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        _BACKGROUND.append(worker)
        return "timeout", None
    # join() can return late (the GIL): the call's own duration decides whether it was in time.
    if box["seconds"] > timeout:
        return "timeout", None
    return ("ok", box["ok"]) if "ok" in box else ("error", box["error"])


# Compiles that overran their bound and still run; timing code waits for them (see below).
_BACKGROUND: list[threading.Thread] = []


def wait_for_background_compiles(timeout: float = 120.0) -> float:
    """Wait (at most `timeout` seconds) for abandoned compile candidates to finish, so they do not
    compete with later timing on the same cores; returns the seconds waited."""
    started = time.monotonic()
    while _BACKGROUND:
        left = timeout - (time.monotonic() - started)
        if left <= 0:
            break
        _BACKGROUND[0].join(left)
        if not _BACKGROUND[0].is_alive():
            _BACKGROUND.pop(0)
    waited = time.monotonic() - started
    if waited > 0.01:
        log.info("waited %.1fs for abandoned torch.compile candidates to finish", waited)
    return waited


class _Cache:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, Any] = {}
        if path is not None and path.exists():
            try:
                doc = json.loads(path.read_text())
                if doc.get("version") == CACHE_VERSION:
                    self.entries = doc.get("entries", {})
            except (OSError, ValueError) as exc:
                log.warning("kernel selection cache %s unreadable, measuring afresh: %s", path, exc)

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(
            json.dumps({"version": CACHE_VERSION, "entries": self.entries}, indent=1, sort_keys=True)
        )
        tmp.replace(self.path)  # atomic: a concurrent reader sees the old file or the new one


def select_kernels(
    model: nn.Module,
    run: Callable[[], object],
    *,
    device: torch.device,
    device_name: str,
    mode: str = "auto",
    autocast_dtype: torch.dtype | None = None,
    mapping: Mapping[type[nn.Module], Binding] | None = None,
    cache_path: Path | None = None,
    refresh: bool = False,
    compile_timeout_s: float | None = None,
    warmup: int = 2,
    repeats: int = 5,
) -> dict[str, Selection]:
    """Choose per operation of `model` among triton, compile and eager.

    run: runs the model once on a representative batch (its inputs to each layer are what is
    measured). mode: auto measures; triton, compile or eager force that choice for every
    operation (triton on a CPU only with TRITON_INTERPRET=1). autocast_dtype: the dtype the run
    trains under autocast with (None: no autocast). cache_path: None disables the cache."""
    if mode not in MODES:
        raise ValueError(f"mode: unknown kernel mode {mode!r}; allowed: {', '.join(MODES)}")
    if mode in ("triton", "liger") and not triton_runs_on(device):
        raise TritonUnavailableError(
            f"spec.optimizations.kernels.mode: {mode} needs a CUDA device, this run is on {device.type}; "
            "use auto, compile or eager, or set TRITON_INTERPRET=1 to run the kernels in Triton's "
            "interpreter (tests only)"
        )
    started = time.monotonic()
    samples = capture(model, run, mapping)
    if mode != "auto":
        return {
            op: Selection(op, s.path, s.signature, mode, skipped={"*": f"forced by mode={mode}"}, mode=mode)
            for op, s in samples.items()
        }

    cache = _Cache(cache_path)
    timeout = default_compile_timeout(device) if compile_timeout_s is None else compile_timeout_s

    @contextlib.contextmanager
    def no_autocast() -> Iterator[None]:
        yield

    def autocast() -> contextlib.AbstractContextManager[Any]:
        if autocast_dtype is None:
            return no_autocast()
        return torch.autocast(device.type, dtype=autocast_dtype)

    # Eager and Triton first for every operation, compile last: a compile that overruns its bound
    # keeps a CPU busy in the background, and must not distort the other measurements.
    pending: list[tuple[str, str, Selection, _Sample, tuple[list[Tensor], tuple[Tensor | None, ...]]]] = []
    results: dict[str, Selection] = {}
    for op, sample in samples.items():
        key = json.dumps(
            [device_name, op, sample.signature, str(autocast_dtype), torch.__version__, triton.__version__]
        )
        if not refresh and key in cache.entries:
            results[op] = Selection(**{**cache.entries[key], "cached": True})
            continue
        sel = Selection(op, sample.path, sample.signature, "eager")
        results[op] = sel
        eager = _Step(sample.module, sample, _params(sample), autocast)
        reference = eager()
        sel.times["eager"] = measure(eager, device, warmup=warmup, repeats=repeats).median
        for kind in ("triton", "liger"):
            usable, why = (True, "") if kind == "triton" else liger.available()
            if device.type != "cuda":
                sel.skipped[kind] = (
                    f"not a candidate on {device.type}: {_KIND_NAMES[kind]} run natively only on CUDA "
                    "(Triton's CPU interpreter is for tests)"
                )
            elif not usable:
                sel.skipped[kind] = why
            else:
                try:
                    fused = sample.binding.fused_module(sample.module, kind)
                except (RuntimeError, ValueError, ImportError) as exc:
                    sel.skipped[kind] = f"failed: {type(exc).__name__}: {exc}"
                    continue
                _try(
                    sel,
                    kind,
                    _Step(fused, sample, _params(sample), autocast),
                    reference,
                    autocast_dtype,
                    device,
                    warmup,
                    repeats,
                    None,
                )
        pending.append((op, key, sel, sample, reference))

    compile_failed: str | None = None  # once compile has proved unusable, it is not tried again
    for _op, key, sel, sample, reference in pending:
        if timeout <= 0:
            sel.skipped["compile"] = "not tried: compile_timeout_s is 0"
        elif compile_failed is not None:
            sel.skipped["compile"] = compile_failed
        else:
            fwd = compiled_forward(type(sample.module))
            step = _Step(
                lambda *a, _f=fwd, _m=sample.module, **k: _f(_m, *a, **k), sample, _params(sample), autocast
            )
            compile_failed = _try(
                sel, "compile", step, reference, autocast_dtype, device, warmup, repeats, timeout
            )
        sel.choice = min(sel.times, key=sel.times.__getitem__)
        cache.entries[key] = {k: v for k, v in sel.to_dict().items() if k != "cached"}
        log.info(
            "kernels: %s -> %s %s", sel.op, sel.choice, {k: f"{v * 1e3:.3f}ms" for k, v in sel.times.items()}
        )
    cache.save()
    log.info("kernel selection took %.2fs", time.monotonic() - started)
    return results
