"""Checkpoints: model, optimizer, scheduler, RNG states and data position, saved together.

One checkpoint is a directory `step-NNNNNNNNN/`: the model's and the optimizer's tensors as a
torch.distributed.checkpoint (DCP) save, sharded (every rank writes its own shards, `.metadata`
describes the global tensors), and `meta.pt` with everything else (scheduler, gradient scaler,
RNG states, data position, history, recovery bookkeeping). Tensors are saved under their
model-level names (`get_model_state_dict` / `get_optimizer_state_dict`), never a wrapper's, so
a checkpoint of one world size and strategy loads into another: 2 ranks -> 1 process and 1
process -> 2 ranks, under DDP and under FSDP (DCP reshards on load; tests/unit/distributed).

Atomic: the ranks write `.tmp-step-NNNNNNNNN/`, rank 0 adds meta.pt last (fsync), renames the
directory into place and fsyncs the parent, so a checkpoint either exists whole or not at all;
a leftover temporary directory is never loaded. The newest `keep` are kept. A resumed run loads
the newest complete checkpoint and continues exactly: on a CPU it ends bitwise equal to an
uninterrupted one at the same world size (tests/unit/runtime/test_runtime_resume.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import random
import re
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d{9})$")
META = "meta.pt"


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


@dataclass
class Checkpoint:
    """A complete checkpoint: its directory, its step and its metadata (no tensors loaded yet)."""

    path: Path
    step: int
    meta: dict[str, Any]


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # DCP warns on every call of a one-process run that it "assumes the intent" is one process.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


class CheckpointStore:
    """A directory of `step-NNNNNNNNN/` checkpoints, newest last (see the module doc). Saving,
    finding the latest and restoring are collective when a process group exists: every rank
    calls them."""

    def __init__(self, directory: Path, keep: int) -> None:
        self.directory = Path(directory)
        self.keep = keep
        self.directory.mkdir(parents=True, exist_ok=True)

    def paths(self) -> list[Path]:
        found = [p for p in self.directory.iterdir() if p.is_dir() and _NAME.match(p.name)]
        return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))  # type: ignore[union-attr]

    def save(
        self, step: int, meta: dict[str, Any], *, model: nn.Module | None = None, optimizer: Any = None
    ) -> Path:
        """Write a checkpoint of `model` and `optimizer` (their tensors, by DCP) and `meta`. An
        optimizer that has taken no step has no state and is not written (restoring then leaves
        a fresh optimizer: what a run at that step had)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        target = self.directory / f"step-{step:09d}"
        tmp = self.directory / f".tmp-step-{step:09d}"
        if _rank() == 0 and tmp.exists():
            shutil.rmtree(tmp)
        _barrier()
        tensors: dict[str, Any] = {}
        if model is not None:
            tensors["model"] = get_model_state_dict(model)
        with_optimizer = optimizer is not None and bool(optimizer.state)
        if with_optimizer:
            tensors["optimizer"] = get_optimizer_state_dict(model, optimizer)
        try:
            if tensors:
                with _quiet():
                    dcp.save(tensors, checkpoint_id=str(tmp))
            if _rank() == 0:
                tmp.mkdir(parents=True, exist_ok=True)
                meta = {**meta, "saved": sorted(tensors)}
                with (tmp / META).open("wb") as f:
                    torch.save(meta, f)  # last: a directory with meta.pt is complete
                    f.flush()
                    os.fsync(f.fileno())
                if target.exists():
                    shutil.rmtree(target)
                os.replace(tmp, target)
                _fsync_dir(self.directory)  # the rename itself must survive a crash
                for old in self.paths()[: -self.keep]:
                    shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            if _rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        _barrier()
        return target

    def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint; unreadable ones are skipped with a warning.

        Collective when a process group exists: rank 0 chooses and broadcasts its choice, so
        every rank loads the same checkpoint even where their listings of a shared network
        volume differ (one rank's cache still missing the newest rename, or still showing one
        that was pruned)."""
        if not dist.is_initialized():
            return self.latest_here()
        choice = [self.latest_here() if _rank() == 0 else None]
        dist.broadcast_object_list(choice, src=0)
        return choice[0]

    def latest_here(self) -> Checkpoint | None:
        """The newest complete checkpoint as this process sees the directory (no collective)."""
        for path in reversed(self.paths()):
            try:
                meta = torch.load(path / META, map_location="cpu", weights_only=False)
                if "model" in meta.get("saved", []) and not (path / ".metadata").exists():
                    raise ValueError("no .metadata (the tensors were never completely written)")
                return Checkpoint(path, int(_NAME.match(path.name).group(1)), meta)  # type: ignore[union-attr]
            except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
                log.warning("checkpoint %s is unreadable (%s); trying an older one", path, exc)
        return None

    def restore(self, ckpt: Checkpoint, model: nn.Module, optimizer: Any = None) -> None:
        """Load the checkpoint's tensors into `model` (and `optimizer`) in place, resharded to
        this process's layout; an optimizer the checkpoint holds no state for is reset."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        saved = ckpt.meta.get("saved", [])
        state: dict[str, Any] = {"model": get_model_state_dict(model)}
        if optimizer is not None and "optimizer" in saved:
            state["optimizer"] = get_optimizer_state_dict(model, optimizer)
        with _quiet():
            dcp.load(state, checkpoint_id=str(ckpt.path))
        set_model_state_dict(model, state["model"])
        if optimizer is None:
            return
        if "optimizer" in state:
            set_optimizer_state_dict(model, optimizer, state["optimizer"])
        else:
            optimizer.state.clear()

    def update_meta(self, ckpt: Checkpoint, **changes: Any) -> None:
        """Rewrite part of a checkpoint's metadata, atomically, from this process alone: no
        collective, since a rank that crashed alone calls it while the others wait elsewhere.
        Ranks writing at once each replace the whole file (a temporary file of their own)."""
        meta = {**ckpt.meta, **changes}
        tmp = ckpt.path / f".{META}.tmp-{os.getpid()}"
        with tmp.open("wb") as f:
            torch.save(meta, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, ckpt.path / META)
        ckpt.meta = meta
