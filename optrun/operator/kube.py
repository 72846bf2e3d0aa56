"""The operator's own calls to the API server: raw JSON in and out, counted.

kopf watches and patches through its own client; the reconcile's actions (create a child,
delete a pod, patch status, post an Event) go through this module. It uses the official
`kubernetes` client for what it is good at (kubeconfig and in-cluster credentials, TLS, token
refresh) but skips its model classes: children are built as plain dicts by
`optrun.operator.builders`, and deserializing every response into generated models would cost
more CPU than the request itself.

Every request is counted in `optrun_operator_api_requests_total{verb,resource}`, every error in
`optrun_operator_api_errors_total{code}`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from optrun.api import v1alpha1 as api
from optrun.operator import metrics

log = logging.getLogger(__name__)

JSON = dict[str, Any]


class ApiError(Exception):
    """A non-2xx answer (or no answer: code 0); `code` is the HTTP status, `reason` the Status reason."""

    def __init__(
        self,
        code: int,
        message: str,
        reason: str = "",
        verb: str = "",
        path: str = "",
        retry_after: float | None = None,
    ) -> None:
        self.code = code
        self.reason = reason
        self.message = message
        self.retry_after = retry_after  # the server's Retry-After (429, 503), in seconds
        super().__init__(f"{verb} {path}: {code} {reason}: {message}".strip())

    @property
    def transient(self) -> bool:
        """Worth retrying later: no answer, throttling, a timeout or a server error."""
        return self.code == 0 or self.code == 429 or self.code >= 500


def _seconds(value: str | None) -> float | None:
    """A Retry-After header in seconds (the API server sends delta-seconds), capped at a minute."""
    try:
        return min(60.0, max(0.0, float(value))) if value else None
    except ValueError:
        return None


def load_client(timeout: float, *, connections: int) -> Kube:
    """In-cluster credentials when running in a pod, else the kubeconfig ($KUBECONFIG).

    `connections`: the pool size; at least the number of handler threads, or every thread beyond
    the pool opens (and then discards) a TLS connection of its own per request."""
    configuration = k8s.Configuration()
    try:
        k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except ConfigException:
        k8s_config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    configuration.connection_pool_maxsize = connections
    return Kube(k8s.ApiClient(configuration), timeout=timeout)


class Kube:
    """Thread-safe (urllib3's pool is): the handlers call it from kopf's executor threads."""

    def __init__(self, api_client: k8s.ApiClient, *, timeout: float) -> None:
        self.api_client = api_client
        self.timeout = timeout

    def request(
        self,
        verb: str,
        path: str,
        *,
        resource: str,
        body: Any = None,
        content_type: str = "application/json",
        query: dict[str, Any] | None = None,
    ) -> JSON:
        metrics.API_REQUESTS.labels(verb=verb.lower(), resource=resource).inc()
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        try:
            method, url, headers, payload, post = self.api_client.param_serialize(
                verb,
                path,
                query_params=list((query or {}).items()) or None,
                header_params=headers,
                body=body,
                auth_settings=["BearerToken"],
            )
            response = self.api_client.call_api(
                method,
                url,
                header_params=headers,
                body=payload,
                post_params=post,
                _request_timeout=self.timeout,
            )
            data = response.read()  # type: ignore[no-untyped-call]
            status = int(response.status)
            retry_after = _seconds(response.headers.get("Retry-After"))
        except ApiException as exc:  # no answer at all (connection refused, timeout)
            metrics.API_ERRORS.labels(code="0").inc()
            raise ApiError(0, str(exc.reason or exc), verb=verb, path=path) from None
        except (OSError, urllib3.exceptions.HTTPError) as exc:  # refused, reset, retries exhausted
            metrics.API_ERRORS.labels(code="0").inc()
            raise ApiError(0, str(exc), verb=verb, path=path) from None
        try:
            doc = json.loads(data) if data else {}
        except ValueError:
            doc = {"message": data[:300].decode(errors="replace") if isinstance(data, bytes) else str(data)}
        if status >= 400:
            metrics.API_ERRORS.labels(code=str(status)).inc()
            raise ApiError(
                status,
                str(doc.get("message", "")),
                reason=str(doc.get("reason", "")),
                verb=verb,
                path=path,
                retry_after=retry_after,
            )
        return doc if isinstance(doc, dict) else {"items": doc}

    # --- the verbs the operator uses (see optrun.operator.rbac) --------------------------------

    def create(self, manifest: JSON) -> JSON | None:
        """Create a namespaced child; None when it already exists (409): the name is deterministic,
        so an existing object is the one an earlier reconcile made."""
        kind = manifest["kind"]
        resource = {"Pod": "pods", "ConfigMap": "configmaps", "Service": "services", "Event": "events"}[kind]
        ns = manifest["metadata"]["namespace"]
        try:
            return self.request(
                "POST", f"/api/v1/namespaces/{ns}/{resource}", resource=resource, body=manifest
            )
        except ApiError as err:
            if err.code == 409 and err.reason == "AlreadyExists":
                return None
            raise

    def get(self, kind: str, namespace: str, name: str) -> JSON | None:
        """A namespaced child by kind (Pod, ConfigMap, Service); None when it does not exist."""
        resource = {"Pod": "pods", "ConfigMap": "configmaps", "Service": "services"}[kind]
        try:
            return self.request("GET", f"/api/v1/namespaces/{namespace}/{resource}/{name}", resource=resource)
        except ApiError as err:
            if err.code == 404:
                return None
            raise

    def get_pod(self, namespace: str, name: str) -> JSON | None:
        return self.get("Pod", namespace, name)

    def delete_pod(self, namespace: str, name: str) -> None:
        """Graceful delete (the pod's own grace period: the runtime checkpoints on SIGTERM)."""
        try:
            self.request(
                "DELETE",
                f"/api/v1/namespaces/{namespace}/pods/{name}",
                resource="pods",
                body={"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"},
            )
        except ApiError as err:
            if err.code != 404:
                raise

    def replace_status(self, namespace: str, name: str, status: JSON, *, uid: str) -> JSON:
        """Write the run's whole status, only on the run with this uid: a JSON patch whose first
        operation tests metadata.uid, so a run deleted and created again under the same name
        (422) never gets its predecessor's status."""
        return self.request(
            "PATCH",
            f"/apis/{api.GROUP}/{api.VERSION}/namespaces/{namespace}/{api.PLURAL}/{name}/status",
            resource=f"{api.PLURAL}/status",
            body=[
                {"op": "test", "path": "/metadata/uid", "value": uid},
                {"op": "add", "path": "/status", "value": status},
            ],
            content_type="application/json-patch+json",
        )

    def get_run(self, namespace: str, name: str) -> JSON | None:
        try:
            return self.request(
                "GET",
                f"/apis/{api.GROUP}/{api.VERSION}/namespaces/{namespace}/{api.PLURAL}/{name}",
                resource=api.PLURAL,
            )
        except ApiError as err:
            if err.code == 404:
                return None
            raise

    def delete_run(self, namespace: str, name: str, uid: str) -> None:
        """Delete the run (ttlSecondsAfterFinished), only if it is still the same object (uid)."""
        try:
            self.request(
                "DELETE",
                f"/apis/{api.GROUP}/{api.VERSION}/namespaces/{namespace}/{api.PLURAL}/{name}",
                resource=api.PLURAL,
                body={
                    "apiVersion": "v1",
                    "kind": "DeleteOptions",
                    "propagationPolicy": "Background",
                    "preconditions": {"uid": uid},
                },
            )
        except ApiError as err:
            if err.code not in (404, 409):
                raise
