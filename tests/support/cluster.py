"""A real Kubernetes v1.20.2 control plane on 127.0.0.1, for integration tests and developers.

`Cluster` starts etcd, kube-apiserver, kube-controller-manager and kube-scheduler (binaries from
`hack/assets.sh`, see `tests/support/assets.py`) as local processes, each on a free 127.0.0.1
port, with a private work directory holding:

    pki/          a throw-away CA, the API server's serving certificate (also its kubelet client
                  certificate) and the service-account signing key pair
    tokens.csv    static bearer tokens (--token-auth-file) for the admin (system:masters), the
                  controller manager and the scheduler
    *.kubeconfig  one per component; `admin.kubeconfig` is the one to use (`Cluster.kubeconfig`)
    logs/         each process's stdout and stderr
    state.json    ports and process ids, so `Cluster.attach()` (and `hack/cluster down`) can find
                  and stop a cluster that another process started

Authorization is RBAC; the ServiceAccount admission plugin and the controller manager's
token controller work as in a real cluster, so pods get the `default-token-*` secret volume
(token, ca.crt, namespace) and an in-cluster client inside a node-agent pod can reach the API
server at KUBERNETES_SERVICE_HOST/PORT. `service_account_kubeconfig()` writes a kubeconfig
for any ServiceAccount (TokenRequest API), so a test can act as the operator's own account.

The node agent (`tests/support/nodeagent.py`) stands in for the kubelet; `start_node_agent()`
runs it as a child process of the same lifecycle.

Shutdown is bounded: every process runs in its own session (process group); `stop()` sends
SIGTERM to the group, waits `timeout` seconds, then SIGKILLs it (the 1.20 binaries can hang on
cleanup). Clusters started by this module are stopped at interpreter exit too, and their
processes carry a parent-death signal, so even a killed pytest leaves nothing running. A
detached cluster (`hack/cluster up`) outlives the command that started it, by design.

Developer command: `hack/cluster up|down|status|env` runs `main()` below against the state
directory `$OPTRUN_CACHE/cluster-dev` (see `hack/cluster --help`).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import requests
import yaml

from tests.support import assets as assets_mod
from tests.support.kubeapi import ApiError, KubeApi

KUBERNETES_VERSION = "v1.20.2"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
SERVICE_CIDR = "10.0.0.0/24"
SERVICE_IP = "10.0.0.1"  # the `kubernetes` Service's ClusterIP, the first of SERVICE_CIDR
REPO_ROOT = assets_mod.REPO_ROOT

# Start and stop order. Stopping runs it backwards: the node agent (and its pods) first, etcd last.
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "node-agent")

# Added to every container's environment by default (a container's own env wins): one OpenMP
# thread per process. The pods share the host's few cores with the control plane and with each
# other; torch's default of a thread per core makes concurrent runtime pods spin against each
# other (four tiny runs on a busy 2-core host: minutes instead of seconds), and a tiny model
# gains nothing from a second thread (the unit tests run their children the same way).
POD_ENV = {"OMP_NUM_THREADS": "1"}

# Clusters started in this interpreter and not yet stopped; stopped at exit.
_live_clusters: set[Cluster] = set()
_live_lock = threading.Lock()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (bind to 0, then release it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _local_get(url: str, *, verify: bool = True) -> requests.Response:
    """GET a loopback URL, ignoring proxy and CA settings from the environment."""
    with requests.Session() as session:
        session.trust_env = False
        return session.get(url, verify=verify, timeout=2)


def _run(argv: Sequence[str], cwd: Path) -> None:
    subprocess.run(argv, cwd=cwd, check=True, capture_output=True)


def make_pki(pki: Path) -> None:
    """A CA, a serving certificate for 127.0.0.1 and kubernetes.default.svc, an SA key pair.

    ECDSA P-256 throughout: as good as RSA for a test cluster and ten times faster to make.
    The serving certificate carries clientAuth too: the API server presents it to the node
    agent's kubelet endpoint (`kubectl logs`).
    """
    pki.mkdir(parents=True, exist_ok=True)
    _run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key"], pki)
    _run(
        [
            "openssl",
            "req",
            "-x509",
            "-new",
            "-key",
            "ca.key",
            "-sha256",
            "-days",
            "3650",
            "-subj",
            "/CN=optrun-test-ca",
            "-out",
            "ca.crt",
        ],
        pki,
    )
    _run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "apiserver.key"], pki)
    _run(
        [
            "openssl",
            "req",
            "-new",
            "-key",
            "apiserver.key",
            "-subj",
            "/CN=kube-apiserver",
            "-out",
            "apiserver.csr",
        ],
        pki,
    )
    sans = ",".join(
        [
            "IP:127.0.0.1",
            f"IP:{SERVICE_IP}",
            "DNS:localhost",
            "DNS:kubernetes",
            "DNS:kubernetes.default",
            "DNS:kubernetes.default.svc",
            "DNS:kubernetes.default.svc.cluster.local",
        ]
    )
    (pki / "apiserver.ext").write_text(
        f"subjectAltName={sans}\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    _run(
        [
            "openssl",
            "x509",
            "-req",
            "-in",
            "apiserver.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "3650",
            "-sha256",
            "-extfile",
            "apiserver.ext",
            "-out",
            "apiserver.crt",
        ],
        pki,
    )
    _run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "sa.key"], pki)
    _run(["openssl", "ec", "-in", "sa.key", "-pubout", "-out", "sa.pub"], pki)


def write_kubeconfig(
    path: Path, *, server: str, ca_file: Path, user: str, token: str, namespace: str = "default"
) -> Path:
    """A kubeconfig with one cluster, one token user and one context, named `optrun-test`."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "optrun-test", "cluster": {"server": server, "certificate-authority": str(ca_file)}}
        ],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [
            {
                "name": "optrun-test",
                "context": {"cluster": "optrun-test", "user": user, "namespace": namespace},
            }
        ],
        "current-context": "optrun-test",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path


@dataclasses.dataclass
class ManagedProcess:
    """One control-plane process, in a session of its own (pgid == pid)."""

    name: str
    pid: int
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None  # None when attached from state.json

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return _pid_runs(self.pid, self.argv[0])

    def wait(self, timeout: float) -> bool:
        """True once the process has exited, within `timeout` seconds."""
        if self.popen is not None:
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def stop(self, timeout: float) -> None:
        """SIGTERM the process group, then SIGKILL it after `timeout` seconds."""
        if self.alive():
            self.signal(signal.SIGTERM)
            if not self.wait(timeout):
                self.signal(signal.SIGKILL)
                self.wait(10)
        # Whatever the leader left in its group (it is gone or reaped by now).
        self.signal(signal.SIGKILL)

    def describe_exit(self) -> str:
        code = self.popen.poll() if self.popen is not None else None
        tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
        return f"{self.name} (pid {self.pid}) exited with {code}; log {self.log}:\n{tail}"


def _pid_runs(pid: int, argv0: str) -> bool:
    """True if `pid` is a live (not zombie) process whose command line contains `argv0`.

    The command-line check keeps a stale state.json from signalling a recycled pid.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return False
    if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
        return False
    return any(argv0.encode() in part for part in cmdline)


def _remove_stale_etcd_dirs() -> None:
    """Remove /dev/shm/optrun-etcd-* left by killed sessions (each holds a 64 MB WAL in memory).

    A directory is stale when no running process names it on its command line.
    """
    candidates = list(Path("/dev/shm").glob("optrun-etcd-*"))
    if not candidates:
        return
    in_use: set[str] = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            in_use.update(arg.decode(errors="replace") for arg in cmdline.read_bytes().split(b"\0"))
    for path in candidates:
        if str(path) not in in_use:
            shutil.rmtree(path, ignore_errors=True)


class ClusterError(RuntimeError):
    """The control plane did not come up; the message carries the failing component's log."""


class Cluster:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler on 127.0.0.1.

    >>> with Cluster() as cluster:                      # doctest: +SKIP
    ...     cluster.start_node_agent()
    ...     subprocess.run([kubectl, "--kubeconfig", cluster.kubeconfig, "get", "nodes"])
    """

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        assets: assets_mod.Assets | None = None,
        detached: bool = False,
        keep_workdir: bool | None = None,
    ) -> None:
        """`workdir`: where pki, kubeconfigs, logs and state go (a fresh temporary directory by
        default, removed by stop() unless keep_workdir or OPTRUN_KEEP_CLUSTER_DIR=1).
        `detached`: the processes outlive this interpreter (no parent-death signal, no atexit
        stop); for `hack/cluster up`.
        """
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="optrun-cluster-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._assets = assets
        self.detached = detached
        if keep_workdir is None:
            keep_workdir = os.environ.get("OPTRUN_KEEP_CLUSTER_DIR") == "1"
        self.keep_workdir = keep_workdir
        self.processes: dict[str, ManagedProcess] = {}
        self.ports: dict[str, int] = {}
        self.admin_token = ""
        self.etcd_dir: Path | None = None

    # ---- paths and clients -------------------------------------------------------------------

    @property
    def assets(self) -> assets_mod.Assets:
        if self._assets is None:
            self._assets = assets_mod.load()
        return self._assets

    @property
    def pki(self) -> Path:
        return self.workdir / "pki"

    @property
    def ca_file(self) -> Path:
        return self.pki / "ca.crt"

    @property
    def kubeconfig(self) -> Path:
        """The admin kubeconfig (user `admin`, group `system:masters`)."""
        return self.workdir / "admin.kubeconfig"

    @property
    def api_port(self) -> int:
        return self.ports["kube-apiserver"]

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    @property
    def node_agent_dir(self) -> Path:
        """The node agent's state: pods/<namespace>_<name>_<uid>/ (logs, volumes), pvcs/."""
        return self.workdir / "node-agent"

    def api(self) -> KubeApi:
        """A harness client with admin rights."""
        return KubeApi(self.server, self.admin_token, str(self.ca_file))

    # ---- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 90, *, crds: Sequence[Mapping[str, Any]] = ()) -> Cluster:
        """Start every control-plane component and wait until each is ready.

        Ready means: the API server's /readyz, the controller manager's and scheduler's /healthz,
        and the `default` ServiceAccount with its token secret (so pods can be admitted).

        `crds` (CustomResourceDefinition objects) are created, Established and served before the
        controller manager starts, so its garbage collector watches their kinds from the start:
        the 1.20 one discovers a kind created later only on its 30 s rediscovery, and dependents
        it saw before that (a custom resource's pods) wait on an exponential back-off, so they
        were collected 30-40 s after their owner was deleted.
        """
        if self.processes:
            raise ClusterError("this Cluster is already started")
        deadline = time.monotonic() + timeout
        if not self.detached:
            with _live_lock:
                _live_clusters.add(self)
        try:
            self._prepare()
            self._start_etcd(deadline)
            self._start_apiserver(deadline)
            self._create_crds(crds, deadline)
            self._start_controllers(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _remaining(self, deadline: float) -> float:
        return max(1.0, deadline - time.monotonic())

    def _prepare(self) -> None:
        self.assets  # noqa: B018 - resolve (and if needed build) the binaries before any process starts
        make_pki(self.pki)
        self.logs.mkdir(exist_ok=True)
        for name in ("etcd", "etcd-peer", "kube-apiserver", "kube-controller-manager", "kube-scheduler"):
            self.ports[name] = free_port()
        self.admin_token = secrets.token_hex(16)
        tokens = {
            "admin": (self.admin_token, "system:masters"),
            "system:kube-controller-manager": (secrets.token_hex(16), ""),
            "system:kube-scheduler": (secrets.token_hex(16), ""),
        }
        # token,user,uid,"group1,group2" (kube-apiserver --token-auth-file)
        (self.pki / "tokens.csv").write_text(
            "".join(f'{tok},{user},{user},"{groups}"\n' for user, (tok, groups) in tokens.items())
        )
        (self.pki / "tokens.csv").chmod(0o600)
        for user, (tok, _) in tokens.items():
            short = {"admin": "admin"}.get(user, user.removeprefix("system:"))
            write_kubeconfig(
                self.workdir / f"{short}.kubeconfig",
                server=self.server,
                ca_file=self.ca_file,
                user=user,
                token=tok,
            )
        _remove_stale_etcd_dirs()
        shm = Path("/dev/shm")
        # etcd on tmpfs: fsyncs on a slow disk would otherwise dominate every API write.
        base = shm if shm.is_dir() and os.access(shm, os.W_OK) else self.workdir
        self.etcd_dir = Path(tempfile.mkdtemp(prefix="optrun-etcd-", dir=base))
        self._save_state()

    def _spawn(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        death_signal: str = "KILL",
    ) -> ManagedProcess:
        """Start one component in a session of its own, output to logs/NAME.log.

        Unless detached, it gets `death_signal` when this interpreter dies, even by SIGKILL
        (a pytest timeout, Ctrl-C twice). Note that the parent-death signal follows the
        *thread* that spawned the process: start clusters from a thread that outlives them.
        """
        log = self.logs / f"{name}.log"
        wrapped = argv
        if not self.detached and shutil.which("setpriv"):
            wrapped = ["setpriv", "--pdeathsig", death_signal, "--", *argv]
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                wrapped,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
                cwd=cwd,
            )
        proc = ManagedProcess(name=name, pid=popen.pid, argv=argv, log=log, popen=popen)
        self.processes[name] = proc
        self._save_state()
        return proc

    def _wait_ready(self, proc: ManagedProcess, check: Any, deadline: float) -> None:
        def ready() -> bool:
            if not proc.alive():
                raise ClusterError(proc.describe_exit())
            try:
                return bool(check())
            except (requests.RequestException, ApiError, OSError):
                return False

        end = time.monotonic() + self._remaining(deadline)
        while not ready():
            if time.monotonic() >= end:
                raise ClusterError(
                    f"{proc.name} not ready in time; log {proc.log}:\n"
                    + proc.log.read_text(errors="replace")[-3000:]
                )
            time.sleep(0.1)

    def _start_etcd(self, deadline: float) -> None:
        client = f"http://127.0.0.1:{self.ports['etcd']}"
        peer = f"http://127.0.0.1:{self.ports['etcd-peer']}"
        proc = self._spawn(
            "etcd",
            [
                str(self.assets.etcd),
                "--name",
                "default",
                "--data-dir",
                str(self.etcd_dir),
                "--listen-client-urls",
                client,
                "--advertise-client-urls",
                client,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                f"default={peer}",
                "--initial-cluster-state",
                "new",
                "--logger",
                "zap",
                "--log-level",
                "warn",
            ],
        )
        self._wait_ready(
            proc, lambda: _local_get(f"{client}/health").json().get("health") == "true", deadline
        )

    def _start_apiserver(self, deadline: float) -> None:
        pki = self.pki
        proc = self._spawn(
            "kube-apiserver",
            [
                str(self.assets.kube_apiserver),
                f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.api_port}",
                "--insecure-port=0",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--token-auth-file={pki / 'tokens.csv'}",
                "--authorization-mode=RBAC",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--api-audiences={SERVICE_ACCOUNT_ISSUER}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                # `kubectl logs`: the API server calls the node agent's kubelet endpoint.
                f"--kubelet-client-certificate={pki / 'apiserver.crt'}",
                f"--kubelet-client-key={pki / 'apiserver.key'}",
                "--kubelet-preferred-address-types=InternalIP",
                # Priority and fairness only adds start-up work and request latency here.
                "--enable-priority-and-fairness=false",
                # Endpoints may not hold loopback addresses, so the `kubernetes` Service gets none;
                # in-cluster clients use KUBERNETES_SERVICE_HOST/PORT (127.0.0.1) instead.
                "--endpoint-reconciler-type=none",
                "--profiling=false",
                "--event-ttl=1h",
            ],
        )
        api = self.api()
        self._wait_ready(proc, lambda: api.request("GET", "/readyz", timeout=2) == "ok", deadline)

    def _create_crds(self, crds: Sequence[Mapping[str, Any]], deadline: float) -> None:
        api = self.api()
        proc = self.processes["kube-apiserver"]
        for crd in crds:
            api.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", dict(crd))
            spec = crd["spec"]
            path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd['metadata']['name']}"

            def served(path: str = path, spec: Mapping[str, Any] = spec) -> bool:
                conditions = (api.get(path).get("status") or {}).get("conditions") or []
                if not any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
                    return False
                # Discovery lists it: what the garbage collector reads when it starts.
                version = next(v["name"] for v in spec["versions"] if v.get("storage"))
                listed = api.get(f"/apis/{spec['group']}/{version}").get("resources") or []
                return any(r["name"] == spec["names"]["plural"] for r in listed)

            self._wait_ready(proc, served, deadline)

    def _start_controllers(self, deadline: float) -> None:
        pki = self.pki
        kcm = self._spawn(
            "kube-controller-manager",
            [
                str(self.assets.kube_controller_manager),
                f"--kubeconfig={self.workdir / 'kube-controller-manager.kubeconfig'}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.ports['kube-controller-manager']}",
                "--port=0",
                f"--cert-dir={self.workdir / 'kcm-certs'}",
                "--leader-elect=false",
                # Every controller with the rights of its own ServiceAccount, as a kubeadm cluster runs.
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                f"--cluster-signing-cert-file={pki / 'ca.crt'}",
                f"--cluster-signing-key-file={pki / 'ca.key'}",
                "--controllers=*",
                "--profiling=false",
            ],
        )
        sched = self._spawn(
            "kube-scheduler",
            [
                str(self.assets.kube_scheduler),
                f"--kubeconfig={self.workdir / 'kube-scheduler.kubeconfig'}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.ports['kube-scheduler']}",
                "--port=0",
                f"--cert-dir={self.workdir / 'scheduler-certs'}",
                "--leader-elect=false",
                "--profiling=false",
            ],
        )

        def healthz(port: int) -> bool:
            return _local_get(f"https://127.0.0.1:{port}/healthz", verify=False).text == "ok"

        with _quiet_insecure_warnings():
            self._wait_ready(kcm, lambda: healthz(self.ports["kube-controller-manager"]), deadline)
            self._wait_ready(sched, lambda: healthz(self.ports["kube-scheduler"]), deadline)
        api = self.api()

        def default_account_has_token() -> bool:
            account = api.get_or_none("/api/v1/namespaces/default/serviceaccounts/default")
            return bool(account and account.get("secrets"))

        self._wait_ready(kcm, default_account_has_token, deadline)

    def start_node_agent(
        self,
        nodes: Sequence[Any] | None = None,
        *,
        extra_env: Mapping[str, str] | None = None,
        image_entrypoints: Mapping[str, Sequence[str]] | None = None,
        timeout: float = 60,
    ) -> None:
        """Run the node agent (tests/support/nodeagent.py) for `nodes` (NodeSpec list; default
        nodeagent.DEFAULT_NODES) and wait until every node is Ready and schedulable.

        `extra_env` is added to every container's environment (TRITON_INTERPRET=1, say), over
        POD_ENV.
        `image_entrypoints` stands in for image ENTRYPOINTs: image repository -> argv, used for
        containers without a `command` (nodeagent.AgentConfig.image_entrypoints).
        """
        from tests.support import nodeagent

        if "node-agent" in self.processes:
            raise ClusterError("the node agent already runs; stop it first (stop_node_agent)")
        nodes = list(nodes) if nodes is not None else list(nodeagent.DEFAULT_NODES)
        self.node_agent_dir.mkdir(exist_ok=True)
        config = nodeagent.AgentConfig(
            server=self.server,
            token=self.admin_token,
            ca_file=str(self.ca_file),
            api_port=self.api_port,
            state_dir=str(self.node_agent_dir),
            tls_cert=str(self.pki / "apiserver.crt"),
            tls_key=str(self.pki / "apiserver.key"),
            nodes=[dataclasses.asdict(n) for n in nodes],
            extra_env={**POD_ENV, **(extra_env or {})},
            image_entrypoints={k: list(v) for k, v in (image_entrypoints or {}).items()},
        )
        config_path = self.workdir / "node-agent.json"
        config_path.write_text(json.dumps(dataclasses.asdict(config), indent=2))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        proc = self._spawn(
            "node-agent",
            [sys.executable, "-m", "tests.support.nodeagent", "--config", str(config_path)],
            env=env,
            cwd=REPO_ROOT,
            # SIGTERM, not SIGKILL: the agent then stops its pods' processes (bounded) before it exits.
            death_signal="TERM",
        )
        api = self.api()

        def all_ready() -> bool:
            return all(
                nodeagent.node_is_schedulable(api.get_or_none(f"/api/v1/nodes/{n.name}")) for n in nodes
            )

        self._wait_ready(proc, all_ready, time.monotonic() + timeout)

    def restart_apiserver(self, timeout: float = 90) -> float:
        """Stop the API server (SIGTERM, SIGKILL after 10 s) and start it again on the same port
        with the same flags, as an upgrade or a crash of the control plane would; returns the
        seconds it was away. Its clients keep their URL and credentials."""
        proc = self.processes.pop("kube-apiserver")
        started = time.monotonic()
        proc.stop(10)
        self._start_apiserver(time.monotonic() + timeout)
        self._save_state()  # the new process's pid: a detached cluster is stopped by it
        return time.monotonic() - started

    def stop_node_agent(self, timeout: float = 30, *, delete_nodes: bool = False) -> None:
        """Stop the node agent; it terminates its pods' processes first (bounded).

        `delete_nodes` also removes its Node objects, so that the scheduler stops placing pods
        on them at once (before restarting the agent with another set of nodes).
        """
        proc = self.processes.pop("node-agent", None)
        if proc is not None:
            proc.stop(timeout)
        self._kill_leftover_pods()
        config = self.workdir / "node-agent.json"
        if delete_nodes and config.exists():
            api = self.api()
            for node in json.loads(config.read_text())["nodes"]:
                with contextlib.suppress(ApiError):
                    api.delete(f"/api/v1/nodes/{node['name']}")
        self._save_state()

    def _kill_leftover_pods(self) -> None:
        """SIGKILL pod process groups that a killed node agent left behind (pid files)."""
        pods = self.node_agent_dir / "pods"
        if not pods.is_dir():
            return
        for pidfile in pods.glob("*/*/pid"):
            with contextlib.suppress(ValueError, OSError):
                pgid = int(pidfile.read_text())
                if os.getsid(pgid) == pgid:  # still a session leader: ours (we setsid each pod)
                    os.killpg(pgid, signal.SIGKILL)

    def stop(self, timeout: float = 10) -> None:
        """Stop everything, backwards: node agent (30 s for its pods), scheduler and controller
        manager together, API server, etcd. Each gets SIGTERM, then SIGKILL after `timeout`."""
        try:
            self.stop_node_agent(timeout=max(timeout, 30))
            for group in (("kube-scheduler", "kube-controller-manager"), ("kube-apiserver",), ("etcd",)):
                procs = [self.processes.pop(n) for n in group if n in self.processes]
                for proc in procs:
                    if proc.alive():
                        proc.signal(signal.SIGTERM)
                for proc in procs:
                    proc.stop(timeout)
            self.processes.clear()
        finally:
            with _live_lock:
                _live_clusters.discard(self)
            if self.etcd_dir is not None:
                shutil.rmtree(self.etcd_dir, ignore_errors=True)
            if self._own_workdir and not self.keep_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            else:
                self._save_state()

    # ---- state, for attach() and `hack/cluster` ------------------------------------------------

    def _save_state(self) -> None:
        if not self.workdir.is_dir():
            return
        state = {
            "server": self.server if "kube-apiserver" in self.ports else None,
            "ports": self.ports,
            "kubeconfig": str(self.kubeconfig),
            "etcd_dir": str(self.etcd_dir) if self.etcd_dir else None,
            "processes": {
                n: {"pid": p.pid, "argv": p.argv, "log": str(p.log)} for n, p in self.processes.items()
            },
        }
        tmp = self.workdir / "state.json.tmp"
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.workdir / "state.json")

    @classmethod
    def attach(cls, workdir: Path) -> Cluster:
        """A handle on a cluster that another process started in `workdir` (state.json)."""
        state = json.loads((Path(workdir) / "state.json").read_text())
        cluster = cls(Path(workdir), detached=True, keep_workdir=True)
        cluster.ports = {k: int(v) for k, v in state["ports"].items()}
        cluster.etcd_dir = Path(state["etcd_dir"]) if state.get("etcd_dir") else None
        tokens = (
            (cluster.pki / "tokens.csv").read_text().splitlines()
            if (cluster.pki / "tokens.csv").exists()
            else []
        )
        cluster.admin_token = next((line.split(",")[0] for line in tokens if ",admin," in line), "")
        for name, p in state["processes"].items():
            cluster.processes[name] = ManagedProcess(
                name=name, pid=int(p["pid"]), argv=list(p["argv"]), log=Path(p["log"])
            )
        return cluster

    def status(self) -> dict[str, bool]:
        """Component name -> whether its process runs."""
        return {name: proc.alive() for name, proc in self.processes.items()}

    # ---- service accounts --------------------------------------------------------------------

    def service_account_token(self, namespace: str, name: str, *, expiration_seconds: int = 3600) -> str:
        """A token for ServiceAccount namespace/name (TokenRequest API), valid for the API server."""
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"audiences": [SERVICE_ACCOUNT_ISSUER], "expirationSeconds": expiration_seconds},
        }
        path = f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token"
        result = self.api().create(path, body)
        return str(result["status"]["token"])

    def service_account_kubeconfig(self, namespace: str, name: str, path: Path | None = None) -> Path:
        """A kubeconfig that acts as ServiceAccount namespace/name, default namespace `namespace`."""
        if path is None:
            path = self.workdir / f"sa-{namespace}-{name}.kubeconfig"
        return write_kubeconfig(
            path,
            server=self.server,
            ca_file=self.ca_file,
            user=f"system:serviceaccount:{namespace}:{name}",
            token=self.service_account_token(namespace, name),
            namespace=namespace,
        )


@contextlib.contextmanager
def _quiet_insecure_warnings() -> Any:
    import warnings

    import urllib3

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
        yield


@atexit.register
def _stop_live_clusters() -> None:
    with _live_lock:
        clusters = list(_live_clusters)
    for cluster in clusters:
        cluster.stop()


# ---- developer command: hack/cluster ---------------------------------------------------------


def dev_dir() -> Path:
    return assets_mod.cache_dir() / "cluster-dev"


def _listening_ports(cluster: Cluster) -> dict[str, bool]:
    result = {}
    for name, port in cluster.ports.items():
        with socket.socket() as sock:
            sock.settimeout(0.5)
            result[f"{name}:{port}"] = sock.connect_ex(("127.0.0.1", port)) == 0
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hack/cluster",
        description="A local Kubernetes v1.20.2 control plane with fake GPU nodes, for development. "
        f"State lives in {dev_dir()}.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the control plane and the node agent (no-op if running)")
    up.add_argument("--no-nodes", action="store_true", help="do not start the node agent")
    sub.add_parser("down", help="stop every process and remove the state directory")
    sub.add_parser("status", help="say which processes run and which ports listen")
    sub.add_parser("env", help="print `export KUBECONFIG=...` for eval")
    args = parser.parse_args(argv)
    workdir = dev_dir()
    state_file = workdir / "state.json"

    if args.command == "up":
        if state_file.exists():
            existing = Cluster.attach(workdir)
            if existing.processes and all(existing.status().values()):
                print(f"already running; export KUBECONFIG={existing.kubeconfig}")
                return 0
            existing.stop()
            shutil.rmtree(workdir, ignore_errors=True)
        started = time.monotonic()
        cluster = Cluster(workdir, detached=True, keep_workdir=True)
        cluster.start()
        if not args.no_nodes:
            cluster.start_node_agent()
        print(
            f"control plane {KUBERNETES_VERSION} at {cluster.server} up in {time.monotonic() - started:.1f}s"
        )
        print(f"export KUBECONFIG={cluster.kubeconfig}")
        return 0

    if not state_file.exists():
        print("no development cluster (hack/cluster up starts one)")
        return 0 if args.command in ("down", "status") else 1
    cluster = Cluster.attach(workdir)
    if args.command == "down":
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        print("stopped")
        return 0
    if args.command == "env":
        print(f"export KUBECONFIG={cluster.kubeconfig}")
        return 0
    alive = cluster.status()
    for name, running in alive.items():
        print(f"{name:25} {'running' if running else 'stopped'}  pid {cluster.processes[name].pid}")
    for where, listening in _listening_ports(cluster).items():
        print(f"{where:25} {'listening' if listening else 'closed'}")
    print(f"KUBECONFIG={cluster.kubeconfig}")
    return 0 if alive and all(alive.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
