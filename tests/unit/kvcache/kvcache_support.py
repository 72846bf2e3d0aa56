"""Models and data for the kv-cache tests (imported by conftest.py and the test modules; a
uniquely named module, since several test folders have a conftest.py).

The acceptance tests judge the cache on the trained model, whose next-token distributions are
peaked; a fresh model's are nearly flat, so its greedy choices are near-ties that any rounding
flips. Both are used: parity must hold on either, agreement rates are stated for the trained one.
"""

from __future__ import annotations

import functools

import torch

from optrun.runtime.data import Corpus
from optrun.runtime.model import TinyLM, build_model

TRAIN_STEPS = 80


@functools.cache
def corpus() -> Corpus:
    return Corpus.build("pydoc")


def fresh_model(seed: int = 0) -> TinyLM:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model("tiny-lm")


@functools.cache
def trained_state() -> dict[str, torch.Tensor]:
    model = fresh_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(TRAIN_STEPS):
        x, y = corpus().batch("train", 64, 16, gen)
        loss = model.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
