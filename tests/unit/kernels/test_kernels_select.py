"""Kernel selection on a CPU: eager and torch.compile are the candidates, Triton is recorded as
not one (with why), the choice is the fastest measured, and results are cached per device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from triton.runtime.errors import OutOfResources

from optrun.runtime.kernels.ops._launch import TritonUnavailableError
from optrun.runtime.kernels.select import (
    Selection,
    _try,
    cache_file,
    select_kernels,
    wait_for_background_compiles,
)
from optrun.runtime.model import build_model

CPU = torch.device("cpu")


def tiny_and_run() -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    model = build_model("tiny-lm")
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 256, (2, 16), generator=gen), torch.randint(0, 256, (2, 16), generator=gen)
    return model, lambda: model.loss(x, y)


def test_auto_on_cpu_measures_eager_and_records_why_triton_is_no_candidate(tmp_path: Path) -> None:
    model, run = tiny_and_run()
    sel = select_kernels(
        model,
        run,
        device=CPU,
        device_name="test-cpu",
        cache_path=tmp_path / "c.json",
        compile_timeout_s=0,
        repeats=2,
        warmup=1,
    )
    assert set(sel) == {"rms_norm", "rope", "swiglu", "cross_entropy"}
    for s in sel.values():
        assert s.choice == "eager" and s.times["eager"] > 0
        assert set(s.times) == {"eager"}
        assert "CPU interpreter is for tests" in s.skipped["triton"]
        assert s.skipped["compile"] == "not tried: compile_timeout_s is 0"
    assert sel["rope"].signature == "RotaryEmbedding(float32[2, 4, 16, 32], float32[2, 4, 16, 32], 0)"
    assert sel["cross_entropy"].path == "loss_fn"
    assert all(p.grad is None for p in model.parameters())  # measuring never touches the model's grads


def test_second_selection_on_the_same_device_comes_from_the_cache(tmp_path: Path) -> None:
    model, run = tiny_and_run()
    path = tmp_path / "c.json"
    first = select_kernels(
        model,
        run,
        device=CPU,
        device_name="test-cpu",
        cache_path=path,
        compile_timeout_s=0,
        repeats=2,
        warmup=1,
    )
    entries = json.loads(path.read_text())["entries"]
    assert len(entries) == 4 and all("test-cpu" in k for k in entries)
    again = select_kernels(
        model, run, device=CPU, device_name="test-cpu", cache_path=path, compile_timeout_s=0
    )
    assert all(s.cached for s in again.values())
    assert {op: (s.choice, s.times) for op, s in again.items()} == {
        op: (s.choice, s.times) for op, s in first.items()
    }
    other = select_kernels(
        model,
        run,
        device=CPU,
        device_name="another-cpu",
        cache_path=path,
        compile_timeout_s=0,
        repeats=2,
        warmup=1,
    )
    assert not any(s.cached for s in other.values())  # cached per device name


def test_cache_lives_under_optrun_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OPTRUN_CACHE", str(tmp_path))
    assert cache_file() == tmp_path / "kernels" / "selection.json"


@pytest.mark.slow  # compiles four operations with Inductor's C++ backend
def test_compile_candidate_is_timed_and_parity_checked_when_it_compiles_in_time(tmp_path: Path) -> None:
    model, run = tiny_and_run()
    sel = select_kernels(
        model,
        run,
        device=CPU,
        device_name="test-cpu",
        cache_path=None,
        compile_timeout_s=120,
        repeats=2,
        warmup=1,
    )
    for s in sel.values():
        assert set(s.times) == {"eager", "compile"}, s.skipped
        assert s.choice == min(s.times, key=s.times.__getitem__)


def test_compile_that_overruns_its_bound_is_skipped_with_the_reason(tmp_path: Path) -> None:
    model, run = tiny_and_run()
    try:
        sel = select_kernels(
            model,
            run,
            device=CPU,
            device_name="test-cpu",
            cache_path=None,
            compile_timeout_s=1e-6,
            repeats=2,
            warmup=1,
        )
    finally:
        wait_for_background_compiles()
    reasons = [s.skipped["compile"] for s in sel.values()]
    assert reasons[0] == "did not finish compiling within 1e-06s"
    assert all("did not finish compiling within 1e-06s" in r for r in reasons[1:])
    assert all(s.choice == "eager" for s in sel.values())


def test_a_triton_candidate_that_fails_to_compile_is_skipped_with_the_reason() -> None:
    # Natively a kernel can fail to compile for a shape or GPU (shared memory, registers); Triton's
    # errors are not RuntimeErrors, yet the candidate must be skipped, not end the selection.
    sel = Selection("rms_norm", "norm", "RMSNorm(...)", "eager")

    def step() -> None:
        raise OutOfResources(300_000, 232_448, "shared memory")

    assert _try(sel, "triton", step, ([], ()), None, CPU, 1, 1, None) is None  # type: ignore[arg-type]
    assert sel.skipped["triton"].startswith("failed: OutOfResources: out of resource: shared memory")
    assert sel.times == {}


def test_a_candidate_that_runs_out_of_memory_is_skipped_with_the_reason() -> None:
    """Out of memory in a candidate's first run, or while it is timed (autotuning, repeated
    launches): that candidate is skipped and says so; selection goes on with the others."""
    reference = ([torch.ones(4)], (torch.ones(4),))
    sel = Selection("swiglu", "ffn", "SwiGLU(...)", "eager")

    def never_fits() -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

    assert _try(sel, "triton", never_fits, reference, None, CPU, 1, 2, None) is None  # type: ignore[arg-type]
    assert sel.skipped["triton"] == "out of memory: CUDA out of memory. Tried to allocate 3.00 GiB"

    calls = []

    def fits_once() -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
        calls.append(1)
        if len(calls) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory while autotuning")
        return reference

    assert _try(sel, "liger", fits_once, reference, None, CPU, 1, 2, None) is None
    assert sel.skipped["liger"] == "out of memory while timing: CUDA out of memory while autotuning"
    assert sel.times == {}


def test_forced_modes_choose_without_measuring() -> None:
    model, run = tiny_and_run()
    sel = select_kernels(model, run, device=CPU, device_name="test-cpu", mode="triton", cache_path=None)
    assert {s.choice for s in sel.values()} == {"triton"}
    assert all(s.times == {} and s.skipped == {"*": "forced by mode=triton"} for s in sel.values())


def test_forcing_triton_on_a_cpu_without_the_interpreter_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    model, run = tiny_and_run()
    with pytest.raises(TritonUnavailableError, match=r"kernels\.mode: triton needs a CUDA device"):
        select_kernels(model, run, device=CPU, device_name="test-cpu", mode="triton", cache_path=None)


def test_unknown_mode_is_refused_with_the_allowed_values() -> None:
    model, run = tiny_and_run()
    with pytest.raises(
        ValueError, match="mode: unknown kernel mode 'fast'; allowed: auto, triton, liger, compile, eager"
    ):
        select_kernels(model, run, device=CPU, device_name="test-cpu", mode="fast")
