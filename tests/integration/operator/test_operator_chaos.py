"""No swallowed error leaves a run without a next look: the operator talks to the API server
through a proxy (tests/support/chaosproxy.py) that fails 30 % of its writes (500 before or after
the write happened, 429 with Retry-After), its own and kopf's alike, and every run still
finishes, each with exactly one pod."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.operator.conftest import Runs
from tests.support.chaosproxy import ChaosProxy
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

RUNS = 4


@pytest.mark.slow
def test_every_run_finishes_with_one_pod_while_a_share_of_the_operators_writes_fail(
    start_operator: Any, runs: Runs, cluster: Any, namespace: str
) -> None:
    pki = cluster.pki
    with ChaosProxy(
        cluster.server,
        str(cluster.ca_file),
        str(pki / "apiserver.crt"),
        str(pki / "apiserver.key"),
        failure_rate=0.3,
    ) as proxy:
        operator = start_operator(namespace, api_server=proxy.url, status_batch_seconds=0.5)
        names = [f"chaos-{i}" for i in range(RUNS)]
        for name in names:
            runs.create(name)

        def finished() -> bool:
            return all(runs.status(n).get("phase") in ("Succeeded", "Failed") for n in names)

        wait_for(
            finished,
            timeout=400,
            interval=1,
            message=lambda: (
                f"every run to finish: {[runs.status(n).get('phase') for n in names]}; "
                f"injected {dict(proxy.injected)}\n{operator.tail(3000)}"
            ),
        )
        for name in names:
            status = runs.status(name)
            assert status["phase"] == "Succeeded", (name, status.get("message"))
            assert status["attempts"] == 1 and status.get("failedAttempts", 0) == 0, (name, status)
            assert [p.metadata.name for p in runs.pods(name)] == [f"{name}-attempt-1"], "no duplicate pod"
            conditions = runs.conditions(name)
            assert conditions["Ready"]["status"] == "True" and conditions["Running"]["status"] == "False"
        injected = dict(proxy.injected)
        print(f"writes failed by the proxy: {injected}; writes that went through: {dict(proxy.writes)}")
        assert all(injected.get(kind, 0) > 0 for kind in ("500-before", "429-before", "500-after")), injected
        # Each pod created once: a create whose answer was lost is found by its name (409) next time.
        assert proxy.writes["POST pods"] == RUNS, dict(proxy.writes)
        assert operator.alive and operator.starts == 1
