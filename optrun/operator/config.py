"""The operator's configuration: one pydantic model, filled once at start-up.

Every field can be set on the command line (`--runtime-image IMAGE`) or in the environment
(`OPTRUN_OPERATOR_RUNTIME_IMAGE=IMAGE`); the flag wins. Both are derived from the model's
fields, so there is no hand-written parsing per variable: a new field is a new option
everywhere, with its description as the help text. Lists and mappings are given as JSON.
The model is validated once, at the edge; the rest of the operator receives it as an argument
(never a module-level singleton).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from optrun import __version__
from optrun.api.errors import ManifestError, manifest_errors

ENV_PREFIX = "OPTRUN_OPERATOR_"


class OperatorConfig(BaseModel):
    """What the operator needs to know that is not in an OptimizationRun."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    namespaces: list[str] = Field(
        default_factory=list,
        description="Namespaces to watch (JSON list); empty: every namespace (needs a ClusterRole).",
    )
    runtime_image: str = Field(
        f"ghcr.io/optrun/optrun-runtime:{__version__}",
        min_length=1,
        description="Runtime image for runs whose spec.image is unset.",
    )
    image_pull_policy: str = Field(
        "IfNotPresent", pattern="^(Always|IfNotPresent|Never)$", description="Runtime pods' imagePullPolicy."
    )
    gpu_resource: str = Field("nvidia.com/gpu", description="Extended resource name of a GPU.")
    gpu_product_label: str = Field(
        "nvidia.com/gpu.product",
        description="Node label holding the GPU product (GPU feature discovery); spec.resources.gpuProduct selects on it.",
    )
    default_tolerations: list[dict[str, str]] = Field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        description="Tolerations every runtime pod with GPUs gets (JSON list), before the run's own.",
    )
    runtime_metrics_port: int = Field(
        9090,
        ge=1,
        le=65535,
        description="Port the runtime serves /metrics on (the pod's named port 'metrics').",
    )
    runtime_metrics_address: str = Field(
        "0.0.0.0",
        min_length=1,
        description=(
            "Address the runtime's /metrics listens on: 0.0.0.0 (every address of the pod, so kubectl "
            "port-forward works), or $(POD_IP) where pods share one network namespace."
        ),
    )
    rendezvous_port: int = Field(
        29400,
        ge=1,
        le=65535,
        description="Port of torchrun's c10d rendezvous on pod 0 of a multi-node run (through its headless Service).",
    )
    rendezvous_timeout_seconds: int = Field(
        600,
        ge=10,
        le=86_400,
        description="How long the pods of a multi-node attempt wait for one another at the rendezvous.",
    )
    scrape_interval_seconds: float = Field(
        10.0,
        gt=0.0,
        le=3600.0,
        description="Seconds between two looks at a live run: metrics scrape, live gates, deadlines, TTL.",
    )
    scrape_timeout_seconds: float = Field(2.0, gt=0.0, le=60.0, description="Timeout of one metrics scrape.")
    live_gate_grace_seconds: float = Field(
        30.0,
        ge=0.0,
        le=3600.0,
        description=(
            "After the recovery budget is seen spent, seconds the runtime gets to stop training by itself "
            "(it writes a judged result) before the operator ends the attempt."
        ),
    )
    runtime_startup_seconds: float = Field(
        120.0,
        ge=0.0,
        le=3600.0,
        description=(
            "Seconds a runtime may take to report its first progress (imports, device detection) before the "
            "hang gate (spec.safety.hangTimeoutSeconds) applies to it."
        ),
    )
    termination_grace_seconds: int = Field(
        60, ge=1, le=3600, description="Runtime pods' terminationGracePeriodSeconds (checkpoint on SIGTERM)."
    )
    metrics_port: int = Field(
        8000, ge=0, le=65535, description="Port of the operator's own /metrics; 0: off."
    )
    health_port: int = Field(
        8080, ge=0, le=65535, description="Port of the liveness endpoint /healthz; 0: off."
    )
    peering_name: str = Field(
        "optrun", min_length=1, description="KopfPeering object shared by the replicas."
    )
    peering_mode: str = Field(
        "auto",
        pattern="^(auto|mandatory|standalone)$",
        description="auto: peer if the peering object exists; mandatory: fail without it; standalone: never peer.",
    )
    peering_lifetime_seconds: int = Field(
        15,
        ge=5,
        le=600,
        description="How long a replica's keep-alive counts; a killed active replica is replaced after at most this.",
    )
    priority: int | None = Field(
        None,
        description=(
            "Peering priority; default: minus the start time in microseconds, so the longest-running replica "
            "stays active and a restarted one waits."
        ),
    )
    status_batch_seconds: float = Field(
        1.0,
        ge=0.0,
        le=60.0,
        description=(
            "A run's status is written at most once per this many seconds, with every change of the window in "
            "one write (as the Job controller batches pod events); 0: each change at once."
        ),
    )
    workers: int = Field(
        16, ge=1, le=512, description="Threads running handlers (each holds at most one API call at a time)."
    )
    api_timeout_seconds: float = Field(
        30.0, gt=0.0, le=600.0, description="Timeout of one API request made by the operator."
    )
    api_retry_max_seconds: float = Field(
        30.0,
        gt=0.0,
        le=600.0,
        description=(
            "The longest wait between two tries of a failed API request. kopf's requests (its watches, "
            "patches, peering) are tried again 1, 1, 2, 3, 5, ... seconds apart up to this and never given "
            "up, so an API server away or refusing for minutes (an upgrade, an authorizer still warming up) "
            "is waited out, as client-go's informers do; the operator's own failed writes wait at most this."
        ),
    )
    retry_backoff_seconds: float = Field(
        10.0,
        ge=0.0,
        le=3600.0,
        description=(
            "Back-off before the attempt after a failed one, doubled per failed attempt (as Jobs do); 0: at once. "
            "A disrupted attempt (eviction, preemption, node drain) is restarted at once."
        ),
    )
    retry_backoff_max_seconds: float = Field(
        360.0, ge=0.0, le=86400.0, description="The longest back-off between two attempts."
    )
    image_pull_timeout_seconds: float = Field(
        300.0,
        ge=0.0,
        le=86400.0,
        description=(
            "Seconds a runtime pod may sit on its node with a container the kubelet cannot start (ErrImagePull, "
            "ImagePullBackOff, CreateContainerConfigError, ...) before the operator ends the attempt; the "
            "condition says so at once."
        ),
    )
    webhook: Literal["managed", "serve", "off"] = Field(
        "managed",
        description=(
            "The validating admission webhook: managed (the operator registers a ValidatingWebhookConfiguration "
            "pointing at itself, with a self-signed certificate it makes at start-up: for running it on a "
            "developer's machine), serve (it only serves; the chart installs the configuration and the "
            "certificate), off."
        ),
    )
    webhook_port: int = Field(
        9443, ge=1, le=65535, description="Port the admission webhook is served on (HTTPS)."
    )
    webhook_address: str = Field(
        "0.0.0.0", min_length=1, description="Address the admission webhook listens on."
    )
    webhook_host: str = Field(
        "127.0.0.1",
        min_length=1,
        description=(
            "managed: the host name or IP the API server reaches this operator at (in the webhook URL and the "
            "certificate), e.g. host.docker.internal for a kind cluster."
        ),
    )
    webhook_cert_dir: str = Field(
        "",
        description=(
            "Directory with the webhook's tls.crt and tls.key (and ca.crt), as a kubernetes.io/tls Secret mounts "
            "them; reloaded when they change. Empty: managed mode makes a self-signed pair with openssl."
        ),
    )
    webhook_configuration: str = Field(
        "optrun.io",
        min_length=1,
        max_length=253,
        description="managed: name of the ValidatingWebhookConfiguration the operator keeps up to date.",
    )
    webhook_failure_policy: Literal["Fail", "Ignore"] = Field(
        "Fail",
        description=(
            "managed: what the API server does when it cannot reach the webhook: Fail refuses the write, "
            "Ignore admits it (the operator then refuses an invalid run as InvalidSpec)."
        ),
    )

    @field_validator("namespaces")
    @classmethod
    def _dns_labels(cls, v: list[str]) -> list[str]:
        bad = [n for n in v if not n or len(n) > 63]
        if bad:
            raise ValueError(f"not namespace names: {bad}")
        return v

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parser() -> argparse.ArgumentParser:
    """`optrun operator` options, one per OperatorConfig field, with the field's description."""
    p = argparse.ArgumentParser(
        prog="optrun operator",
        description=f"The optrun Kubernetes operator. Every option can also be set as {ENV_PREFIX}<NAME>.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    for name, field in OperatorConfig.model_fields.items():
        p.add_argument(
            _flag(name),
            dest=name,
            default=None,
            metavar=name.upper(),
            help=f"{field.description} (env {ENV_PREFIX}{name.upper()})",
        )
    return p


def _coerce(name: str, raw: str) -> Any:
    """Text from a flag or the environment: JSON for lists, mappings and numbers, else the string."""
    annotation = str(OperatorConfig.model_fields[name].annotation)
    if annotation.startswith(("list", "dict")):
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            # A single namespace given bare is the common case; a comma list is the next one.
            return [item.strip() for item in raw.split(",") if item.strip()]
    if name == "priority" and raw.strip().lower() in ("", "auto"):
        return None
    return raw


def load(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> tuple[OperatorConfig, bool]:
    """The configuration from flags, then the environment, then the defaults; and the verbose flag.

    Raises ManifestError (one field-named line per problem) on invalid values."""
    env = os.environ if environ is None else environ
    args = parser().parse_args(list(argv))
    values: dict[str, Any] = {}
    for name in OperatorConfig.model_fields:
        raw = getattr(args, name)
        if raw is None:
            raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = _coerce(name, raw)
    try:
        return OperatorConfig.model_validate(values), bool(args.verbose)
    except ValidationError as exc:
        raise ManifestError(manifest_errors(exc, prefix="operator", model=OperatorConfig)) from None
