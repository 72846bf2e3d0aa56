"""What keeps a run's API writes few: kopf's diff base in memory, and status writes batched per run."""

from __future__ import annotations

import threading
import time
from typing import Any

import kopf
import pytest

from optrun.operator.controller import Batcher, Burst, Cache, EventPoster
from optrun.operator.main import QuietProgressStorage, SpecMemory
from tests.support.waiting import wait_for


def run_body(
    *, uid: str = "u1", generation: int = 1, observed: int | None = None, rv: str = "10"
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "optrun.io/v1alpha1",
        "kind": "OptimizationRun",
        "metadata": {
            "name": "r",
            "namespace": "ns",
            "uid": uid,
            "generation": generation,
            "resourceVersion": rv,
        },
        "spec": {"training": {"epochs": generation}, "suspend": False},
    }
    if observed is not None:
        body["status"] = {"phase": "Pending", "observedGeneration": observed}
    return body


# --- SpecMemory: kopf's last handled spec --------------------------------------------------------


def test_a_run_never_reconciled_has_no_diff_base_so_kopf_handles_it_as_created() -> None:
    memory = SpecMemory()
    assert memory.fetch(body=kopf.Body(run_body())) is None
    # A status from an older generation: the current spec was never handled either.
    assert memory.fetch(body=kopf.Body(run_body(generation=2, observed=1))) is None


def test_a_run_whose_status_records_its_generation_is_resumed_with_its_own_spec_as_the_base() -> None:
    memory = SpecMemory()
    body = kopf.Body(run_body(generation=3, observed=3))
    assert memory.fetch(body=body) == {"spec": {"training": {"epochs": 3}, "suspend": False}}


def test_stored_spec_is_the_base_until_forgotten() -> None:
    memory = SpecMemory()
    old = kopf.Body(run_body())
    memory.store(body=old, patch=kopf.Patch(), essence=memory.build(body=old))
    edited = kopf.Body(run_body(generation=2, observed=1))
    assert memory.fetch(body=edited) == {"spec": {"training": {"epochs": 1}, "suspend": False}}
    assert memory.build(body=edited) != memory.fetch(body=edited)  # kopf sees an update
    memory.forget("u1")
    assert memory.fetch(body=edited) is None


def test_the_essence_is_the_spec_alone_and_writes_nothing_to_the_patch() -> None:
    memory = SpecMemory()
    body = kopf.Body({**run_body(observed=1), "metadata": {**run_body()["metadata"], "labels": {"a": "b"}}})
    patch = kopf.Patch()
    essence = memory.build(body=body, extra_fields={("spec",)})
    assert set(essence) == {"spec"}
    memory.store(body=body, patch=patch, essence=essence)
    assert not patch  # the point: no annotation write per run


def test_a_field_outside_the_spec_falls_back_to_kopfs_whole_essence() -> None:
    body = kopf.Body({**run_body(), "metadata": {**run_body()["metadata"], "labels": {"team": "a"}}})
    essence = SpecMemory().build(body=body, extra_fields={("metadata", "labels")})
    assert essence["metadata"]["labels"] == {"team": "a"} and "spec" in essence


def test_progress_storage_does_not_brand_runs_with_a_marker_annotation() -> None:
    storage = QuietProgressStorage(prefix="optrun.io")
    patch = kopf.Patch()
    storage.store(key=kopf.HandlerId("h"), record={"retries": 1}, body=kopf.Body(run_body()), patch=patch)
    annotations = dict(patch.get("metadata", {}).get("annotations", {}))
    assert "optrun.io/kopf-managed" not in annotations
    assert any(k.startswith("optrun.io/") for k in annotations)  # the progress itself is kept


# --- Cache: the status not yet written -----------------------------------------------------------


def test_the_staged_status_overlays_the_freshest_copy_of_the_run() -> None:
    cache = Cache()
    cache.remember_run(run_body(rv="10", observed=1))
    cache.stage_status("u1", {"phase": "Running", "attempts": 1})
    newer = run_body(generation=2, observed=1, rv="12")  # a spec edit seen on the watch
    current = cache.current("u1", newer)
    assert current is not None
    assert current["metadata"]["resourceVersion"] == "12"
    assert current["spec"]["training"]["epochs"] == 2
    assert current["status"] == {"phase": "Running", "attempts": 1}
    assert cache.phases() == ["Running"]


def test_taking_the_staged_status_leaves_the_written_one() -> None:
    cache = Cache()
    cache.remember_run(run_body(observed=1))
    cache.stage_status("u1", {"phase": "Running"})
    assert cache.staged() == ["u1"]
    assert cache.take_status("u1") == {"phase": "Running"}
    assert cache.take_status("u1") is None
    current = cache.current("u1")
    assert current is not None and current["status"]["phase"] == "Pending"


def test_forgetting_a_run_drops_its_staged_status() -> None:
    cache = Cache()
    cache.remember_run(run_body())
    cache.stage_status("u1", {"phase": "Pending"})
    cache.forget("u1")
    assert cache.staged() == [] and cache.current("u1") is None


# --- Batcher: one flush per window ---------------------------------------------------------------


class Flushes:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, float]] = []

    def __call__(self, key: str) -> None:
        with self.lock:
            self.calls.append((key, time.monotonic()))

    def keys(self) -> list[str]:
        with self.lock:
            return [k for k, _ in self.calls]


def test_marks_within_the_window_become_one_flush_after_the_delay() -> None:
    flushes = Flushes()
    batcher = Batcher(flushes, workers=2)
    start = time.monotonic()
    for _ in range(5):
        batcher.mark("a", 0.3)
    wait_for(lambda: flushes.keys() == ["a"], timeout=10, message="one flush of 'a'")
    assert flushes.calls[0][1] - start >= 0.3
    batcher.mark("a", 0.05)  # after the flush: a new window
    wait_for(lambda: flushes.keys() == ["a", "a"], timeout=10, message="a second flush of 'a'")


def test_keys_flush_independently_in_the_order_they_fall_due() -> None:
    flushes = Flushes()
    batcher = Batcher(flushes, workers=1)
    batcher.mark("late", 0.4)
    batcher.mark("early", 0.05)
    wait_for(lambda: len(flushes.keys()) == 2, timeout=10, message="both keys flushed")
    assert flushes.keys() == ["early", "late"]


@pytest.mark.parametrize("delay", [0.0, 0.01])
def test_a_due_mark_flushes_promptly(delay: float) -> None:
    flushes = Flushes()
    Batcher(flushes, workers=1).mark("k", delay)
    wait_for(lambda: flushes.keys() == ["k"], timeout=5, message="the flush")


# --- Burst: pods first ----------------------------------------------------------------------------


def test_a_burst_lasts_until_creations_stop_for_its_quiet_period() -> None:
    burst = Burst(quiet=0.3, max_hold=10)
    assert burst.remaining() == 0.0  # nothing created yet: no burst
    burst.created()
    assert 0.2 < burst.remaining() <= 0.3
    assert 0.2 < burst.hold(time.monotonic()) <= 0.3
    wait_for(lambda: burst.remaining() == 0.0, timeout=5, message="the burst's end")


def test_a_write_waits_for_a_burst_at_most_max_hold_from_when_it_was_queued() -> None:
    burst = Burst(quiet=5, max_hold=1)
    burst.created()
    now = time.monotonic()
    assert 0.9 < burst.hold(now) <= 1.0  # the burst has 5 s to go; the write waits 1 s at most
    assert burst.hold(now - 1.0) == 0.0  # queued a second ago: its hold is spent


def test_a_flush_due_during_a_burst_waits_for_its_end() -> None:
    burst = Burst(quiet=0.4, max_hold=10)
    flushes = Flushes()
    batcher = Batcher(flushes, workers=1, burst=burst)
    batcher.mark("a", 0.05)
    ends = []
    for _ in range(4):  # creations keep coming for about 0.6 s
        ends.append(time.monotonic() + burst.quiet)  # taken first: at or before the burst's end
        burst.created()
        wait_for(lambda: burst.remaining() < 0.25, timeout=5, message="the next creation")
    wait_for(lambda: flushes.keys() == ["a"], timeout=10, message="the flush after the burst")
    assert flushes.calls[0][1] >= ends[-1]


def test_a_flush_waits_no_longer_than_max_hold_under_an_endless_burst() -> None:
    burst = Burst(quiet=60, max_hold=0.3)
    burst.created()
    flushes = Flushes()
    start = time.monotonic()
    Batcher(flushes, workers=1, burst=burst).mark("a", 0.05)
    wait_for(lambda: flushes.keys() == ["a"], timeout=10, message="the flush at max_hold")
    assert flushes.calls[0][1] - start >= 0.3


class Recorder:
    """Stands in for the API client's create: EventPoster's only call."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.posted: list[tuple[str, float]] = []

    def create(self, body: dict[str, Any]) -> None:
        with self.lock:
            self.posted.append((body["reason"], time.monotonic()))

    def reasons(self) -> list[str]:
        with self.lock:
            return [r for r, _ in self.posted]


def _event(reason: str) -> dict[str, Any]:
    return {"reason": reason, "involvedObject": {"name": "r"}}


def test_events_wait_for_a_burst_and_keep_their_order() -> None:
    burst = Burst(quiet=0.4, max_hold=10)
    kube = Recorder()
    poster = EventPoster(kube, burst=burst)  # type: ignore[arg-type]
    end = time.monotonic() + burst.quiet  # taken first: at or before the burst's end
    burst.created()
    for reason in ("AttemptStarted", "Scheduled", "Running"):
        poster.post(_event(reason))
    wait_for(lambda: len(kube.reasons()) == 3, timeout=10, message="three events")
    assert kube.reasons() == ["AttemptStarted", "Scheduled", "Running"]
    assert kube.posted[0][1] >= end


def test_events_outside_a_burst_are_posted_at_once() -> None:
    kube = Recorder()
    poster = EventPoster(kube, burst=Burst())  # type: ignore[arg-type]
    poster.post(_event("Succeeded"))
    wait_for(lambda: kube.reasons() == ["Succeeded"], timeout=5, message="the event")


def test_the_cache_keeps_runs_without_their_managed_fields() -> None:
    cache = Cache()
    body = run_body()
    body["metadata"]["managedFields"] = [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}]
    cache.remember_run(body)
    kept = cache.run("u1")
    assert kept is not None and "managedFields" not in kept["metadata"]
    assert kept["metadata"]["uid"] == "u1" and "managedFields" in body["metadata"]  # the caller's is intact
