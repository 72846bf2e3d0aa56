"""The validating admission webhook: bad runs are refused at the door, naming the field.

`review` is pure: an admission request's operation, new and old object -> the problems, one
field-named line each, the very lines `optrun validate` prints (optrun.api.v1alpha1.parse_manifest),
unknown fields included (the CRD keeps them for this check: optrun.api.crd), plus the fields a
started run may not change (optrun.api.mutability). main.py registers it with kopf
(`kopf.on.validate`), which serves it over HTTPS (`server`).

Two ways to run it (OperatorConfig.webhook):
- serve: the chart installs the ValidatingWebhookConfiguration, the Service and the certificate
  (a Secret mounted at webhook_cert_dir); the operator serves on webhook_port.
- managed: for an operator run on a developer's machine: it makes a self-signed certificate at
  start-up (`self_signed`, with openssl) and keeps a ValidatingWebhookConfiguration named
  webhook_configuration pointing at https://<webhook_host>:<webhook_port>; on a clean exit it
  takes its webhook out again.

Updates that leave the spec alone (kopf's own annotations and finalizer, labels) and updates of a
run being deleted are always admitted: a stored run that is invalid (created while the webhook
was down) must still be deletable, and the operator must still be able to release it.
"""

from __future__ import annotations

import ipaddress
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import kopf

from optrun.api import mutability
from optrun.api.errors import ManifestError
from optrun.api.v1alpha1 import parse_manifest
from optrun.operator.config import OperatorConfig

HANDLER_ID = "validate-run"  # the webhook's URL path is /validate-run (the chart's configuration says so)
OPERATIONS: tuple[Literal["CREATE"], Literal["UPDATE"]] = ("CREATE", "UPDATE")


def review(operation: str, new: Mapping[str, Any] | None, old: Mapping[str, Any] | None) -> list[str]:
    """Why the API server should refuse this write of a run; empty: admit it."""
    if operation not in OPERATIONS or new is None:
        return []
    before = (old or {}).get("spec") if old is not None else None
    if operation == "UPDATE" and (
        (new.get("metadata") or {}).get("deletionTimestamp") or new.get("spec") == before
    ):
        return []
    try:
        parse_manifest(dict(new))
        problems: list[str] = []
    except ManifestError as exc:
        problems = list(exc.problems)
    attempts = ((old or {}).get("status") or {}).get("attempts") or 0
    if operation == "UPDATE" and attempts and isinstance(before, Mapping):
        for path in mutability.immutable_changes(before, new.get("spec") or {}):
            problems.append(
                f"spec.{path}: may not change once the run has started (status.attempts {attempts}); "
                f"{mutability.describe()}"
            )
    return problems


def warnings(operation: str, new: Mapping[str, Any] | None, old: Mapping[str, Any] | None) -> list[str]:
    """What kubectl should tell the user about an admitted edit: the pod-shape fields apply later."""
    if operation != "UPDATE" or new is None or old is None or not (old.get("status") or {}).get("attempts"):
        return []
    later = [
        f"spec.{p}"
        for p in mutability.changed_paths(old.get("spec") or {}, new.get("spec") or {})
        if mutability.takes_effect_next_attempt(p)
    ]
    return (
        [f"{', '.join(later)} changed: applies from the next attempt; the current pod keeps its shape"]
        if later
        else []
    )


def self_signed(host: str, directory: Path | None = None) -> tuple[Path, Path]:
    """A self-signed certificate (its own CA) for `host` and its key, made with openssl; raises
    OSError (no openssl) or subprocess.CalledProcessError."""
    where = directory or Path(tempfile.mkdtemp(prefix="optrun-webhook-"))
    cert, key = where / "tls.crt", where / "tls.key"
    try:
        ipaddress.ip_address(host)
        san = f"IP:{host}"
    except ValueError:
        san = f"DNS:{host}"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "365",
            "-subj",
            "/CN=optrun-webhook",
            "-addext",
            f"subjectAltName={san}",
            "-addext",
            "extendedKeyUsage=serverAuth",
        ],
        check=True,
        capture_output=True,
    )
    key.chmod(0o600)
    return cert, key


def server(cfg: OperatorConfig, cert: Path, key: Path, ca: Path | None = None) -> kopf.WebhookServer:
    """kopf's HTTPS endpoint; it reloads the certificate when the files change (a renewed Secret)."""
    return kopf.WebhookServer(
        addr=cfg.webhook_address,
        port=cfg.webhook_port,
        host=cfg.webhook_host,
        certfile=str(cert),
        pkeyfile=str(key),
        cafile=str(ca) if ca is not None else None,
    )


def certificate(cfg: OperatorConfig) -> tuple[Path, Path, Path | None]:
    """(cert, key, CA bundle or None) for the webhook: the mounted Secret's, or a self-signed pair."""
    if cfg.webhook_cert_dir:
        where = Path(cfg.webhook_cert_dir)
        ca = where / "ca.crt"
        return where / "tls.crt", where / "tls.key", ca if ca.exists() else None
    cert, key = self_signed(cfg.webhook_host)
    return cert, key, None
