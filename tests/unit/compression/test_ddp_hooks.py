"""The DDP comm hooks in a real one-process gloo group: what each hook hands to DDP as the
averaged gradient, the bytes it counts, the gate and error feedback. (Two processes talking:
test_ddp_gloo.py.)"""

from __future__ import annotations

import copy
import gc
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn

from optrun.runtime.compression import ddp_hooks
from optrun.runtime.compression.codecs import get_codec
from optrun.runtime.compression.ddp_run import LossModule, free_port
from optrun.runtime.model import ModelConfig, TinyLM

CFG = ModelConfig(vocab_size=260, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=64, max_seq_len=32)


@pytest.fixture(scope="module")
def group():
    if dist.is_initialized():  # another test module left one behind: not ours to tear down
        pytest.skip("a default process group already exists in this process")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{free_port()}",
        rank=0,
        world_size=1,
        timeout=timedelta(seconds=30),
    )
    yield
    gc.collect()  # DDP's reference cycles hold gloo work: free them before the group (see ddp_run)
    dist.destroy_process_group()


def _model() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(CFG)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, 256, (2, 16), generator=g)
    return x, torch.roll(x, -1, dims=1)


def _local_grads(model: nn.Module, step: int) -> list[torch.Tensor]:
    model.zero_grad()
    model.loss(*_batch(step)).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def _ddp_grads(ddp: nn.parallel.DistributedDataParallel, step: int) -> list[torch.Tensor]:
    ddp.zero_grad()
    ddp(*_batch(step)).backward()
    return [p.grad.detach().clone() for p in ddp.module.model.parameters()]


def _ddp(
    model: nn.Module, hook: str, **kw
) -> tuple[nn.parallel.DistributedDataParallel, ddp_hooks.CommStats]:
    ddp = nn.parallel.DistributedDataParallel(LossModule(model), bucket_cap_mb=64)
    return ddp, ddp_hooks.register(ddp, hook, **kw)


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_allreduce_hook_passes_gradients_through_and_counts_the_whole_bucket(group):
    model = _model()
    ref = _local_grads(copy.deepcopy(model), 0)
    ddp, stats = _ddp(model, "allreduce")
    got = _ddp_grads(ddp, 0)
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    assert stats.bytes_per_step == [_param_bytes(model)]


def test_int8_hook_delivers_the_decoded_gradients_and_four_times_fewer_bytes(group):
    model = _model()
    ref = _local_grads(copy.deepcopy(model), 0)
    ddp, stats = _ddp(model, "int8")
    got = _ddp_grads(ddp, 0)
    codec = get_codec("int8")
    for g, r in zip(got, ref, strict=True):
        assert torch.equal(g, codec.decode(codec.encode(r)))
    dense = _param_bytes(model)
    # 1-D norm weights ride along with a single scale each; the matrices carry one per row.
    assert 3.5 < dense / stats.bytes_per_step[0] < 4.0
    assert stats.dense_bytes_per_step == [dense]
    assert stats.gate_checks == 0  # no bound given: no gate


def test_a_gate_tripping_on_every_tensor_sends_everything_exactly(group):
    model = _model()
    ref = _local_grads(copy.deepcopy(model), 0)
    ddp, stats = _ddp(model, "int8", max_error=1e-9)
    got = _ddp_grads(ddp, 0)
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    n = len(list(model.parameters()))
    assert stats.gate_checks == stats.gate_trips == n
    # Full gradients plus the agreed worst errors (one fp32 per tensor).
    assert stats.bytes_per_step == [_param_bytes(model) + 4 * n]


def test_a_loose_gate_compresses_everything_and_trips_nothing(group):
    model = _model()
    ddp, stats = _ddp(model, "int8", max_error=0.05)
    _ddp_grads(ddp, 0)
    assert stats.gate_checks == len(list(model.parameters())) and stats.gate_trips == 0
    assert max(stats.errors) < 0.05


def test_topk_hook_feeds_back_what_it_dropped_into_the_next_step(group):
    model = _model()
    ref_model = copy.deepcopy(model)
    codec = get_codec("topk", topk_ratio=0.1)
    ddp, stats = _ddp(model, "topk", topk_ratio=0.1)
    g1, r1 = _ddp_grads(ddp, 0), _local_grads(ref_model, 0)
    assert all(torch.equal(a, codec.decode(codec.encode(b))) for a, b in zip(g1, r1, strict=True))
    residual = [b - a for a, b in zip(g1, r1, strict=True)]
    g2, r2 = _ddp_grads(ddp, 1), _local_grads(ref_model, 1)
    for a, b, e in zip(g2, r2, residual, strict=True):
        assert torch.equal(a, codec.decode(codec.encode(b + e)))
    assert stats.dense_bytes_per_step[0] / stats.bytes_per_step[0] > 4.0


def test_lowrank_hook_is_torch_powersgd_dense_for_two_steps_then_compressed(group):
    # Wide enough matrices that rank 1 is worth it (PowerSGD skips a matrix under 2x).
    cfg = ModelConfig(
        vocab_size=260, dim=64, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=128, max_seq_len=32
    )
    torch.manual_seed(0)
    model = TinyLM(cfg)
    ddp, stats = _ddp(model, "lowrank", rank=1)
    for step in range(4):
        grads = _ddp_grads(ddp, step)
        assert all(bool(torch.isfinite(g).all()) for g in grads)
    dense = _param_bytes(model)
    assert stats.bytes_per_step[:2] == [dense, dense]
    assert stats.bytes_per_step[2] == stats.bytes_per_step[3] < dense / 10
    assert stats.steady_bytes_per_step == stats.bytes_per_step[3]


def test_unknown_hook_names_the_allowed_ones(group):
    ddp = nn.parallel.DistributedDataParallel(LossModule(_model()))
    with pytest.raises(ValueError, match="hook: unknown hook 'int2'; allowed: allreduce, int8"):
        ddp_hooks.register(ddp, "int2")
