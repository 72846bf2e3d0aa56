"""Fixtures of the CLI tests.

`optrun.cli.main` configures logging for a whole process (basicConfig, the root level); the
tests call it in-process, so each test gets the root logger back as it found it. Torch runs on
one thread, as in the runtime tests: on a busy 2-core machine two OpenMP threads spin against
each other and the tiny model's steps get many times slower.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    root.setLevel(level)
    root.handlers[:] = handlers


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
