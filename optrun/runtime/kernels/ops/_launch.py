"""Where a Triton kernel runs: compiled on a CUDA device, in Triton's interpreter on a CPU.

`triton.jit` decides between compiling and interpreting once, when the module is imported,
from `TRITON_INTERPRET`. That would tie every kernel in the process to one mode: the CPU
tests (interpreted) and the GPU tests (native) could not share a test run, and the outcome
would depend on which test imported the ops first. `kernel` defers the decision to each
launch and makes it from the tensors' device: CUDA tensors get the compiled kernel, CPU
tensors get the interpreter, which is allowed only when `TRITON_INTERPRET=1` says the caller
asked for it (tests, debugging): on a CPU the interpreter is a correctness tool, never a
speed candidate.

Triton's own library functions (`tl.sum`, `tl.sigmoid`, ...) are `@triton.jit` functions too,
built in one mode when triton is imported. An interpreted launch therefore runs with
`JITFunction.__call__` routed to the interpreter for its duration (under a lock: the
interpreter patches `triton.language` globally while it runs, and is not thread-safe anyway).
The compiler never goes through `__call__`, so native launches are unaffected.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

_TRUE = ("1", "true", "on", "yes")


class TritonUnavailableError(RuntimeError):
    """A Triton kernel was asked to run where it cannot."""


def interpreter_enabled() -> bool:
    """Whether TRITON_INTERPRET asks for Triton's interpreter (read at each launch)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def triton_runs_on(device: torch.device) -> bool:
    """Whether a Triton kernel can run on `device`: natively on CUDA, interpreted on a CPU on request."""
    return device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())


class Kernel:
    """A Triton kernel function, compiled or interpreted per launch: `k[grid](*args, **meta)`."""

    def __init__(self, fn: Callable[..., None]) -> None:
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._compiled: JITFunction[Any] | None = None
        self._interpreted: InterpretedFunction[Any] | None = None

    def __getitem__(
        self, grid: Sequence[int] | Callable[[dict[str, Any]], Sequence[int]]
    ) -> Callable[..., Any]:
        def launch(*args: Any, **kwargs: Any) -> Any:
            fn = self._for(_device_of(args))
            if isinstance(fn, JITFunction):
                return fn[grid](*args, **kwargs)
            with _interpreting():
                return fn[grid](*args, **kwargs)

        return launch

    def _for(self, device: torch.device) -> Any:
        if device.type == "cuda":
            if self._compiled is None:
                self._compiled = JITFunction(self.fn)
            return self._compiled
        if device.type == "cpu" and interpreter_enabled():
            if self._interpreted is None:
                self._interpreted = InterpretedFunction(self.fn)
            return self._interpreted
        raise TritonUnavailableError(
            f"Triton kernel {self.fn.__name__} needs a CUDA device, got {device.type}; set TRITON_INTERPRET=1 to "
            "run it in Triton's interpreter on a CPU (correctness tests only, far slower than eager)"
        )


_INTERPRETER_LOCK = threading.RLock()
_INTERPRETED_LIBRARY: dict[Callable[..., Any], InterpretedFunction[Any]] = {}


@contextlib.contextmanager
def _interpreting() -> Iterator[None]:
    """Route calls of compiled-mode `@triton.jit` library functions to the interpreter."""
    with _INTERPRETER_LOCK:
        original = JITFunction.__call__

        def call(self: JITFunction[Any], *args: Any, **kwargs: Any) -> Any:
            fn = _INTERPRETED_LIBRARY.get(self.fn)
            if fn is None:
                fn = _INTERPRETED_LIBRARY[self.fn] = InterpretedFunction(self.fn)
            return fn(*args, **kwargs)

        JITFunction.__call__ = call  # type: ignore[method-assign]
        try:
            yield
        finally:
            JITFunction.__call__ = original  # type: ignore[method-assign]


def kernel(fn: Callable[..., None]) -> Kernel:
    """Decorator for a Triton kernel (the body is ordinary `triton.language` code)."""
    return Kernel(fn)


def _device_of(args: Sequence[Any]) -> torch.device:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    raise TypeError("a Triton kernel launch needs at least one tensor argument")
