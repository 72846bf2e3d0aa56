"""The children of an OptimizationRun, as pure functions: the same run in, the same manifests out.

A run owns one ConfigMap (`<run>-spec`: the whole run as the runtime reads it) and one Pod per
attempt (`<run>-attempt-<n>`). The names are deterministic, so an operator that restarts between
creating a pod and recording it finds that pod (create answers 409) instead of making a second
one for the same attempt. Both children carry an owner reference to the run with `controller`
and `blockOwnerDeletion`, so deleting the run deletes them (the garbage collector does it, not
the operator).

The ConfigMap is written at the first attempt and never updated (it is `immutable`): every
attempt of a run, resumed from a checkpoint, trains under the spec that made that checkpoint.
The pod shape (image, resources, scheduling) is built from the current spec at each attempt, so
raising `resources.memory` after an OOMKilled attempt helps the next one.

A run that succeeds gets one more child, `<run>-result` (`result_configmap`): its result as the
pod's termination message gave it (the compact result contract), immutable, so that a later run
of the same namespace can name it as its baseline (`spec.acceptance.baseline.run`): that run's
pods mount it, optional (a baseline that has not succeeded is a failed test of the runtime's,
not a pod that cannot start), and the runtime reads it at `BASELINE_ENV`.

A run of `spec.distributed.nodes` N > 1 has N pods per attempt (`<run>-attempt-<n>-<index>`), each
with the stable hostname `<run>-<index>` in the subdomain of the run's headless Service `<run>`
(`service`), so `<run>-0.<run>` names pod 0 in every attempt. Each pod runs torchrun with a c10d
rendezvous hosted by pod 0 (`rendezvous_args`); global rank 0, which writes the result, is on
pod 0. The pods of an attempt form a Kueue pod group (admitted whole, as a gang).

Nothing here talks to the API server; `optrun.operator.reconcile` decides what to create.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import yaml

from optrun.api import v1alpha1 as api
from optrun.api.errors import ManifestError
from optrun.api.result import BASELINE_ENV
from optrun.operator.config import OperatorConfig

# Labels: the app.kubernetes.io set for people and dashboards, optrun.io/* for the operator's
# own selectors (it watches pods by run-uid: a run deleted and re-created under the same name
# must not adopt the old run's pods).
LABEL_RUN = "optrun.io/run"
LABEL_RUN_UID = "optrun.io/run-uid"
LABEL_ATTEMPT = "optrun.io/attempt"
LABEL_INDEX = "optrun.io/node-index"  # the pod's place in a multi-node attempt (0 hosts rank 0)
# Kueue's plain-pod groups: pods sharing the group label are admitted together once the
# annotated count of them exists (https://kueue.sigs.k8s.io/docs/tasks/run/plain_pods/).
KUEUE_POD_GROUP = "kueue.x-k8s.io/pod-group-name"
KUEUE_POD_GROUP_COUNT = "kueue.x-k8s.io/pod-group-total-count"
# The run's labels and annotations under these prefixes reach its pods: what a batch scheduler
# reads from a pod (Kueue's queue-name and priority-class, a coscheduling pod group).
SCHEDULER_PREFIXES = ("kueue.x-k8s.io/", "scheduling.x-k8s.io/")
MANAGED_BY = "optrun-operator"

CONTAINER = "runtime"
METRICS_PORT_NAME = "metrics"
SPEC_DIR = "/etc/optrun"
SPEC_FILE = "run.yaml"
OUTPUT_DIR = "/var/lib/optrun"  # the checkpoint volume: checkpoints/ and the report
SCRATCH_DIR = "/scratch"  # writable scratch under a read-only root filesystem
SHM_DIR = "/dev/shm"  # memory-backed: NCCL and torch's worker processes share memory through it
RENDEZVOUS_PORT_NAME = "rendezvous"
TERMINATION_LOG = "/dev/termination-log"
RESULT_FILE = "result.json"  # the key of <run>-result
BASELINE_DIR = "/etc/optrun-baseline"  # where a pod finds its baseline run's <run>-result
# The runtime image's non-root user (distroless "nonroot"); fsGroup makes the volumes writable to it.
RUNTIME_UID = 65532
# libyaml's emitter when PyYAML has it: the pure-Python one costs ~30 ms per spec, which is most of
# what creating a run costs the operator when a thousand arrive at once.
_DUMPER: type[yaml.SafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
# Seconds of the pod's grace period kept back from the runtime's own checkpoint deadline, so
# it exits by itself before the kubelet's SIGKILL.
GRACE_MARGIN_SECONDS = 10


@dataclasses.dataclass(frozen=True)
class Run:
    """An OptimizationRun as the builders need it: identity and the validated spec."""

    name: str
    namespace: str
    uid: str
    spec: api.OptimizationRunSpec
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)  # the run's own metadata
    annotations: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Run:
        """Validate a run object as the API server returned it; ManifestError names each bad field."""
        meta = body.get("metadata") or {}
        spec = api.parse_manifest(dict(body))
        if not meta.get("uid") or not meta.get("namespace"):
            raise ManifestError(["metadata: uid and namespace are required (not a stored object)"])
        return cls(
            name=str(meta["name"]),
            namespace=str(meta["namespace"]),
            uid=str(meta["uid"]),
            spec=spec,
            labels=dict(meta.get("labels") or {}),
            annotations=dict(meta.get("annotations") or {}),
        )

    @property
    def nodes(self) -> int:
        return self.spec.distributed.nodes


def configmap_name(run_name: str) -> str:
    return f"{run_name}-spec"


def result_configmap_name(run_name: str) -> str:
    return f"{run_name}-result"


def pod_name(run_name: str, attempt: int, index: int | None = None) -> str:
    """Attempt n's pod; in a multi-node run, its pod for node `index`."""
    return f"{run_name}-attempt-{attempt}" + (f"-{index}" if index is not None else "")


def pod_names(run_name: str, attempt: int, nodes: int) -> list[str]:
    """Every pod of attempt n, by node index (index 0 hosts rank 0)."""
    if nodes <= 1:
        return [pod_name(run_name, attempt)]
    return [pod_name(run_name, attempt, i) for i in range(nodes)]


def service_name(run_name: str) -> str:
    """The headless Service of a multi-node run: the pods' subdomain."""
    return run_name


def hostname(run_name: str, index: int) -> str:
    return f"{run_name}-{index}"


def attempt_of(pod: Mapping[str, Any]) -> int | None:
    """The attempt number a pod was created for (its label), or None for a pod that is not ours."""
    raw = ((pod.get("metadata") or {}).get("labels") or {}).get(LABEL_ATTEMPT)
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def owner_reference(run: Run) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "name": run.name,
        "uid": run.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def labels(run: Run) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "optrun",
        "app.kubernetes.io/component": "runtime",
        "app.kubernetes.io/instance": run.name,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_RUN: run.name,
        LABEL_RUN_UID: run.uid,
    }


def spec_document(run: Run) -> dict[str, Any]:
    """The run as the runtime reads it: apiVersion, kind, metadata (name, namespace) and the spec,
    with every default filled in, so the file says exactly what the attempt runs."""
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": run.name, "namespace": run.namespace},
        "spec": run.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
    }


def configmap(run: Run, cfg: OperatorConfig) -> dict[str, Any]:
    """`<run>-spec`: the run's spec file, immutable (see the module docstring)."""
    del cfg  # the ConfigMap depends on the run alone; the parameter keeps the builders uniform
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": configmap_name(run.name),
            "namespace": run.namespace,
            "labels": labels(run),
            "ownerReferences": [owner_reference(run)],
        },
        "immutable": True,
        "data": {SPEC_FILE: yaml.dump(spec_document(run), Dumper=_DUMPER, sort_keys=False)},
    }


def result_configmap(run: Run, message: str) -> dict[str, Any]:
    """`<run>-result`: the succeeded run's compact result (its termination message), immutable;
    what a later run's spec.acceptance.baseline.run compares with."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": result_configmap_name(run.name),
            "namespace": run.namespace,
            "labels": labels(run),
            "ownerReferences": [owner_reference(run)],
        },
        "immutable": True,
        "data": {RESULT_FILE: message},
    }


def is_result_configmap(manifest: Mapping[str, Any]) -> bool:
    meta = manifest.get("metadata") or {}
    return manifest.get("kind") == "ConfigMap" and str(meta.get("name", "")).endswith("-result")


def _baseline_run(run: Run) -> str | None:
    baseline = run.spec.acceptance.baseline
    return baseline.run if baseline is not None else None


def _checkpoint_volume(run: Run) -> dict[str, Any]:
    # With a claim, checkpoints outlive the pod and a new attempt resumes from them. Without one,
    # the operator creates no storage the user did not ask for (size, class and lifetime are the
    # user's decisions): an emptyDir, so a new attempt starts from step 0.
    claim = run.spec.training.checkpoint.claim_name
    if claim:
        return {"name": "checkpoints", "persistentVolumeClaim": {"claimName": claim}}
    return {"name": "checkpoints", "emptyDir": {}}


# The pod's own volumes take these names; a user's volume is prefixed so it can never clash.
USER_VOLUME_PREFIX = "user-"


def _user_volumes(run: Run) -> list[dict[str, Any]]:
    """spec.volumes: the claims holding the user's model and data, read-only."""
    return [
        {
            "name": USER_VOLUME_PREFIX + v.name,
            "persistentVolumeClaim": {"claimName": v.claim_name, "readOnly": True},
        }
        for v in run.spec.volumes
    ]


def _user_mounts(run: Run) -> list[dict[str, Any]]:
    mounts = []
    for v in run.spec.volumes:
        mount: dict[str, Any] = {
            "name": USER_VOLUME_PREFIX + v.name,
            "mountPath": v.mount_path,
            "readOnly": True,
        }
        if v.sub_path:
            mount["subPath"] = v.sub_path
        mounts.append(mount)
    return mounts


def _tolerations(run: Run, cfg: OperatorConfig) -> list[dict[str, Any]]:
    own = [t.model_dump(by_alias=True, exclude_none=True) for t in run.spec.scheduling.tolerations]
    # The operator's defaults let a pod onto tainted GPU nodes: a run without GPUs stays off them.
    defaults = cfg.default_tolerations if run.spec.resources.gpus else []
    merged: list[dict[str, Any]] = []
    for toleration in [*defaults, *own]:
        if toleration not in merged:
            merged.append(dict(toleration))
    return merged


def _resources(run: Run, cfg: OperatorConfig) -> dict[str, Any]:
    r = run.spec.resources
    amounts: dict[str, Any] = {"cpu": r.cpu, "memory": r.memory}
    if r.gpus:
        amounts[cfg.gpu_resource] = str(r.gpus)
    # Requests equal to limits: the Guaranteed QoS class, so the kubelet evicts this pod last.
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _env(run: Run, attempt: int, cfg: OperatorConfig) -> list[dict[str, Any]]:
    def field(name: str, path: str) -> dict[str, Any]:
        return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}

    env = [
        field("POD_NAME", "metadata.name"),
        field("POD_NAMESPACE", "metadata.namespace"),
        field("POD_UID", "metadata.uid"),
        field("POD_IP", "status.podIP"),
        field("NODE_NAME", "spec.nodeName"),
        {"name": "OPTRUN_RUN_NAME", "value": run.name},
        {"name": "OPTRUN_ATTEMPT", "value": str(attempt)},
        # The runtime checkpoints on SIGTERM and must be done before the kubelet's SIGKILL.
        {
            "name": "OPTRUN_TERM_GRACE",
            "value": str(max(1, cfg.termination_grace_seconds - GRACE_MARGIN_SECONDS)),
        },
        # The root filesystem is read-only: every cache and temporary file goes to the scratch volume.
        {"name": "HOME", "value": SCRATCH_DIR},
        {"name": "TMPDIR", "value": SCRATCH_DIR},
        {"name": "XDG_CACHE_HOME", "value": f"{SCRATCH_DIR}/.cache"},
        {"name": "MPLCONFIGDIR", "value": f"{SCRATCH_DIR}/.config/matplotlib"},
        {"name": "TRITON_CACHE_DIR", "value": f"{SCRATCH_DIR}/.triton"},
        {"name": "TORCHINDUCTOR_CACHE_DIR", "value": f"{SCRATCH_DIR}/.inductor"},
    ]
    if run.spec.resources.gpus == 0:
        env.append({"name": "OPTRUN_DEVICE", "value": "cpu"})  # no GPU asked for: do not probe one
    if _baseline_run(run):
        env.append({"name": BASELINE_ENV, "value": f"{BASELINE_DIR}/{RESULT_FILE}"})
    return env


def pod(
    run: Run,
    attempt: int,
    cfg: OperatorConfig,
    *,
    index: int = 0,
    active_deadline_seconds: int | None = None,
) -> dict[str, Any]:
    """The runtime pod of one attempt (in a multi-node run: its pod for node `index`).

    `active_deadline_seconds`: what is left of the run's spec.activeDeadlineSeconds; the kubelet
    enforces it even while the operator is down."""
    if attempt < 1:
        raise ValueError(f"attempt: {attempt} is out of range; allowed: >= 1")
    if not 0 <= index < run.nodes:
        raise ValueError(f"index: {index} is out of range; allowed: 0 to {run.nodes - 1}")
    spec = run.spec
    port = cfg.runtime_metrics_port
    node_selector = dict(spec.scheduling.node_selector)
    if spec.resources.gpu_product:
        node_selector[cfg.gpu_product_label] = spec.resources.gpu_product
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image or cfg.runtime_image,
        "imagePullPolicy": cfg.image_pull_policy,
        "command": [
            *launcher(run, attempt, index, cfg),
            "runtime",
            "--spec",
            f"{SPEC_DIR}/{SPEC_FILE}",
            "--output",
            OUTPUT_DIR,
            "--metrics-port",
            str(port),
            "--metrics-addr",
            cfg.runtime_metrics_address,
            "--termination-log",
            TERMINATION_LOG,
        ],
        "ports": [
            {"name": METRICS_PORT_NAME, "containerPort": port, "protocol": "TCP"},
            *(
                [{"name": RENDEZVOUS_PORT_NAME, "containerPort": cfg.rendezvous_port, "protocol": "TCP"}]
                if run.nodes > 1
                else []
            ),
        ],
        "env": _env(run, attempt, cfg),
        "resources": _resources(run, cfg),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUNTIME_UID,
            "runAsGroup": RUNTIME_UID,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "spec", "mountPath": SPEC_DIR, "readOnly": True},
            {"name": "checkpoints", "mountPath": OUTPUT_DIR},
            {"name": "scratch", "mountPath": SCRATCH_DIR},
            {"name": "shm", "mountPath": SHM_DIR},
            *_user_mounts(run),
        ],
        "terminationMessagePath": TERMINATION_LOG,
        # The result contract is the termination message; a crash leaves the log's tail instead.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: dict[str, Any] = {
        # The operator retries, as a new attempt with a new pod: a kubelet restart in place would
        # hide the failure from the attempt count and from backoffLimit.
        "restartPolicy": "Never",
        # The runtime never talks to the API server: no token in the pod.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": cfg.termination_grace_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUNTIME_UID,
            "runAsGroup": RUNTIME_UID,
            "fsGroup": RUNTIME_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "spec", "configMap": {"name": configmap_name(run.name)}},
            _checkpoint_volume(run),
            {"name": "scratch", "emptyDir": {}},
            # A container runtime's /dev/shm is 64 MiB: NCCL's buffers and torch's inter-process
            # tensors need more, in memory (it counts against the memory limit).
            {"name": "shm", "emptyDir": {"medium": "Memory"}},
            *_user_volumes(run),
        ],
    }
    baseline = _baseline_run(run)
    if baseline:
        pod_spec["volumes"].append(
            {"name": "baseline", "configMap": {"name": result_configmap_name(baseline), "optional": True}}
        )
        container["volumeMounts"].append({"name": "baseline", "mountPath": BASELINE_DIR, "readOnly": True})
    tolerations = _tolerations(run, cfg)
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    sched = spec.scheduling
    if sched.priority_class_name:
        pod_spec["priorityClassName"] = sched.priority_class_name
    if sched.runtime_class_name:
        pod_spec["runtimeClassName"] = sched.runtime_class_name
    if sched.service_account_name:
        pod_spec["serviceAccountName"] = sched.service_account_name
    if sched.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": secret} for secret in sched.image_pull_secrets]
    if active_deadline_seconds is not None:
        pod_spec["activeDeadlineSeconds"] = max(1, int(active_deadline_seconds))
    pod_labels = {**_for_scheduler(run.labels), **labels(run), LABEL_ATTEMPT: str(attempt)}
    annotations = _for_scheduler(run.annotations)
    multi = run.nodes > 1
    if multi:
        # A stable name per node index: <run>-<index>.<run> resolves to this attempt's pod.
        pod_spec["hostname"] = hostname(run.name, index)
        pod_spec["subdomain"] = service_name(run.name)
        pod_labels[LABEL_INDEX] = str(index)
        # One gang per attempt: Kueue admits the attempt's pods together or not at all.
        pod_labels[KUEUE_POD_GROUP] = pod_name(run.name, attempt)
        annotations[KUEUE_POD_GROUP_COUNT] = str(run.nodes)
    metadata: dict[str, Any] = {
        "name": pod_name(run.name, attempt, index if multi else None),
        "namespace": run.namespace,
        "labels": pod_labels,
        "ownerReferences": [owner_reference(run)],
    }
    if annotations:
        metadata["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}


def pods(
    run: Run, attempt: int, cfg: OperatorConfig, *, active_deadline_seconds: int | None = None
) -> list[dict[str, Any]]:
    """Every pod of one attempt, by node index."""
    return [
        pod(run, attempt, cfg, index=i, active_deadline_seconds=active_deadline_seconds)
        for i in range(run.nodes)
    ]


def _for_scheduler(meta: Mapping[str, str]) -> dict[str, str]:
    """The run's labels or annotations a batch scheduler reads (SCHEDULER_PREFIXES)."""
    return {k: v for k, v in meta.items() if k.startswith(SCHEDULER_PREFIXES)}


def launcher(run: Run, attempt: int, index: int, cfg: OperatorConfig) -> list[str]:
    """What starts the runtime: `optrun` for one rank; torchrun (`... -m optrun.cli`) for more.

    Several nodes meet in a c10d rendezvous on pod 0 (`<run>-0.<run>`, cfg.rendezvous_port), the
    id the run's uid and the attempt (a restarted group never meets a stale one). Pod 0 hosts the
    rendezvous store (`is_host`), and each pod names itself by its stable hostname (`--local-addr`):
    c10d ranks the nodes by that name, so pod 0 (`<run>-0...` sorts first) holds global rank 0,
    which writes the result. torchrun never restarts ranks itself (`--max-restarts 0`): a failure
    ends the attempt, and the operator restarts the whole group."""
    spec = run.spec
    if spec.world_size <= 1:
        return ["optrun"]
    args = [
        "python",
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(run.nodes),
        "--nproc-per-node",
        str(spec.processes_per_node),
        "--max-restarts",
        "0",
    ]
    if run.nodes == 1:
        args.append("--standalone")
    else:
        subdomain = service_name(run.name)
        args += [
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"{hostname(run.name, 0)}.{subdomain}:{cfg.rendezvous_port}",
            "--rdzv-id",
            f"{run.uid}-{attempt}",
            "--rdzv-conf",
            f"is_host={1 if index == 0 else 0},join_timeout={cfg.rendezvous_timeout_seconds}",
            "--local-addr",
            f"{hostname(run.name, index)}.{subdomain}",
        ]
    return [*args, "-m", "optrun.cli"]


def service(run: Run, cfg: OperatorConfig) -> dict[str, Any]:
    """`<run>`: the headless Service of a multi-node run. Its selector (the run's uid) and the pods'
    hostname/subdomain give every pod the DNS name `<run>-<index>.<run>`; addresses are published
    before the pods are ready, since the rendezvous happens before anything could be."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(run.name),
            "namespace": run.namespace,
            "labels": labels(run),
            "ownerReferences": [owner_reference(run)],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_RUN_UID: run.uid},
            "ports": [
                {
                    "name": RENDEZVOUS_PORT_NAME,
                    "port": cfg.rendezvous_port,
                    "targetPort": cfg.rendezvous_port,
                    "protocol": "TCP",
                }
            ],
        },
    }
