"""Fixtures of the kv-cache tests: the built-in tiny-lm, fresh and briefly trained (see kvcache_support)."""

from __future__ import annotations

import pytest
from kvcache_support import fresh_model, trained_state
from torch import nn


@pytest.fixture
def trained_model() -> nn.Module:
    model = fresh_model(0)
    model.load_state_dict(trained_state())
    return model.eval()


@pytest.fixture
def model() -> nn.Module:
    return fresh_model(0).eval()
