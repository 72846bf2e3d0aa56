"""A small JSON client for the Kubernetes API, for the test harness itself.

The cluster lifecycle and the node agent talk to the API server through this module rather
than through the official `kubernetes` package: they need only a handful of verbs (get, list,
create, patch, delete, watch) on raw dicts, a bearer token and the cluster CA, and the node
agent must be able to run as a plain subprocess with nothing to configure. Tests that exercise
the product use the official client (the `kube` fixture), as the operator does.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import requests

JSON = dict[str, Any]


class ApiError(Exception):
    """A non-2xx answer from the API server; `status` is the HTTP code, `body` the Status."""

    def __init__(self, status: int, body: Any, method: str, path: str) -> None:
        self.status = status
        self.body = body
        message = body.get("message") if isinstance(body, dict) else str(body)[:300]
        super().__init__(f"{method} {path}: {status} {message}")

    @property
    def reason(self) -> str:
        return str(self.body.get("reason", "")) if isinstance(self.body, dict) else ""


class KubeApi:
    """Bearer-token client for one API server. Thread-safe: one HTTP session per thread."""

    def __init__(self, server: str, token: str, ca_file: str) -> None:
        self.server = server.rstrip("/")
        self.token = token
        self.ca_file = ca_file
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            # Ignore REQUESTS_CA_BUNDLE, proxies and netrc from the environment: they would
            # override the cluster CA and route loopback traffic elsewhere.
            session.trust_env = False
            session.verify = self.ca_file
            session.headers["Authorization"] = f"Bearer {self.token}"
            self._local.session = session
        return session

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
        timeout: float = 30,
    ) -> Any:
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if data is not None else {}
        response = self._session().request(
            method, self.server + path, data=data, params=params, headers=headers, timeout=timeout
        )
        if response.status_code >= 400:
            try:
                payload: Any = response.json()
            except ValueError:
                payload = response.text
            raise ApiError(response.status_code, payload, method, path)
        if not response.content:
            return None
        ctype = response.headers.get("Content-Type", "")
        return response.json() if ctype.startswith("application/json") else response.text

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params or None)

    def get_or_none(self, path: str) -> JSON | None:
        try:
            return self.request("GET", path)  # type: ignore[no-any-return]
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    def create(self, path: str, body: JSON) -> JSON:
        return self.request("POST", path, body=body)  # type: ignore[no-any-return]

    def replace(self, path: str, body: JSON) -> JSON:
        return self.request("PUT", path, body=body)  # type: ignore[no-any-return]

    def merge_patch(self, path: str, body: JSON) -> JSON:
        return self.request(  # type: ignore[no-any-return]
            "PATCH", path, body=body, content_type="application/merge-patch+json"
        )

    def delete(self, path: str, body: JSON | None = None) -> Any:
        return self.request("DELETE", path, body=body)

    def watch(
        self, path: str, *, resource_version: str, timeout_seconds: int = 60, **params: Any
    ) -> Iterator[JSON]:
        """Yield watch events ({"type", "object"}) until the server closes the stream.

        A 410 Gone arrives either as an HTTP error or as an ERROR event whose object is a
        Status with code 410; both raise ApiError(410) so the caller relists.
        """
        query = {
            "watch": "1",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
            **params,
        }
        response = self._session().get(
            self.server + path, params=query, stream=True, timeout=(10, timeout_seconds + 30)
        )
        with response:
            if response.status_code >= 400:
                raise ApiError(response.status_code, response.text, "WATCH", path)
            for line in response.iter_lines():
                if not line:
                    continue
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    status = event.get("object", {})
                    raise ApiError(int(status.get("code", 500)), status, "WATCH", path)
                yield event
