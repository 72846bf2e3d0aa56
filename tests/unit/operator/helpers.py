"""Inputs for the operator's unit tests (import from tests.unit.operator.helpers): run objects as the API server returns them, pods in each
state the kubelet reports, and results the real judge builds. No cluster: these test the pure parts
(builders, status, reconcile, scrape parsing, config) on the objects they will see."""

from __future__ import annotations

import copy
import datetime as dt
import json
from typing import Any

from optrun.api.result import Category, Expected, SafetySummary, TestResult
from optrun.api.v1alpha1 import Acceptance
from optrun.judge import build_result
from optrun.operator import builders
from optrun.operator.config import OperatorConfig

NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
UID = "0b9c5a52-3f4b-4b8e-9d0a-1f2e3d4c5b6a"

SPEC: dict[str, Any] = {
    "workload": {"model": "tiny-lm", "sequenceLength": 32, "batchSize": 4},
    "optimizations": {"kernels": {"enabled": False, "mode": "eager"}},
    "training": {"epochs": 1, "stepsPerEpoch": 20, "checkpoint": {"everySteps": 5, "claimName": "ckpt"}},
    "resources": {"gpus": 2, "gpuProduct": "NVIDIA-H100-80GB-HBM3", "cpu": "2", "memory": "4Gi"},
}


def config(**changes: Any) -> OperatorConfig:
    """The operator's defaults, but no back-off between attempts unless a test asks for one."""
    values = {
        "runtime_image": "registry.example/optrun-runtime:test",
        "live_gate_grace_seconds": 30,
        "retry_backoff_seconds": 0,
        **changes,
    }
    return OperatorConfig(**values)


def run_body(
    spec: dict[str, Any] | None = None, status: dict[str, Any] | None = None, **meta: Any
) -> dict[str, Any]:
    """An OptimizationRun as the API server stores it."""
    return {
        "apiVersion": "optrun.io/v1alpha1",
        "kind": "OptimizationRun",
        "metadata": {
            "name": "demo",
            "namespace": "team-a",
            "uid": UID,
            "generation": 1,
            "resourceVersion": "100",
            "creationTimestamp": "2026-01-02T03:00:00Z",
            **meta,
        },
        "spec": copy.deepcopy(SPEC if spec is None else spec),
        **({"status": status} if status is not None else {}),
    }


def stamp(seconds_before_now: float) -> str:
    return (NOW - dt.timedelta(seconds=seconds_before_now)).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod_body(
    cfg: OperatorConfig,
    attempt: int,
    state: str = "pending",
    *,
    run: dict[str, Any] | None = None,
    exit_code: int | None = None,
    message: str = "",
    reason: str = "",
    pod_reason: str = "",
    unschedulable: str = "",
    started_seconds_ago: float = 10,
    deleting: bool = False,
    index: int = 0,
) -> dict[str, Any]:
    """The pod the builders make for `attempt` (node `index` of a multi-node run), with the status a
    kubelet would report in `state` (pending, unschedulable, running, succeeded, failed)."""
    r = builders.Run.from_body(run or run_body())
    pod = builders.pod(r, attempt, cfg, index=index)
    pod["metadata"]["resourceVersion"] = str(200 + attempt)
    if deleting:
        pod["metadata"]["deletionTimestamp"] = stamp(1)
    status: dict[str, Any] = {"phase": "Pending"}
    if state == "unschedulable":
        status["conditions"] = [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": unschedulable}
        ]
    elif state != "pending":
        pod["spec"]["nodeName"] = "gpu-node-0"
        status["podIP"] = "127.0.0.9"
        status["conditions"] = [{"type": "PodScheduled", "status": "True"}]
        started = stamp(started_seconds_ago)
        container: dict[str, Any] = {"name": "runtime", "restartCount": 0}
        if state == "running":
            status["phase"] = "Running"
            container["state"] = {"running": {"startedAt": started}}
        else:
            status["phase"] = "Succeeded" if state == "succeeded" else "Failed"
            code = exit_code if exit_code is not None else (0 if state == "succeeded" else 1)
            container["state"] = {
                "terminated": {
                    "exitCode": code,
                    "reason": reason or ("Completed" if code == 0 else "Error"),
                    "message": message,
                    "startedAt": started,
                    "finishedAt": stamp(1),
                }
            }
        status["containerStatuses"] = [container]
    if pod_reason:
        status["reason"] = pod_reason
    pod["status"] = status
    return pod


def make_test(
    name: str, passed: bool, category: Category = Category.TUNING, critical: bool = False, **kw: Any
) -> TestResult:
    return TestResult(name=name, category=category, critical=critical, passed=passed, **kw)


def result_message(
    *,
    failing: tuple[str, ...] = (),
    critical_failing: tuple[str, ...] = (),
    recoveries: int = 0,
    failed_gate: str | None = None,
) -> str:
    """A termination message as the runtime writes it: the real judge's result, compacted."""
    tests = [
        make_test("infra.checkpoint-restores", True, Category.CRITICAL_INFRASTRUCTURE, True),
        make_test("safety.run-gates", True, Category.SAFETY, True),
        make_test("e2e.training-completed", True, Category.END_TO_END, True),
    ]
    tests += [make_test(f"tuning.ok-{i}", True) for i in range(20)]
    tests += [
        make_test(
            n,
            False,
            measured=2.57,
            expected=Expected(min=2.0, max=2.5),
            reason=f"{n}: measured 2.57 against 2.0..2.5",
        )
        for n in failing
    ]
    tests += [
        make_test(
            n, False, Category.END_TO_END, True, measured=0.1, expected=Expected(min=0.35), reason="too low"
        )
        for n in critical_failing
    ]
    result = build_result(
        tests,
        Acceptance(),
        safety=SafetySummary(trips={"nan_loss": recoveries}, recoveries=recoveries, failed_gate=failed_gate),
        exit_reason=f"safety gate {failed_gate} failed: as the runtime words it"
        if failed_gate
        else "completed",
    )
    text = result.compact()
    json.loads(text)  # the runtime's contract: JSON within 4 KiB
    return text


def observe(
    run: dict[str, Any],
    pods: list[dict[str, Any]] = (),  # type: ignore[assignment]
    *,
    gone: tuple[str, ...] = (),
    deleted: tuple[dict[str, Any], ...] = (),
    sample: Any = None,
    now: dt.datetime = NOW,
    changes: tuple[str, ...] = (),
    scrape_error: str | None = None,
    started_spec: dict[str, Any] | None = None,
) -> Any:
    """The reconcile's input: the run, its pods as PodViews, pods confirmed deleted (`gone`: by
    name; `deleted`: their last state, as a watch's DELETED event shows it)."""
    from optrun.operator.pods import PodView
    from optrun.operator.reconcile import Observed

    views = {p["metadata"]["name"]: PodView.from_pod(p) for p in pods}
    for p in deleted:
        last = PodView.from_pod(p)
        views[last.name] = last if last.finished else last.vanished()
    for name in gone:
        views[name] = PodView.gone(name, int(name.rsplit("-", 1)[1]))
    return Observed(
        run=run,
        pods=views,
        now=now,
        sample=sample,
        spec_changes=changes,
        scrape_error=scrape_error,
        started_spec=started_spec,
    )


def applied(run: dict[str, Any], plan: Any) -> dict[str, Any]:
    """The run after the API server applied the plan's status write."""
    new = copy.deepcopy(run)
    if plan.status is not None:
        new["status"] = copy.deepcopy(plan.status)
    new["metadata"]["resourceVersion"] = str(int(new["metadata"]["resourceVersion"]) + 1)
    return new


def conditions(run: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """type -> (status, reason)"""
    return {c["type"]: (c["status"], c["reason"]) for c in (run.get("status") or {}).get("conditions", [])}
