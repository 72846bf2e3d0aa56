"""Fixtures of the operator's unit tests; the builders of their inputs are in helpers.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from optrun.operator.config import OperatorConfig
from tests.unit.operator.helpers import config, pod_body


@pytest.fixture
def cfg() -> OperatorConfig:
    return config()


@pytest.fixture
def pod(cfg: OperatorConfig) -> Callable[..., dict[str, Any]]:
    """pod(attempt, state, **kw): the pod of `attempt` as a kubelet reports it in `state`."""

    def make(attempt: int, state: str = "pending", **kw: Any) -> dict[str, Any]:
        return pod_body(cfg, attempt, state, **kw)

    return make
