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

# How the runtime's own watchdog words the termination message of a process it ended as hung
# (optrun.runtime.orchestrator): the operator's reason for such an attempt is HangDetected.
HANG_PREFIX = "HangDetected:"

# How a terminated container's exit looks, turned into a reason a person can search for.
_SIGNALS = {137: "SIGKILL", 143: "SIGTERM"}

# The DisruptionTarget condition (Kubernetes 1.26+) by its reason, and the pod reasons a kubelet
# writes when it ends a pod for the node's sake: the attempt was disrupted, it did not fail.
_DISRUPTION_TARGET = {
    "EvictionByEvictionAPI": "Evicted",  # kubectl drain, a descheduler: the Eviction API
    "PreemptionByScheduler": "Preempted",
    "PreemptionByKubeScheduler": "Preempted",  # its name in 1.26
    "DeletionByTaintManager": "NodeLost",  # a NoExecute taint: the node not ready or unreachable
    "DeletionByPodGC": "NodeLost",  # the node object is gone
    "TerminationByKubelet": "Evicted",  # node pressure or a graceful node shutdown
}
_DISRUPTED_POD_REASONS = {
    "Evicted": "Evicted",  # node-pressure eviction by the kubelet
    "Preempting": "Preempted",
    "Terminated": "NodeShutdown",  # graceful node shutdown
    "Shutdown": "NodeShutdown",
    "NodeShutdown": "NodeShutdown",
    "NodeLost": "NodeLost",
}


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
    scheduled_at: dt.datetime | None = None  # when PodScheduled last changed (the binding)
    started_at: dt.datetime | None = None  # the runtime container's start
    exit_code: int | None = None
    terminated_reason: str = ""  # the container's (OOMKilled, Error, Completed) or the pod's (Evicted)
    message: str = ""  # the termination message (the result contract on success)
    pod_reason: str = ""  # status.reason of the pod (Evicted, DeadlineExceeded)
    pod_message: str = ""
    image: str = ""  # the runtime container's image
    # Why the kubelet has not started the container (ErrImagePull, CreateContainerConfigError, ...).
    waiting_reason: str = ""
    waiting_message: str = ""
    disruption_reason: str = ""  # the DisruptionTarget condition's reason, when it is True
    disruption_message: str = ""

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
        waiting = cstate.get("waiting") or {}
        disruption = conditions.get("DisruptionTarget") or {}
        if disruption.get("status") != "True":
            disruption = {}
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
            scheduled_at=parse_time((scheduled_cond or {}).get("lastTransitionTime")),
            started_at=parse_time((running or {}).get("startedAt") or terminated.get("startedAt")),
            exit_code=terminated.get("exitCode"),
            terminated_reason=str(terminated.get("reason") or ""),
            message=str(terminated.get("message") or ""),
            pod_reason=str(status.get("reason") or ""),
            pod_message=str(status.get("message") or ""),
            image=str(
                container.get("image")
                or next(
                    (
                        c.get("image")
                        for c in (pod.get("spec") or {}).get("containers") or []
                        if c.get("name") == builders.CONTAINER
                    ),
                    "",
                )
                or ""
            ),
            waiting_reason=str(waiting.get("reason") or ""),
            waiting_message=str(waiting.get("message") or ""),
            disruption_reason=str(disruption.get("reason") or ("DisruptionTarget" if disruption else "")),
            disruption_message=str(disruption.get("message") or ""),
        )

    def vanished(self) -> PodView:
        """This pod, deleted before it finished: gone, keeping what said it was disrupted (its
        DisruptionTarget condition, a kubelet's eviction or shutdown reason). A drained or
        preempted pod that is then force-deleted is still a disruption, not a PodDeleted failure."""
        disrupted_by_node = self.pod_reason in _DISRUPTED_POD_REASONS
        return dataclasses.replace(
            PodView.gone(self.name, self.attempt),
            disruption_reason=self.disruption_reason,
            disruption_message=self.disruption_message,
            pod_reason=self.pod_reason if disrupted_by_node else "",
            pod_message=self.pod_message if disrupted_by_node else "",
        )

    @property
    def finished(self) -> bool:
        """The runtime process is over: nothing writes to the checkpoint volume any more."""
        return self.state in ("succeeded", "failed", "gone")

    @property
    def live(self) -> bool:
        """Running or about to, and nobody has asked it to stop yet."""
        return not self.finished and not self.deleting

    def disruption(self) -> tuple[str, str] | None:
        """(reason, message) when the pod was ended for the cluster's sake (an eviction, a preemption,
        a node drained, shut down or lost), not by its own failure; None otherwise. Seen from the
        DisruptionTarget condition (1.26+) or the pod reason a kubelet writes. On older clusters an
        eviction through the Eviction API leaves no trace on the pod: it reads as PodDeleted."""
        if self.disruption_reason:
            reason = _DISRUPTION_TARGET.get(self.disruption_reason, "Disrupted")
            detail = self.disruption_message or self.disruption_reason
            return reason, f"pod {self.name} was disrupted ({self.disruption_reason}): {detail}"
        if self.pod_reason in _DISRUPTED_POD_REASONS:
            detail = f": {self.pod_message}" if self.pod_message else ""
            return _DISRUPTED_POD_REASONS[
                self.pod_reason
            ], f"pod {self.name} was ended by its node ({self.pod_reason}){detail}"
        return None

    def failure(self) -> tuple[str, str]:
        """(reason, message) of a failed or vanished pod, for the AttemptFailed event and condition."""
        if self.state == "gone":
            return "PodDeleted", f"pod {self.name} was deleted before it finished"
        if HANG_PREFIX in self.message:
            line = next(line for line in self.message.splitlines() if HANG_PREFIX in line)
            return "HangDetected", f"pod {self.name}: {line.strip()[:400]}"
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
