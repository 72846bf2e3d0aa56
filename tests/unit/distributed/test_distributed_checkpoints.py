"""The checkpoint a distributed run resumes from is one choice for all ranks: rank 0 lists the
directory and broadcasts what it found, so ranks whose views of a shared volume differ (a
listing cache behind a rename, a pruned checkpoint still shown) never load different steps.

Two real gloo ranks in two processes; each rank's store stands for its own view of the volume.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from optrun.runtime.compression.ddp_run import free_port
from optrun.runtime.training.checkpoint import CheckpointStore

pytestmark = pytest.mark.slow


def _rank(rank: int, port: int, views: list[str], out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    try:
        found = CheckpointStore(Path(views[rank]), keep=5).latest()
        assert found is not None
        Path(out, f"rank{rank}.json").write_text(
            json.dumps({"path": str(found.path), "step": found.step, "meta": found.meta["step"]})
        )
    finally:
        dist.destroy_process_group()


def test_every_rank_resumes_from_the_checkpoint_rank_0_chose(tmp_path: Path) -> None:
    views = [tmp_path / "rank0-view", tmp_path / "rank1-view"]
    for view, steps in zip(views, [(4, 8), (4, 8, 12)], strict=True):
        store = CheckpointStore(view, keep=5)
        for step in steps:
            store.save(step, {"step": step}, model=torch.nn.Linear(4, 4))
    # Rank 1 sees a newer checkpoint than rank 0 does; alone, it would resume from step 12.
    assert CheckpointStore(views[1], keep=5).latest().step == 12  # type: ignore[union-attr]
    mp.spawn(_rank, args=(free_port(), [str(v) for v in views], str(tmp_path)), nprocs=2, join=True)
    chosen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    expected = {"path": str(views[0] / "step-000000008"), "step": 8, "meta": 8}
    assert chosen == [expected, expected]
