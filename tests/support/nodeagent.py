"""The node agent: a stand-in for the kubelet that runs pods as local processes.

The test control plane (tests/support/cluster.py) has no kubelet and no container runtime.
This agent registers one or more fake GPU nodes and does the kubelet's part for the pods that
the real kube-scheduler binds to them:

Nodes
  Each `NodeSpec` becomes a Node with capacity `nvidia.com/gpu`, cpu, memory and pods, the
  GPU feature discovery labels (`nvidia.com/gpu.product`, `nvidia.com/gpu.memory` in MiB,
  `nvidia.com/gpu.count`, `nvidia.com/gpu.present`), InternalIP 127.0.0.1 and a kubelet
  endpoint. Its Lease (kube-node-lease) and Ready condition are renewed every 10 s, so the
  real node-lifecycle controller keeps it Ready and untainted.

Pods
  Each container's command + args run as a local process (image ignored), in a session and
  process group of its own and a private mount namespace (`unshare --mount`), with:
  - env: literal values with $(VAR) expansion, downward-API fieldRefs (metadata.name,
    .namespace, .uid, .labels['k'], .annotations['k'], spec.nodeName, spec.serviceAccountName,
    status.podIP, status.podIPs, status.hostIP), resourceFieldRefs, ConfigMap and Secret key
    refs, envFrom; plus KUBERNETES_SERVICE_HOST/PORT pointing at the test API server, and
    PATH with the test interpreter's bin directory first (so `optrun` and `python` are the
    project venv's).
  - volumes: configMap, secret (including the ServiceAccount token secret with token,
    ca.crt and namespace, mounted at /var/run/secrets/kubernetes.io/serviceaccount by the
    admission plugin), projected (configMap, secret, downwardAPI, serviceAccountToken),
    downwardAPI, emptyDir, hostPath, and persistentVolumeClaim (a directory per claim, kept
    across pods). Each is materialized under the pod's directory and bind-mounted at its
    mountPath (subPath and readOnly honoured) for that process alone.
  - a pod IP of its own from 127.<n>.0.0/16 (all of 127/8 routes to lo on Linux).
  - cluster DNS for pods with a hostname and a subdomain, as CoreDNS answers for a headless
    Service of that name selecting the pod: one hosts file for the agent, `<state>/hosts` (the
    host's /etc/hosts, then one line per such pod: `<ip> <hostname>.<subdomain>.<ns>.svc.cluster.local
    <hostname>.<subdomain> <hostname>`), bind-mounted read-only over /etc/hosts in every
    container and rewritten in place (same inode, so every mount sees it) as pods come and go.
  The agent reports phase, conditions (Initialized, ContainersReady, Ready), container states,
  restart counts, exit codes (128+signal for a signal) and the termination message read
  from terminationMessagePath (FallbackToLogsOnError: the log's last 80 lines, 2 KiB at most).
  Init containers run in order first. restartPolicy is honoured with a back-off of 1 s doubling
  to 30 s (CrashLoopBackOff). Readiness, liveness and startup probes (httpGet, tcpSocket,
  exec) run on their schedule. activeDeadlineSeconds fails the pod with DeadlineExceeded.
  Deletion: preStop hook (exec or httpGet), SIGTERM to the process group, the grace period,
  SIGKILL, a last status update with the final container states, then the pod object is
  removed (delete with grace 0), as the kubelet does.
  Logs: `<state>/pods/<ns>_<pod>_<uid>/<container>/<restartCount>.log` (plain text), also
  served to `kubectl logs` through a kubelet endpoint (tailLines, limitBytes, previous, follow).

PVCs
  A PersistentVolumeClaim with no volume gets a hostPath PersistentVolume under
  `<state>/pvcs/<ns>/<claim>`, pre-bound to it, so the real PV controller binds it and the
  real scheduler can place the pod. A default StorageClass `standard` names this provisioner.

Limits (what a real kubelet does that this one does not)
  - No images, no container isolation beyond the mount namespace: processes share the host's
    network, PIDs, users and filesystem. A process that binds 0.0.0.0 shares the port space
    with every other pod; bind the pod IP (status.podIP) instead. Resource requests and limits
    are bookkeeping for the scheduler only; nothing is enforced, OOMKilled never happens.
  - Images are never pulled or run. An empty `command` takes the image's entrypoint from
    `AgentConfig.image_entrypoints` (image repository, tag stripped -> argv), else runs `args`
    as the whole command line; both empty is a StartError. An image from a registry host in the
    reserved `.invalid` domain (RFC 2606: `registry.invalid/x:1`) cannot be pulled, as a
    kubelet could not resolve it: the container waits with ErrImagePull, then ImagePullBackOff
    between tries (back-off 1 s doubling to 30 s), and the pod stays Pending.
  - Pod conditions the kubelet does not own (DisruptionTarget, readiness gates) are kept as
    others wrote them, as the kubelet's status manager keeps them.
  - Mount points that do not exist on the host (directories, and the file at
    terminationMessagePath, /dev/termination-log by default) are created on the host, empty,
    before the bind mount hides them; the mounts themselves are private to the process.
    Needs root (or unprivileged user namespaces, tried when not root).
  - Volume contents are written when the pod starts and not refreshed when a ConfigMap or
    Secret changes. ConfigMap/Secret volume files are plain files (no ..data symlink swap).
  - No Services: the API server refuses loopback addresses in Endpoints, so a Service that
    selects agent pods has no endpoints; use the pod IP. Only the pod hostname records of a
    headless Service resolve (above), looked up once, when the pod starts: a Service created after
    its pods gives them no name. No exec, attach or port-forward.
  - Log lines carry no timestamps; `kubectl logs --timestamps` shows none.
  - Status carries fake image IDs and container IDs (`optrun-agent://...`).

Run it with `python -m tests.support.nodeagent --config FILE` (an `AgentConfig` as JSON);
`Cluster.start_node_agent()` does that and waits until the nodes are schedulable.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import datetime as dt
import http.server
import json
import logging
import math
import os
import random
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests

from tests.support.kubeapi import JSON, ApiError, KubeApi

log = logging.getLogger("nodeagent")

AGENT_NAME = "optrun-node-agent"
PROVISIONER = "optrun.io/node-agent"
PROVISIONED_LABEL = "optrun.io/provisioned-by"
HEARTBEAT_SECONDS = 10
LEASE_SECONDS = 40
BACKOFF_START, BACKOFF_MAX = 1.0, 30.0
LOOP_INTERVAL = 0.1
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
FALLBACK_LINES, FALLBACK_BYTES, MESSAGE_BYTES = 80, 2048, 4096
KUBELET_CONDITIONS = {"Initialized", "Ready", "ContainersReady", "PodScheduled"}


def unpullable(image: str) -> str | None:
    """The registry host of an image no kubelet could pull (its domain is .invalid), else None."""
    host = image.split("/", 1)[0] if "/" in image else ""
    host = host.split(":", 1)[0]
    return host if host == "invalid" or host.endswith(".invalid") else None


@dataclasses.dataclass(frozen=True)
class NodeSpec:
    """One fake GPU node. Capacity is what the scheduler sees; nothing is enforced."""

    name: str
    gpus: int = 4
    gpu_product: str = "NVIDIA-H100-80GB-HBM3"
    gpu_memory_mib: int = 81559  # as GPU feature discovery labels it: `nvidia.com/gpu.memory`, MiB
    cpu: str = "32"
    memory: str = "256Gi"
    pods: int = 110
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    taints: list[dict[str, str]] = dataclasses.field(default_factory=list)

    def node_labels(self) -> dict[str, str]:
        return {
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "nvidia.com/gpu.present": "true" if self.gpus else "false",
            "nvidia.com/gpu.count": str(self.gpus),
            "nvidia.com/gpu.product": self.gpu_product,
            "nvidia.com/gpu.memory": str(self.gpu_memory_mib),
            **self.labels,
        }


DEFAULT_NODES: tuple[NodeSpec, ...] = (
    NodeSpec("gpu-node-0", gpus=4, gpu_product="NVIDIA-H100-80GB-HBM3", gpu_memory_mib=81559),
    NodeSpec("gpu-node-1", gpus=2, gpu_product="NVIDIA-A100-SXM4-40GB", gpu_memory_mib=40960),
)


@dataclasses.dataclass
class AgentConfig:
    """What the agent needs to know; `Cluster.start_node_agent()` writes it as JSON."""

    server: str
    token: str
    ca_file: str
    api_port: int
    state_dir: str
    tls_cert: str  # served on the kubelet endpoint (the API server does not verify it)
    tls_key: str
    nodes: list[dict[str, Any]]
    extra_env: dict[str, str] = dataclasses.field(default_factory=dict)  # added to every container
    # Stand-ins for image ENTRYPOINTs, e.g. {"ghcr.io/x/optrun-operator": ["optrun", "operator"]}:
    # used when a container has no `command`. Keys match the image without tag or digest, or
    # its last path component.
    image_entrypoints: dict[str, list[str]] = dataclasses.field(default_factory=dict)


def node_is_schedulable(node: JSON | None) -> bool:
    """Ready=True and none of the node-lifecycle taints (not-ready, unreachable, ...)."""
    if not node:
        return False
    conditions = node.get("status", {}).get("conditions", [])
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
    lifecycle_taints = [
        t for t in node.get("spec", {}).get("taints", []) or [] if t["key"].startswith("node.kubernetes.io/")
    ]
    return ready and not lifecycle_taints


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ---- quantities, env expansion ---------------------------------------------------------------

_SUFFIXES = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
    "n": 1e-9,
    "u": 1e-6,
    "m": 1e-3,
    "": 1,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
}


def parse_quantity(text: str | int | float) -> float:
    """A Kubernetes quantity ("500m", "64Gi", "1e3") as a number."""
    if isinstance(text, (int, float)):
        return float(text)
    match = re.fullmatch(r"([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)", text.strip())
    if not match or match.group(2) not in _SUFFIXES:
        raise ValueError(f"not a quantity: {text!r}")
    return float(match.group(1)) * _SUFFIXES[match.group(2)]


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion: known names expand, $$ escapes, unknown refs stay as they are."""

    def repl(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env[name] if name in env else match.group(0)

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", repl, text)


class ConfigError(Exception):
    """A pod cannot start yet (a ConfigMap or Secret is missing): retried, as the kubelet does."""


# ---- the kubelet endpoint (kubectl logs) -----------------------------------------------------


class _KubeletHandler(http.server.BaseHTTPRequestHandler):
    agent: NodeAgent  # set on the subclass made per server

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("kubelet endpoint: " + format, *args)

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/")]
        if parts == ["healthz"]:
            self._send(200, b"ok")
            return
        if len(parts) != 4 or parts[0] != "containerLogs":
            self._send(404, b"not supported by the node agent")
            return
        _, namespace, name, container = parts
        worker = self.agent.find_worker(namespace, name)
        run = worker.container(container) if worker else None
        if worker is None or run is None:
            self._send(404, f"no container {container} in pod {namespace}/{name} here".encode())
            return
        previous = query.get("previous") in ("true", "1")
        path = run.log_path(run.restart_count - 1 if previous else run.restart_count)
        if not path.exists():
            self._send(400, f"container {container} has no {'previous ' if previous else ''}log".encode())
            return
        data = path.read_bytes()
        if "tailLines" in query:
            lines = data.splitlines(keepends=True)
            data = b"".join(lines[-int(query["tailLines"]) :]) if int(query["tailLines"]) else b""
        if "limitBytes" in query:
            data = data[: int(query["limitBytes"])]
        follow = query.get("follow") in ("true", "1") and not previous
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        if not follow:
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.end_headers()
        self.wfile.write(data)
        position = path.stat().st_size
        with contextlib.suppress(OSError), open(path, "rb") as handle:
            handle.seek(position)
            while True:
                chunk = handle.read(65536)
                if chunk:
                    self.wfile.write(chunk)
                    self.wfile.flush()
                    continue
                if not run.running() or self.agent.stopping.is_set():
                    break
                time.sleep(0.2)

    def _send(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


# ---- containers ------------------------------------------------------------------------------


class ContainerRun:
    """One container of a pod: its process, restarts, probes and reported state."""

    def __init__(self, worker: PodWorker, spec: JSON, *, init: bool) -> None:
        self.worker = worker
        self.spec = spec
        self.name: str = spec["name"]
        self.init = init
        self.dir: Path = worker.dir / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.popen: subprocess.Popen[bytes] | None = None
        self.restart_count = 0
        self.started_at: str | None = None
        self.state: JSON = {"waiting": {"reason": "ContainerCreating"}}
        self.last_state: JSON = {}
        self.exit_code: int | None = None  # of the last finished run
        self.next_start = 0.0  # monotonic time before which no restart happens (back-off)
        self.backoff = BACKOFF_START
        self.ready = False
        self.started = False  # startup probe passed (or none)
        self.done = False  # finished and will not be restarted
        self.probe_state: dict[str, dict[str, Any]] = {}
        self.pull_failed_at = 0.0  # monotonic time of the last failed pull (ErrImagePull)

    def log_path(self, restart: int) -> Path:
        return self.dir / f"{restart}.log"

    @property
    def termination_file(self) -> Path:
        return self.dir / "termination-log"

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    # -- start ---------------------------------------------------------------------------------

    def start(self) -> None:
        worker = self.worker
        image = self.spec.get("image", "")
        host = unpullable(image)
        if host is not None:
            self.pull_failed_at = time.monotonic()
            self.state = {
                "waiting": {
                    "reason": "ErrImagePull",
                    "message": f'failed to pull and unpack image "{image}": failed to resolve reference: '
                    f"dial tcp: lookup {host}: no such host",
                }
            }
            self.next_start = time.monotonic() + self.backoff
            self.backoff = min(self.backoff * 2, BACKOFF_MAX)
            return
        try:
            env = worker.container_env(self.spec)
        except ConfigError as err:
            self.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(err)}}
            self.next_start = time.monotonic() + 1
            return
        entrypoint = self.spec.get("command") or worker.agent.entrypoint_for(self.spec.get("image", ""))
        command = [expand(a, env) for a in entrypoint]
        args = [expand(a, env) for a in self.spec.get("args") or []]
        argv = command + args
        executable = shutil.which(argv[0], path=env.get("PATH")) if argv else None
        if argv and "/" in argv[0]:
            executable = argv[0] if os.access(argv[0], os.X_OK) else None
        if executable is None:
            reason = (
                "no command: the node agent has no image entrypoint"
                if not argv
                else f'exec: "{argv[0]}": executable file not found in $PATH'
            )
            self._finished(128, reason="StartError", message=reason, started=now())
            return
        self.termination_file.write_bytes(b"")
        mounts = worker.mounts_for(self.spec)
        message_path = self.spec.get("terminationMessagePath") or "/dev/termination-log"
        mounts.append((str(self.termination_file), message_path, False, True))
        script = self.dir / "launch.sh"
        script.write_text(_launcher(mounts, self.spec.get("workingDir") or "/"))
        log_file = self.log_path(self.restart_count)
        with open(log_file, "ab") as out:
            self.popen = subprocess.Popen(
                [*self.worker.agent.isolation, "/bin/sh", str(script), *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                cwd="/",
            )
        (self.dir / "pid").write_text(str(self.popen.pid))
        self.started_at = now()
        self.state = {"running": {"startedAt": self.started_at}}
        self.started = "startupProbe" not in self.spec
        self.ready = False
        self.probe_state = {}
        self.exit_code = None
        log.info(
            "pod %s container %s started: pid %d %s", worker.key, self.name, self.popen.pid, shlex.join(argv)
        )

    # -- stop ----------------------------------------------------------------------------------

    def signal(self, sig: int) -> None:
        if self.popen is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, sig)

    def poll(self) -> bool:
        """Record the exit of the process if it has exited; True if it did just now."""
        if self.popen is None or self.popen.poll() is None:
            return False
        code = self.popen.returncode
        code = 128 - code if code < 0 else code
        self.popen = None
        self.signal_group_kill_leftovers()
        self._finished(code, started=self.started_at or now())
        return True

    def signal_group_kill_leftovers(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            pgid = int((self.dir / "pid").read_text())
            os.killpg(pgid, signal.SIGKILL)

    def _finished(
        self, code: int, *, started: str, reason: str | None = None, message: str | None = None
    ) -> None:
        if message is None:
            message = self._termination_message(code)
        terminated = {
            "exitCode": code,
            "reason": reason or ("Completed" if code == 0 else "Error"),
            "startedAt": started,
            "finishedAt": now(),
            "containerID": self.container_id,
        }
        if message:
            terminated["message"] = message
        self.state = {"terminated": terminated}
        self.exit_code = code
        self.ready = False
        self.started = False
        policy = self.worker.restart_policy
        restart = not self.init and (policy == "Always" or (policy == "OnFailure" and code != 0))
        if self.init:
            restart = code != 0 and policy != "Never"
        if restart and not self.worker.deleting:
            self.next_start = time.monotonic() + self.backoff
            self.backoff = min(self.backoff * 2, BACKOFF_MAX)
        else:
            self.done = True
        log.info("pod %s container %s exited %d", self.worker.key, self.name, code)

    def restart_if_due(self) -> None:
        """A finished, restartable container starts again once its back-off has passed."""
        if self.done or self.running() or time.monotonic() < self.next_start or self.worker.deleting:
            return
        if "terminated" in self.state:
            self.last_state = self.state
            self.restart_count += 1
        self.start()

    @property
    def container_id(self) -> str:
        return f"optrun-agent://{self.worker.uid}-{self.name}-{self.restart_count}"

    def _termination_message(self, code: int) -> str:
        try:
            message = self.termination_file.read_bytes()[:MESSAGE_BYTES].decode(errors="replace")
        except OSError:
            message = ""
        if not message and code != 0 and self.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            with contextlib.suppress(OSError):
                lines = self.log_path(self.restart_count).read_bytes().splitlines(keepends=True)
                message = b"".join(lines[-FALLBACK_LINES:])[-FALLBACK_BYTES:].decode(errors="replace")
        return message

    def status(self) -> JSON:
        state, last_state = self.state, self.last_state
        if "terminated" in self.state and not self.done:
            # Between an exit and its restart the kubelet shows the back-off, and the exit as lastState.
            state = {
                "waiting": {
                    "reason": "CrashLoopBackOff",
                    "message": f"back-off restarting failed container {self.name}",
                }
            }
            last_state = self.state
        waiting = state.get("waiting") or {}
        if waiting.get("reason") == "ErrImagePull" and time.monotonic() - self.pull_failed_at > 1:
            # Between two pulls the kubelet shows its back-off.
            state = {
                "waiting": {
                    "reason": "ImagePullBackOff",
                    "message": f'Back-off pulling image "{self.spec.get("image", "")}"',
                }
            }
        status: JSON = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": f"optrun-agent://{self.spec.get('image', '')}",
            "ready": self.ready,
            "restartCount": self.restart_count,
            "started": self.started and self.running(),
            "state": state,
            "lastState": last_state,
        }
        if "waiting" not in self.state or self.restart_count:
            status["containerID"] = self.container_id
        return status

    # -- probes --------------------------------------------------------------------------------

    def run_probes(self) -> None:
        """Run whichever probes are due; liveness or startup failure restarts the container."""
        if not self.running():
            return
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = self.spec.get(kind)
            if probe is None:
                if kind == "readinessProbe":
                    self.ready = self.started
                continue
            if kind != "startupProbe" and not self.started:
                continue
            if kind == "startupProbe" and self.started:
                continue
            state = self.probe_state.setdefault(
                kind, {"next": time.monotonic() + probe.get("initialDelaySeconds", 0), "ok": 0, "fail": 0}
            )
            if time.monotonic() < state["next"]:
                continue
            state["next"] = time.monotonic() + probe.get("periodSeconds", 10)
            passed = self.worker.probe(self, probe)
            if passed:
                state["ok"], state["fail"] = state["ok"] + 1, 0
            else:
                state["ok"], state["fail"] = 0, state["fail"] + 1
            succeeded = state["ok"] >= probe.get("successThreshold", 1)
            failed = state["fail"] >= probe.get("failureThreshold", 3)
            if kind == "readinessProbe":
                if succeeded:
                    self.ready = True
                elif failed:
                    self.ready = False
            elif kind == "startupProbe" and succeeded:
                self.started = True
            elif failed:
                log.info("pod %s container %s failed its %s; restarting", self.worker.key, self.name, kind)
                self.worker.kill(self, self.worker.grace_seconds())
                return


def _launcher(mounts: list[tuple[str, str, bool, bool]], workdir: str) -> str:
    """The shell script that runs inside the new mount namespace, then execs the command.

    mounts: (source on the host, target path, read-only, is-a-file).
    """
    q = shlex.quote
    lines = ["set -e"]
    for source, target, read_only, is_file in mounts:
        if is_file:
            lines.append(
                f"[ -e {q(target)} ] || {{ mkdir -p {q(os.path.dirname(target))}; : > {q(target)}; }}"
            )
        else:
            lines.append(f"mkdir -p {q(target)}")
        lines.append(f"mount --bind {q(source)} {q(target)}")
        if read_only:
            lines.append(f"mount -o remount,bind,ro {q(target)}")
    lines.append(f"cd {q(workdir)}")
    lines.append('exec "$@"')
    return "\n".join(lines) + "\n"


# ---- pods ------------------------------------------------------------------------------------


class PodWorker(threading.Thread):
    """Runs one pod: volumes, init containers, containers, probes, status, deletion."""

    def __init__(self, agent: NodeAgent, pod: JSON, ip: str) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.agent = agent
        self.pod = pod
        self.uid: str = meta["uid"]
        self.namespace: str = meta["namespace"]
        self.pod_name: str = meta["name"]
        self.key = f"{self.namespace}/{self.pod_name}"
        self.ip = ip
        self.dir = Path(agent.config.state_dir) / "pods" / f"{self.namespace}_{self.pod_name}_{self.uid}"
        self.dir.mkdir(parents=True, exist_ok=True)
        spec = pod["spec"]
        self.restart_policy: str = spec.get("restartPolicy", "Always")
        self.init_runs = [ContainerRun(self, c, init=True) for c in spec.get("initContainers") or []]
        self.runs = [ContainerRun(self, c, init=False) for c in spec.get("containers") or []]
        self.start_time = now()
        self.volumes: dict[str, Path] = {}
        self.volume_error: str | None = None
        self.deleting = False
        self.delete_deadline = 0.0
        self.removed = threading.Event()  # the pod object is gone: stop without reporting
        self.deadline_exceeded = False
        self.started_monotonic = time.monotonic()
        self._reported: JSON | None = None
        self._transitions: dict[str, tuple[str, str]] = {}

    # -- helpers used by containers ------------------------------------------------------------

    def container(self, name: str) -> ContainerRun | None:
        return next((r for r in self.init_runs + self.runs if r.name == name), None)

    def grace_seconds(self) -> float:
        return float(self.pod["spec"].get("terminationGracePeriodSeconds", 30))

    def field_value(self, path: str) -> str:
        meta, spec = self.pod["metadata"], self.pod["spec"]
        match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if match:
            return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
        values = {
            "metadata.name": meta["name"],
            "metadata.namespace": meta["namespace"],
            "metadata.uid": meta["uid"],
            "spec.nodeName": spec.get("nodeName", ""),
            "spec.serviceAccountName": spec.get("serviceAccountName", ""),
            "status.hostIP": "127.0.0.1",
            "status.podIP": self.ip,
            "status.podIPs": self.ip,
            "metadata.labels": "\n".join(f'{k}="{v}"' for k, v in sorted((meta.get("labels") or {}).items())),
            "metadata.annotations": "\n".join(
                f'{k}="{v}"' for k, v in sorted((meta.get("annotations") or {}).items())
            ),
        }
        if path not in values:
            raise ConfigError(f"unsupported fieldRef {path}")
        return str(values[path])

    def resource_value(self, ref: JSON, container: JSON | None) -> str:
        if container is None:
            container = next(
                c for c in self.pod["spec"]["containers"] if c["name"] == ref.get("containerName")
            )
        kind, _, resource = ref["resource"].partition(".")
        resources = container.get("resources", {})
        value = (resources.get(kind) or {}).get(resource)
        if value is None and kind == "requests":
            value = (resources.get("limits") or {}).get(resource)
        if value is None:  # no limit: the node's allocatable, as the kubelet reports
            node = self.agent.nodes.get(self.pod["spec"].get("nodeName", ""))
            value = {"cpu": node.cpu, "memory": node.memory}.get(resource, "0") if node else "0"
        divisor = parse_quantity(ref.get("divisor") or "1")
        return str(math.ceil(parse_quantity(value) / divisor))

    def _lookup(self, kind: str, name: str, optional: bool) -> dict[str, str] | None:
        plural = {"ConfigMap": "configmaps", "Secret": "secrets"}[kind]
        obj = self.agent.api.get_or_none(f"/api/v1/namespaces/{self.namespace}/{plural}/{name}")
        if obj is None:
            if optional:
                return None
            raise ConfigError(f'{kind.lower()} "{name}" not found')
        if kind == "Secret":
            return {
                k: base64.b64decode(v).decode(errors="replace") for k, v in (obj.get("data") or {}).items()
            }
        return dict(obj.get("data") or {})

    def container_env(self, container: JSON) -> dict[str, str]:
        agent = self.agent
        env: dict[str, str] = {
            "PATH": f"{agent.venv_bin}:{SYSTEM_PATH}",
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": "C.UTF-8",
            "HOSTNAME": self.pod_name,
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(agent.config.api_port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(agent.config.api_port),
            "KUBERNETES_PORT": f"tcp://127.0.0.1:{agent.config.api_port}",
            **agent.config.extra_env,
        }
        gpus = (container.get("resources", {}).get("limits") or {}).get("nvidia.com/gpu")
        if gpus:
            # What the NVIDIA device plugin sets: the ids of the GPUs allocated (fake ones here).
            env["NVIDIA_VISIBLE_DEVICES"] = ",".join(f"GPU-fake-{i}" for i in range(int(gpus)))
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                if key in source:
                    data = self._lookup(kind, source[key]["name"], source[key].get("optional", False)) or {}
                    env.update({prefix + k: v for k, v in data.items()})
        for var in container.get("env") or []:
            name = var["name"]
            if "valueFrom" not in var:
                env[name] = expand(var.get("value", ""), env)
                continue
            source = var["valueFrom"]
            if "fieldRef" in source:
                env[name] = self.field_value(source["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in source:
                env[name] = self.resource_value(source["resourceFieldRef"], container)
            else:
                for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                    if key in source:
                        ref = source[key]
                        found = self._lookup(kind, ref["name"], ref.get("optional", False))
                        if found is not None and ref["key"] in found:
                            env[name] = found[ref["key"]]
                        elif not ref.get("optional", False):
                            raise ConfigError(
                                f"couldn't find key {ref['key']} in {kind} {self.namespace}/{ref['name']}"
                            )
        return env

    def mounts_for(self, container: JSON) -> list[tuple[str, str, bool, bool]]:
        mounts = []
        for mount in container.get("volumeMounts") or []:
            source = self.volumes[mount["name"]]
            if mount.get("subPath"):
                source = source / mount["subPath"]
                if not source.exists():
                    source.mkdir(parents=True)
            mounts.append((str(source), mount["mountPath"], bool(mount.get("readOnly")), source.is_file()))
        # The kubelet manages every container's /etc/hosts; here it is the agent's cluster DNS.
        mounts.append((str(self.agent.hosts_file), "/etc/hosts", True, True))
        return mounts

    # -- volumes -------------------------------------------------------------------------------

    def _write_files(self, target: Path, files: dict[str, str | bytes], mode: int) -> None:
        target.mkdir(parents=True, exist_ok=True)
        for rel, content in files.items():
            path = target / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content.encode() if isinstance(content, str) else content)
            path.chmod(mode)

    def _keyed_files(self, kind: str, source: JSON) -> dict[str, str | bytes]:
        name = source.get("name") or source.get("secretName", "")
        data = self._lookup(kind, name, source.get("optional", False)) or {}
        items = source.get("items")
        if not items:
            return dict(data)
        files: dict[str, str | bytes] = {}
        for item in items:
            if item["key"] not in data:
                if source.get("optional", False):
                    continue
                raise ConfigError(f"configmap/secret {name} has no key {item['key']}")
            files[item["path"]] = data[item["key"]]
        return files

    def _downward_files(self, items: list[JSON]) -> dict[str, str | bytes]:
        files: dict[str, str | bytes] = {}
        for item in items:
            if "fieldRef" in item:
                files[item["path"]] = self.field_value(item["fieldRef"]["fieldPath"])
            else:
                files[item["path"]] = self.resource_value(item["resourceFieldRef"], None)
        return files

    def materialize_volumes(self) -> None:
        root = self.dir / "volumes"
        for volume in self.pod["spec"].get("volumes") or []:
            name = volume["name"]
            target = root / name
            if "emptyDir" in volume:
                target.mkdir(parents=True, exist_ok=True)
            elif "configMap" in volume:
                self._write_files(
                    target,
                    self._keyed_files("ConfigMap", volume["configMap"]),
                    volume["configMap"].get("defaultMode", 0o644),
                )
            elif "secret" in volume:
                self._write_files(
                    target,
                    self._keyed_files("Secret", volume["secret"]),
                    volume["secret"].get("defaultMode", 0o644),
                )
            elif "downwardAPI" in volume:
                self._write_files(
                    target,
                    self._downward_files(volume["downwardAPI"].get("items", [])),
                    volume["downwardAPI"].get("defaultMode", 0o644),
                )
            elif "projected" in volume:
                files: dict[str, str | bytes] = {}
                for source in volume["projected"].get("sources", []):
                    if "configMap" in source:
                        files.update(self._keyed_files("ConfigMap", source["configMap"]))
                    elif "secret" in source:
                        files.update(self._keyed_files("Secret", source["secret"]))
                    elif "downwardAPI" in source:
                        files.update(self._downward_files(source["downwardAPI"].get("items", [])))
                    elif "serviceAccountToken" in source:
                        files[source["serviceAccountToken"]["path"]] = self._bound_token(
                            source["serviceAccountToken"]
                        )
                self._write_files(target, files, volume["projected"].get("defaultMode", 0o644))
            elif "persistentVolumeClaim" in volume:
                target = self.agent.claim_dir(self.namespace, volume["persistentVolumeClaim"]["claimName"])
            elif "hostPath" in volume:
                target = Path(volume["hostPath"]["path"])
                if volume["hostPath"].get("type") in ("DirectoryOrCreate", "", None):
                    target.mkdir(parents=True, exist_ok=True)
            else:
                raise ConfigError(f"volume {name}: type not supported by the node agent")
            self.volumes[name] = target

    def _bound_token(self, source: JSON) -> str:
        account = self.pod["spec"].get("serviceAccountName", "default")
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "audiences": [source["audience"]] if source.get("audience") else None,
                "expirationSeconds": source.get("expirationSeconds", 3600),
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.pod_name, "uid": self.uid},
            },
        }
        result = self.agent.api.create(
            f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{account}/token", body
        )
        return str(result["status"]["token"])

    # -- probes and hooks ----------------------------------------------------------------------

    def _port(self, container: JSON, port: int | str) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for entry in container.get("ports") or []:
            if entry.get("name") == port:
                return int(entry["containerPort"])
        raise ValueError(f"no port named {port}")

    def _handler(self, run: ContainerRun, handler: JSON, timeout: float) -> bool:
        """Run a probe or hook handler (httpGet, tcpSocket, exec); True on success."""
        try:
            if "httpGet" in handler:
                get = handler["httpGet"]
                scheme = get.get("scheme", "HTTP").lower()
                host = get.get("host") or self.ip
                url = f"{scheme}://{host}:{self._port(run.spec, get['port'])}{get.get('path', '/')}"
                headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or []}
                with requests.Session() as session:
                    session.trust_env = False
                    response = session.get(url, headers=headers, timeout=timeout, verify=False)
                return 200 <= response.status_code < 400
            if "tcpSocket" in handler:
                sock = handler["tcpSocket"]
                with socket.create_connection(
                    (sock.get("host") or self.ip, self._port(run.spec, sock["port"])), timeout=timeout
                ):
                    return True
            if "exec" in handler and run.popen is not None:
                env = self.container_env(run.spec)
                result = subprocess.run(
                    ["nsenter", "-t", str(run.popen.pid), "-m", "--", *handler["exec"]["command"]],
                    env=env,
                    capture_output=True,
                    timeout=timeout,
                )
                return result.returncode == 0
        except (OSError, requests.RequestException, subprocess.TimeoutExpired, ValueError, ConfigError):
            return False
        return False

    def probe(self, run: ContainerRun, probe: JSON) -> bool:
        return self._handler(run, probe, float(probe.get("timeoutSeconds", 1)))

    # -- stopping ------------------------------------------------------------------------------

    def kill(self, run: ContainerRun, grace: float) -> None:
        """preStop hook, SIGTERM to the group, `grace` seconds, SIGKILL; records the exit."""
        if not run.running():
            run.poll()
            return
        deadline = time.monotonic() + grace
        pre_stop = (run.spec.get("lifecycle") or {}).get("preStop")
        if pre_stop:
            self._handler(run, pre_stop, max(grace, 1))
        run.signal(signal.SIGTERM)
        while run.running() and time.monotonic() < deadline and not self.agent.stopping.is_set():
            time.sleep(0.05)
        if run.running():
            run.signal(signal.SIGKILL)
            assert run.popen is not None
            with contextlib.suppress(subprocess.TimeoutExpired):
                run.popen.wait(10)
        run.poll()

    def request_deletion(self, grace: float) -> None:
        if not self.deleting:
            self.deleting = True
            self.delete_deadline = time.monotonic() + grace
            log.info("pod %s deleted; grace %gs", self.key, grace)

    def kill_all(self, grace: float) -> None:
        """Terminate every running container together within one `grace` period."""
        deadline = time.monotonic() + grace
        running = [r for r in self.init_runs + self.runs if r.running()]
        for run in running:
            pre_stop = (run.spec.get("lifecycle") or {}).get("preStop")
            if pre_stop:
                self._handler(run, pre_stop, max(deadline - time.monotonic(), 1))
            run.signal(signal.SIGTERM)
        while any(r.running() for r in running) and time.monotonic() < deadline:
            time.sleep(0.05)
        for run in running:
            if run.running():
                run.signal(signal.SIGKILL)
                assert run.popen is not None
                with contextlib.suppress(subprocess.TimeoutExpired):
                    run.popen.wait(10)
            run.poll()
        for run in self.init_runs + self.runs:
            run.done = True

    # -- status --------------------------------------------------------------------------------

    def phase(self) -> str:
        runs = self.runs
        if self.deadline_exceeded:
            return "Failed"
        if not all(r.done and r.exit_code == 0 for r in self.init_runs):
            if any(r.done and r.exit_code not in (0, None) for r in self.init_runs):
                return "Failed"
            return "Pending"
        if runs and all(r.done for r in runs):
            return "Succeeded" if all(r.exit_code == 0 for r in runs) else "Failed"
        if any(r.running() or r.restart_count or "terminated" in r.state for r in runs):
            return "Running"
        return "Pending"

    def _condition(self, kind: str, ok: bool, reason: str | None = None) -> JSON:
        status = "True" if ok else "False"
        previous = self._transitions.get(kind)
        if previous is None or previous[0] != status:
            self._transitions[kind] = (status, now())
        condition: JSON = {
            "type": kind,
            "status": status,
            "lastProbeTime": None,
            "lastTransitionTime": self._transitions[kind][1],
        }
        if reason and not ok:
            condition["reason"] = reason
        return condition

    def build_status(self) -> JSON:
        initialized = all(r.done and r.exit_code == 0 for r in self.init_runs)
        ready = initialized and bool(self.runs) and all(r.ready and r.running() for r in self.runs)
        scheduled = [
            c for c in self.pod.get("status", {}).get("conditions", []) if c["type"] == "PodScheduled"
        ]
        status: JSON = {
            "phase": self.phase(),
            "hostIP": "127.0.0.1",
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "startTime": self.start_time,
            "conditions": [
                self._condition("Initialized", initialized, "ContainersNotInitialized"),
                self._condition("Ready", ready, "ContainersNotReady"),
                self._condition("ContainersReady", ready, "ContainersNotReady"),
                *scheduled,
                *(
                    c
                    for c in self.pod.get("status", {}).get("conditions", [])
                    if c["type"] not in KUBELET_CONDITIONS
                ),
            ],
            "containerStatuses": [r.status() for r in self.runs],
        }
        if self.init_runs:
            status["initContainerStatuses"] = [r.status() for r in self.init_runs]
        if self.deadline_exceeded:
            status["reason"] = "DeadlineExceeded"
            status["message"] = "Pod was active on the node longer than the specified deadline"
        elif self.volume_error:
            status["message"] = self.volume_error
        return status

    def report(self) -> None:
        if self.removed.is_set():
            return
        status = self.build_status()
        if status == self._reported:
            return
        try:
            self.agent.api.merge_patch(
                f"/api/v1/namespaces/{self.namespace}/pods/{self.pod_name}/status", {"status": status}
            )
            self._reported = status
        except ApiError as err:
            if err.status == 404:
                self.removed.set()
            else:
                log.warning("pod %s: status update failed: %s", self.key, err)
        except requests.RequestException as err:
            log.warning("pod %s: status update failed: %s", self.key, err)

    def finalize(self) -> None:
        """The containers are gone: remove the pod object (grace 0, guarded by its uid)."""
        if self.removed.is_set():
            return
        body = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": self.uid},
        }
        with contextlib.suppress(ApiError, requests.RequestException):
            self.agent.api.delete(f"/api/v1/namespaces/{self.namespace}/pods/{self.pod_name}", body)

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        except Exception:
            log.exception("pod %s: worker failed", self.key)
            self.kill_all(0)
        finally:
            self.agent.forget(self)

    def _run(self) -> None:
        agent = self.agent
        while not (self.deleting or self.removed.is_set() or agent.stopping.is_set()):
            try:
                self.materialize_volumes()
                self.volume_error = None
                break
            except (ConfigError, ApiError) as err:
                # As the kubelet: the pod stays ContainerCreating until the volume can be set up.
                self.volume_error = f"MountVolume.SetUp failed: {err}"
                for run in self.init_runs + self.runs:
                    run.state = {"waiting": {"reason": "ContainerCreating", "message": self.volume_error}}
                self.report()
                time.sleep(1)
        agent.publish(self)
        deadline = self.pod["spec"].get("activeDeadlineSeconds")
        while not agent.stopping.is_set() and not self.removed.is_set():
            if self.deleting:
                self.kill_all(max(0.0, self.delete_deadline - time.monotonic()))
                self.report()
                self.finalize()
                return
            if (
                deadline is not None
                and not self.deadline_exceeded
                and time.monotonic() - self.started_monotonic > float(deadline)
            ):
                self.deadline_exceeded = True
                self.kill_all(self.grace_seconds())
            self._step()
            self.report()
            finished = all(r.done for r in self.init_runs + self.runs)
            # A finished pod only waits for its deletion: look less often.
            time.sleep(LOOP_INTERVAL * (5 if finished else 1))
        if agent.stopping.is_set():
            self.kill_all(min(self.grace_seconds(), agent.shutdown_grace))
        elif self.removed.is_set():
            self.kill_all(0)

    def _step(self) -> None:
        """Advance the pod: init containers one at a time, then all containers together."""
        if self.deadline_exceeded:
            return
        pending_init = next((r for r in self.init_runs if not (r.done and r.exit_code == 0)), None)
        if pending_init is not None:
            if pending_init.done:  # failed for good (restartPolicy Never)
                for run in self.runs:
                    run.done = True
                return
            pending_init.poll()
            if not pending_init.running() and not pending_init.done:
                pending_init.restart_if_due()
            return
        for run in self.runs:
            run.poll()
            if not run.running():
                run.restart_if_due()
            run.run_probes()


# ---- the agent -------------------------------------------------------------------------------


class NodeAgent:
    """Nodes, leases, the pod watch, the PVC provisioner and the kubelet endpoint."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.api = KubeApi(config.server, config.token, config.ca_file)
        self.nodes = {n["name"]: NodeSpec(**n) for n in config.nodes}
        self.stopping = threading.Event()
        self.shutdown_grace = 5.0
        self.venv_bin = os.path.dirname(sys.executable)
        self.workers: dict[str, PodWorker] = {}
        self.lock = threading.Lock()
        self._ip_prefix = f"127.{random.randint(10, 250)}"
        self.hosts_file = Path(config.state_dir) / "hosts"
        self._host_lines: dict[str, str] = {}  # pod uid -> its line in hosts_file
        self._write_hosts()
        self._next_ip = 1
        self._ips_in_use: set[str] = set()
        if os.geteuid() == 0:
            self.isolation = [
                "setpriv",
                "--pdeathsig",
                "KILL",
                "--",
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
            ]
        else:
            self.isolation = [
                "setpriv",
                "--pdeathsig",
                "KILL",
                "--",
                "unshare",
                "--map-root-user",
                "--mount",
                "--propagation",
                "private",
                "--",
            ]
        self._server: http.server.ThreadingHTTPServer | None = None
        self.kubelet_port = 0
        self._threads: list[threading.Thread] = []
        self._started_at = now()

    def entrypoint_for(self, image: str) -> list[str]:
        """The stand-in ENTRYPOINT for `image` (AgentConfig.image_entrypoints), or none."""
        repository = image.split("@", 1)[0]
        head, _, last = repository.rpartition("/")
        repository = (head + "/" if head else "") + last.split(":", 1)[0]
        table = self.config.image_entrypoints
        return list(table.get(repository) or table.get(repository.rpartition("/")[2]) or [])

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._start_kubelet_endpoint()
        self._register_nodes()
        self._ensure_storage_class()
        for target, name in (
            (self._heartbeat_loop, "heartbeat"),
            (self._pod_watch_loop, "pods"),
            (self._provisioner_loop, "provisioner"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Terminate every pod (SIGTERM, up to shutdown_grace seconds, SIGKILL) and stop."""
        self.stopping.set()
        with self.lock:
            workers = list(self.workers.values())
        for worker in workers:
            worker.join(self.shutdown_grace + 15)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # -- the kubelet endpoint ------------------------------------------------------------------

    def _start_kubelet_endpoint(self) -> None:
        handler = type("Handler", (_KubeletHandler,), {"agent": self})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        self._server = server
        self.kubelet_port = server.server_address[1]
        threading.Thread(target=server.serve_forever, name="kubelet-endpoint", daemon=True).start()

    # -- nodes ---------------------------------------------------------------------------------

    def _register_nodes(self) -> None:
        for spec in self.nodes.values():
            body = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": spec.name, "labels": spec.node_labels()},
                "spec": {"taints": spec.taints} if spec.taints else {},
            }
            try:
                self.api.create("/api/v1/nodes", body)
            except ApiError as err:
                if err.status != 409:
                    raise
                self.api.merge_patch(
                    f"/api/v1/nodes/{spec.name}", {"metadata": {"labels": spec.node_labels()}}
                )
            self._update_node_status(spec)
            self._renew_lease(spec)

    def _update_node_status(self, spec: NodeSpec) -> None:
        capacity = {
            "cpu": spec.cpu,
            "memory": spec.memory,
            "pods": str(spec.pods),
            "ephemeral-storage": "500Gi",
            "nvidia.com/gpu": str(spec.gpus),
        }
        heartbeat = now()

        def condition(kind: str, ok: bool, reason: str, message: str) -> JSON:
            return {
                "type": kind,
                "status": "True" if ok else "False",
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": heartbeat,
                "lastTransitionTime": self._started_at,
            }

        status = {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": [
                condition("MemoryPressure", False, "KubeletHasSufficientMemory", "node agent"),
                condition("DiskPressure", False, "KubeletHasNoDiskPressure", "node agent"),
                condition("PIDPressure", False, "KubeletHasSufficientPID", "node agent"),
                condition("Ready", True, "KubeletReady", "optrun node agent is posting ready status"),
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": spec.name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.kubelet_port}},
            "nodeInfo": {
                "machineID": spec.name,
                "systemUUID": spec.name,
                "bootID": self._started_at,
                "kernelVersion": os.uname().release,
                "osImage": "optrun node agent",
                "containerRuntimeVersion": "optrun-agent://0.1",
                "kubeletVersion": "v1.20.2",
                "kubeProxyVersion": "v1.20.2",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }
        self.api.merge_patch(f"/api/v1/nodes/{spec.name}/status", {"status": status})

    def _renew_lease(self, spec: NodeSpec) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{spec.name}"
        patch = {
            "spec": {
                "holderIdentity": spec.name,
                "leaseDurationSeconds": LEASE_SECONDS,
                "renewTime": now_micro(),
            }
        }
        try:
            self.api.merge_patch(path, patch)
        except ApiError as err:
            if err.status != 404:
                raise
            node = self.api.get(f"/api/v1/nodes/{spec.name}")
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {
                    "name": spec.name,
                    "namespace": "kube-node-lease",
                    "ownerReferences": [
                        {
                            "apiVersion": "v1",
                            "kind": "Node",
                            "name": spec.name,
                            "uid": node["metadata"]["uid"],
                        }
                    ],
                },
                **patch,
            }
            self.api.create("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", body)

    def _heartbeat_loop(self) -> None:
        while not self.stopping.wait(HEARTBEAT_SECONDS):
            for spec in self.nodes.values():
                try:
                    self._renew_lease(spec)
                    self._update_node_status(spec)
                except (ApiError, requests.RequestException) as err:
                    log.warning("heartbeat for %s failed: %s", spec.name, err)

    # -- pods ----------------------------------------------------------------------------------

    def find_worker(self, namespace: str, name: str) -> PodWorker | None:
        with self.lock:
            return next(
                (w for w in self.workers.values() if w.namespace == namespace and w.pod_name == name), None
            )

    def forget(self, worker: PodWorker) -> None:
        with self.lock:
            if self.workers.get(worker.uid) is worker:
                del self.workers[worker.uid]
            self._ips_in_use.discard(worker.ip)
            if self._host_lines.pop(worker.uid, None) is not None:
                self._write_hosts()

    # -- cluster DNS ---------------------------------------------------------------------------

    def publish(self, worker: PodWorker) -> None:
        """The pod's DNS name, when it has a hostname and a subdomain that names a headless Service
        of its namespace selecting it (what CoreDNS serves for such a pod)."""
        spec, meta = worker.pod["spec"], worker.pod["metadata"]
        host, subdomain = spec.get("hostname"), spec.get("subdomain")
        if not host or not subdomain:
            return
        try:
            service = self.api.get(f"/api/v1/namespaces/{worker.namespace}/services/{subdomain}")
        except ApiError as err:
            log.info("pod %s: no Service %s (%s): no DNS name", worker.key, subdomain, err)
            return
        selector = (service.get("spec") or {}).get("selector") or {}
        labels = meta.get("labels") or {}
        if service["spec"].get("clusterIP") != "None" or any(labels.get(k) != v for k, v in selector.items()):
            log.info(
                "pod %s: Service %s is not headless or does not select it: no DNS name", worker.key, subdomain
            )
            return
        fqdn = f"{host}.{subdomain}.{worker.namespace}.svc.cluster.local"
        with self.lock:
            self._host_lines[worker.uid] = f"{worker.ip} {fqdn} {host}.{subdomain} {host}"
            self._write_hosts()

    def _write_hosts(self) -> None:
        """Rewrite the hosts file in place (open with truncation keeps its inode: the bind mounts of
        running containers see the new content); the caller holds the lock, or is __init__."""
        base = Path("/etc/hosts").read_text() if Path("/etc/hosts").exists() else "127.0.0.1 localhost\n"
        text = (
            base.rstrip("\n")
            + "\n# pods of the node agent\n"
            + "".join(l + "\n" for l in self._host_lines.values())
        )
        self.hosts_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.hosts_file, "w") as out:
            out.write(text)

    def _allocate_ip(self) -> str:
        while True:
            n = self._next_ip
            self._next_ip = self._next_ip % (254 * 254) + 1
            ip = f"{self._ip_prefix}.{(n - 1) // 254}.{(n - 1) % 254 + 1}"
            if ip not in self._ips_in_use:
                self._ips_in_use.add(ip)
                return ip

    def _handle_pod(self, kind: str, pod: JSON) -> None:
        if pod["spec"].get("nodeName") not in self.nodes:
            return
        meta = pod["metadata"]
        with self.lock:
            worker = self.workers.get(meta["uid"])
            if kind == "DELETED":
                if worker is not None:
                    worker.removed.set()
                return
            if worker is None:
                if meta.get("deletionTimestamp"):
                    # Deleted before (or after) we ran it: nothing runs, so finish the deletion.
                    threading.Thread(
                        target=PodWorker.finalize, args=(_Finalizer(self, pod),), daemon=True
                    ).start()
                    return
                if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                    return
                worker = PodWorker(self, pod, self._allocate_ip())
                self.workers[meta["uid"]] = worker
                worker.start()
                return
        worker.pod = pod
        if meta.get("deletionTimestamp"):
            worker.request_deletion(float(meta.get("deletionGracePeriodSeconds") or 0))

    def _pod_watch_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                listing = self.api.get("/api/v1/pods")
                seen = set()
                for pod in listing["items"]:
                    seen.add(pod["metadata"]["uid"])
                    self._handle_pod("ADDED", pod)
                with self.lock:
                    gone = [w for uid, w in self.workers.items() if uid not in seen]
                for worker in gone:
                    worker.removed.set()
                version = listing["metadata"]["resourceVersion"]
                while not self.stopping.is_set():
                    for event in self.api.watch("/api/v1/pods", resource_version=version, timeout_seconds=60):
                        obj = event["object"]
                        version = obj["metadata"]["resourceVersion"]
                        if event["type"] != "BOOKMARK":
                            self._handle_pod(event["type"], obj)
            except ApiError as err:
                if err.status != 410:
                    log.warning("pod watch: %s", err)
                    self.stopping.wait(1)
            except (requests.RequestException, ValueError) as err:
                log.warning("pod watch: %s", err)
                self.stopping.wait(1)

    # -- PVCs ----------------------------------------------------------------------------------

    def claim_dir(self, namespace: str, claim: str) -> Path:
        path = Path(self.config.state_dir) / "pvcs" / namespace / claim
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _ensure_storage_class(self) -> None:
        body = {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {
                "name": "standard",
                "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
            },
            "provisioner": PROVISIONER,
            "reclaimPolicy": "Delete",
            "volumeBindingMode": "Immediate",
        }
        with contextlib.suppress(ApiError):
            self.api.create("/apis/storage.k8s.io/v1/storageclasses", body)

    def _provisioner_loop(self) -> None:
        """Give each unbound claim a hostPath volume; delete released volumes we made."""
        while not self.stopping.wait(1):
            try:
                for claim in self.api.get("/api/v1/persistentvolumeclaims")["items"]:
                    if (
                        not claim["spec"].get("volumeName")
                        and claim.get("status", {}).get("phase") == "Pending"
                    ):
                        self._provision(claim)
                volumes = self.api.get(
                    "/api/v1/persistentvolumes", labelSelector=f"{PROVISIONED_LABEL}={AGENT_NAME}"
                )
                for volume in volumes["items"]:
                    if volume.get("status", {}).get("phase") == "Released":
                        ref = volume["spec"]["claimRef"]
                        self.api.delete(f"/api/v1/persistentvolumes/{volume['metadata']['name']}")
                        shutil.rmtree(
                            Path(self.config.state_dir) / "pvcs" / ref["namespace"] / ref["name"],
                            ignore_errors=True,
                        )
            except (ApiError, requests.RequestException) as err:
                log.warning("provisioner: %s", err)

    def _provision(self, claim: JSON) -> None:
        meta, spec = claim["metadata"], claim["spec"]
        path = self.claim_dir(meta["namespace"], meta["name"])
        body: JSON = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {
                "name": f"pvc-{meta['uid']}",
                "labels": {PROVISIONED_LABEL: AGENT_NAME},
                "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER},
            },
            "spec": {
                "capacity": {"storage": spec.get("resources", {}).get("requests", {}).get("storage", "1Gi")},
                "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": spec.get("storageClassName") or "",
                "hostPath": {"path": str(path), "type": "DirectoryOrCreate"},
                "claimRef": {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "namespace": meta["namespace"],
                    "name": meta["name"],
                    "uid": meta["uid"],
                },
            },
        }
        with contextlib.suppress(ApiError):
            self.api.create("/api/v1/persistentvolumes", body)
            log.info(
                "provisioned %s for claim %s/%s", body["metadata"]["name"], meta["namespace"], meta["name"]
            )


class _Finalizer:
    """Just enough of a PodWorker to finish the deletion of a pod that never ran here."""

    def __init__(self, agent: NodeAgent, pod: JSON) -> None:
        self.agent = agent
        self.namespace = pod["metadata"]["namespace"]
        self.pod_name = pod["metadata"]["name"]
        self.uid = pod["metadata"]["uid"]
        self.removed = threading.Event()


def iter_pod_dirs(state_dir: Path) -> Iterator[Path]:
    """Every pod directory the agent made under `state_dir` (for tests that read logs)."""
    yield from sorted((state_dir / "pods").glob("*_*_*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.nodeagent", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", required=True, type=Path, help="AgentConfig as JSON")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(threadName)s %(message)s",
    )
    config = AgentConfig(**json.loads(args.config.read_text()))
    agent = NodeAgent(config)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    agent.start()
    log.info(
        "node agent up: nodes %s, kubelet endpoint 127.0.0.1:%d", ", ".join(agent.nodes), agent.kubelet_port
    )
    done.wait()
    log.info("node agent stopping")
    agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
