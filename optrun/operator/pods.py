"""What a runtime pod says about its attempt: a small, typed reading of the Pod object.

The reconcile never looks into raw pod dicts; it reads a `PodView`, built here from the pod as
the API server (or the watch stream) returned it. `PodView.gone()` stands for a pod that no
longer exists: the operator confirmed the 404 itself, or saw the watch's DELETED event.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from typing import Any, Literal

from optrun.operator import builders

State = Literal["pending", "running", "succeeded", "failed", "gone"]

# How a terminated container's exit looks, turned into a reason a person can search for.
_SIGNALS = {137: "SIGKILL", 143: "SIGTERM"}


def parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


@dataclasses.dataclass(frozen=True)
class PodView:
    name: str
    attempt: int | None
    state: State
    deleting: bool = False  # metadata.deletionTimestamp is set: someone asked it to stop
    node: str = ""
    pod_ip: str = ""
    # PodScheduled: True, False (with the scheduler's message) or None (not yet decided).
    scheduled: bool | None = None
    schedule_message: str = ""
    started_at: dt.datetime | None = None  # the runtime container's start
    exit_code: int | None = None
    terminated_reason: str = ""  # the container's (OOMKilled, Error, Completed) or the pod's (Evicted)
    message: str = ""  # the termination message (the result contract on success)
    pod_reason: str = ""  # status.reason of the pod (Evicted, DeadlineExceeded)
    pod_message: str = ""

    @classmethod
    def gone(cls, name: str, attempt: int | None = None) -> PodView:
        return cls(name=name, attempt=attempt, state="gone", deleting=True)

    @classmethod
    def from_pod(cls, pod: Mapping[str, Any]) -> PodView:
        meta = pod.get("metadata") or {}
        status = pod.get("status") or {}
        phase = status.get("phase") or "Pending"
        conditions = {c.get("type"): c for c in status.get("conditions") or []}
        scheduled_cond = conditions.get("PodScheduled")
        scheduled: bool | None = None
        schedule_message = ""
        if scheduled_cond is not None:
            scheduled = scheduled_cond.get("status") == "True"
            if not scheduled:
                schedule_message = scheduled_cond.get("message") or scheduled_cond.get("reason") or ""
        if (pod.get("spec") or {}).get("nodeName"):
            scheduled = True
        container: Mapping[str, Any] = next(
            (c for c in status.get("containerStatuses") or [] if c.get("name") == builders.CONTAINER),
            {},
        )
        cstate = container.get("state") or {}
        running = cstate.get("running")
        terminated = cstate.get("terminated")
        state: State
        if phase == "Succeeded":
            state = "succeeded"
        elif phase == "Failed":
            state = "failed"
        elif terminated is not None:
            # The container ended but the kubelet has not written the pod's phase yet.
            state = "succeeded" if terminated.get("exitCode") == 0 else "failed"
        elif phase == "Running" and running is not None:
            state = "running"
        else:
            state = "pending"
        terminated = terminated or {}
        return cls(
            name=str(meta.get("name", "")),
            attempt=builders.attempt_of(pod),
            state=state,
            deleting=bool(meta.get("deletionTimestamp")),
            node=str((pod.get("spec") or {}).get("nodeName") or ""),
            pod_ip=str(status.get("podIP") or ""),
            scheduled=scheduled,
            schedule_message=schedule_message,
            started_at=parse_time((running or {}).get("startedAt") or terminated.get("startedAt")),
            exit_code=terminated.get("exitCode"),
            terminated_reason=str(terminated.get("reason") or ""),
            message=str(terminated.get("message") or ""),
            pod_reason=str(status.get("reason") or ""),
            pod_message=str(status.get("message") or ""),
        )

    @property
    def finished(self) -> bool:
        """The runtime process is over: nothing writes to the checkpoint volume any more."""
        return self.state in ("succeeded", "failed", "gone")

    @property
    def live(self) -> bool:
        """Running or about to, and nobody has asked it to stop yet."""
        return not self.finished and not self.deleting

    def failure(self) -> tuple[str, str]:
        """(reason, message) of a failed or vanished pod, for the AttemptFailed event and condition."""
        if self.state == "gone":
            return "PodDeleted", f"pod {self.name} was deleted before it finished"
        if self.pod_reason == "Evicted":
            return "Evicted", f"pod {self.name} was evicted: {self.pod_message}".rstrip(": ")
        if self.terminated_reason == "OOMKilled":
            return "OOMKilled", f"pod {self.name} ran out of memory (OOMKilled); raise spec.resources.memory"
        if self.deleting:
            return (
                "PodDeleted",
                f"pod {self.name} was deleted before it finished (exit code {self.exit_code})",
            )
        code = self.exit_code
        signal = f" ({_SIGNALS[code]})" if code in _SIGNALS else ""
        tail = self.message.strip().splitlines()[-1][:300] if self.message.strip() else ""
        detail = f": {tail}" if tail else ""
        return "RuntimeError", f"pod {self.name} exited with code {code}{signal}{detail}"
