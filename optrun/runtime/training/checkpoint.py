"""Checkpoints: model, optimizer, scheduler, RNG states and data position, saved together.

Written atomically (temp file, fsync, rename, fsync of the directory), so a crash mid-write
leaves the previous checkpoint intact and never a torn file; the newest `keep` are kept. A
resumed run loads the newest checkpoint that loads completely and continues exactly: on a CPU
it ends bitwise equal to an uninterrupted run (tests/unit/runtime/test_checkpoint.py).
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d{9})\.pt$")


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointStore:
    """A directory of `step-NNNNNNNNN.pt` files, newest last."""

    def __init__(self, directory: Path, keep: int) -> None:
        self.directory = Path(directory)
        self.keep = keep
        self.directory.mkdir(parents=True, exist_ok=True)

    def paths(self) -> list[Path]:
        found = [p for p in self.directory.iterdir() if _NAME.match(p.name)]
        return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))  # type: ignore[union-attr]

    def save(self, step: int, state: dict[str, Any]) -> Path:
        target = self.directory / f"step-{step:09d}.pt"
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself must survive a crash
        finally:
            os.close(dir_fd)
        for old in self.paths()[: -self.keep]:
            old.unlink(missing_ok=True)
        return target

    def latest(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that loads; unreadable ones are skipped with a warning."""
        for path in reversed(self.paths()):
            try:
                return path, torch.load(path, map_location="cpu", weights_only=False)
            except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
                log.warning("checkpoint %s is unreadable (%s); trying an older one", path, exc)
        return None
