"""A loopback proxy in front of the test API server that fails a share of the writes going through it.

The operator under test is given a kubeconfig pointing here instead of at the API server. The
proxy terminates TLS with the API server's own serving certificate (it is valid for 127.0.0.1
and signed by the cluster CA the kubeconfig trusts), forwards every request to the real API
server over TLS, and streams the answer back (watches included). Of the writes (POST, PUT, PATCH,
DELETE) it fails a share, drawn from a seeded generator, in one of three ways:

  500 before   the request never reaches the API server; the client gets 500 InternalError
  429 before   the same with 429 TooManyRequests and Retry-After: 1, as a throttling server answers
  500 after    the write is done, and its answer replaced by a 500: the client cannot know it
               happened (a create answered 409 next time, a status written twice)

Reads pass untouched: the subject is what the operator does when its actions fail.

    with ChaosProxy(cluster.server, ca_file, cert, key, failure_rate=0.3) as proxy:
        ... kubeconfig server = proxy.url ...
        proxy.injected  # Counter of the failures by kind
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import socket
import ssl
import threading
from types import TracebackType

import aiohttp
from aiohttp import web

WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
KINDS = ("500-before", "429-before", "500-after")
# Hop-by-hop headers and those the proxy recomputes: never copied across.
_SKIP = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive"})


def _status(code: int, reason: str, message: str) -> bytes:
    return json.dumps(
        {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        }
    ).encode()


class ChaosProxy:
    def __init__(
        self,
        upstream: str,
        ca_file: str,
        cert_file: str,
        key_file: str,
        *,
        failure_rate: float,
        seed: int = 15,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.failure_rate = failure_rate
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.injected: collections.Counter[str] = collections.Counter()
        self.writes: collections.Counter[str] = collections.Counter()  # forwarded writes by "VERB resource"
        self._client_tls = ssl.create_default_context(cafile=ca_file)
        self._server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._server_tls.load_cert_chain(cert_file, key_file)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="chaos-proxy", daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def __enter__(self) -> ChaosProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the chaos proxy did not start")
        return self

    def __exit__(self, *exc: tuple[type[BaseException], BaseException, TracebackType] | None) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _draw(self, method: str) -> str | None:
        if method not in WRITES:
            return None
        with self._lock:
            if self._rng.random() >= self.failure_rate:
                return None
            kind = self._rng.choice(KINDS)
            self.injected[kind] += 1
            return kind

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=None)
        connector = aiohttp.TCPConnector(ssl=self._client_tls, limit=0)
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False
        ) as client:
            app = web.Application(client_max_size=16 * 2**20)

            async def forward(request: web.Request) -> web.StreamResponse:
                return await self._forward(client, request)

            app.router.add_route("*", "/{tail:.*}", forward)
            runner = web.AppRunner(app, handle_signals=False, access_log=None)
            await runner.setup()
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
            await web.SockSite(runner, sock, ssl_context=self._server_tls).start()
            self._ready.set()
            await self._stop.wait()
            await runner.cleanup()

    async def _forward(self, client: aiohttp.ClientSession, request: web.Request) -> web.StreamResponse:
        kind = self._draw(request.method)
        if kind == "500-before":
            return web.Response(status=500, body=_status(500, "InternalError", "chaos: injected before"),
                                content_type="application/json")  # fmt: skip
        if kind == "429-before":
            return web.Response(
                status=429,
                body=_status(429, "TooManyRequests", "chaos: too many requests"),
                content_type="application/json",
                headers={"Retry-After": "1"},
            )
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _SKIP}
        url = self.upstream + request.path_qs
        async with client.request(request.method, url, headers=headers, data=body or None) as upstream:
            if request.method in WRITES and upstream.status < 300:
                with self._lock:  # done by the API server, whether its answer arrives or not
                    self.writes[f"{request.method} {_resource(request.path)}"] += 1
            if kind == "500-after":
                await upstream.read()  # the write happened; its answer is lost
                return web.Response(status=500, body=_status(500, "InternalError", "chaos: injected after"),
                                    content_type="application/json")  # fmt: skip
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in _SKIP:
                    response.headers.add(key, value)
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
            except (aiohttp.ClientError, ConnectionResetError):
                pass  # a watch the API server or the client ended
            return response


def _resource(path: str) -> str:
    """The resource (and subresource) a request path names: .../pods/x/status -> pods/status."""
    parts = [p for p in path.split("?")[0].split("/") if p]
    if "namespaces" in parts:
        parts = parts[parts.index("namespaces") + 2 :]
    else:
        parts = parts[2:] if parts[:1] == ["api"] else parts[3:]
    resource = parts[0] if parts else ""
    return resource + (f"/{parts[2]}" if len(parts) > 2 else "")
