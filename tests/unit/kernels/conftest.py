"""The kernel tests run the Triton kernels on the CPU in Triton's interpreter.

The kernels decide per launch whether to interpret (optrun.runtime.kernels.ops._launch), so
setting TRITON_INTERPRET for these tests alone is enough, whatever was imported before; the
selection cache goes to a temporary directory, never to the user's ~/.cache.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("OPTRUN_CACHE", str(tmp_path / "cache"))
