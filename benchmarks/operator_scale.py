"""Operator scale benchmark: N OptimizationRuns at once against N pods from a plain client.

On a fresh control plane (tests/support/cluster.py: etcd, kube-apiserver, controller manager,
scheduler; no node agent, so pods are created and never run), for each N:

  plain     a plain client (the official `kubernetes` package, one thread) creates the N runtime
            pods the operator would create (same manifests, optrun.operator.builders), one after
            the other: the time until the last one exists;
  operator  `optrun operator` (a real process, watching one namespace) and the same client
            creating N runs: the time from the first create until every pod exists (seen on a
            watch), per run the time from its creation to its pod's, the operator's peak RSS
            (VmHWM) and the API requests per run: the API server's request count (watches
            excepted) in this phase minus the plain phase's, over N, which leaves out the
            scheduler's share (the same in both) and counts the operator's own pod creates;
            also split into the reconcile's own requests (the operator's counter) and kopf's.

Prints the ratio plain / operator (1.0: the operator creates pods as fast as a plain client;
target >= 0.5), p50/p99 of run-to-pod latency, RSS (target < 200 MB at 1000 runs) and requests
per run; appends a row per N to benchmarks/results/operator_scale.csv with the machine named.

With --costs it first measures what each kind of request the operator's path makes costs the
control plane on its own (N run creates, N ConfigMaps, N pods, N run status writes, N Events, one
after the other from one client): wall time per request and each process's CPU seconds. That
bounds the ratio on a given machine: a run costs the API server its create, its ConfigMap, its
pod, a status write and Events, where the plain phase costs one pod create.

With --repeats R each N runs R plain and operator phases, alternating, on the same control plane,
and a last line per N gives the median and range of each: this shared VM's speed drifts by up to
2x within minutes, and alternating lets the drift reach both sides alike.

With --takeover it also measures high-availability takeover: two replicas with peering, the
active one SIGKILLed, the time until the standby has created the pod of a run made at the kill.

    .venv/bin/python benchmarks/operator_scale.py                 # N = 200 and 1000
    .venv/bin/python benchmarks/operator_scale.py --repeats 3     # each 3 times, alternating
    .venv/bin/python benchmarks/operator_scale.py --runs 200 --takeover
    .venv/bin/python benchmarks/operator_scale.py --runs 1000 --costs
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kubernetes import client as k8s  # noqa: E402
from kubernetes import config as k8s_config  # noqa: E402

from optrun.api import crd as crd_mod  # noqa: E402
from optrun.operator import builders, reconcile  # noqa: E402
from optrun.operator.config import OperatorConfig  # noqa: E402
from optrun.operator.controller import event_body  # noqa: E402
from optrun.operator.kube import Kube  # noqa: E402
from tests.support.cluster import Cluster, free_port  # noqa: E402
from tests.support.kubeapi import ApiError  # noqa: E402

CSV = ROOT / "benchmarks" / "results" / "operator_scale.csv"
OPTRUN = Path(sys.executable).parent / "optrun"
GROUP, VERSION, PLURAL = "optrun.io", "v1alpha1", "optimizationruns"
SPEC: dict[str, Any] = {
    "workload": {"model": "tiny-lm", "sequenceLength": 32, "batchSize": 4},
    "training": {"epochs": 1, "stepsPerEpoch": 20},
    "resources": {"gpus": 1, "cpu": "1", "memory": "2Gi"},
}


def machine() -> str:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model or platform.processor() or 'cpu'} x{os.cpu_count()}"


def apiserver_requests(cluster: Cluster) -> dict[tuple[str, str, str], float]:
    """apiserver_request_total by (verb, resource, subresource), watches excepted."""
    text = cluster.api().request("GET", "/metrics", timeout=30)
    totals: dict[tuple[str, str, str], float] = {}
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels_text, _, value = line[len("apiserver_request_total{") :].rpartition("} ")
        labels = dict(part.split("=", 1) for part in labels_text.split('",') if "=" in part)
        labels = {k: v.strip('"') for k, v in labels.items()}
        if labels.get("verb") in ("WATCH", "CONNECT") or not labels.get("resource"):
            continue
        key = (labels["verb"], labels["resource"], labels.get("subresource", ""))
        totals[key] = totals.get(key, 0.0) + float(value)
    return totals


def delta(after: dict[Any, float], before: dict[Any, float]) -> dict[Any, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0) > 0}


def create_namespace(core: k8s.CoreV1Api, name: str) -> None:
    core.create_namespace({"metadata": {"name": name}})


def drop_pods(core: k8s.CoreV1Api, namespace: str, timeout: float = 120) -> None:
    """Delete a phase's pods and wait until they are gone: left behind unschedulable, the
    scheduler would keep retrying them through the next phase and charge it for that work."""
    core.delete_collection_namespaced_pod(namespace, grace_period_seconds=0)
    deadline = time.monotonic() + timeout
    while core.list_namespaced_pod(namespace, limit=1).items:
        if time.monotonic() > deadline:
            raise TimeoutError(f"pods of {namespace} still there after {timeout:.0f}s")
        time.sleep(0.2)


class PodWatch:
    """Records when each pod of a namespace is first seen, on a raw JSON watch in a thread (the
    official client's model deserialization would take the benchmark's own CPU from the creates).
    Runs in both phases, so both pay the same for it."""

    def __init__(self, cluster: Cluster, namespace: str) -> None:
        self.api = cluster.api()
        self.path = f"/api/v1/namespaces/{namespace}/pods"
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._rv = str(self.api.get(self.path)["metadata"]["resourceVersion"])
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for event in self.api.watch(self.path, resource_version=self._rv, timeout_seconds=30):
                    obj = event["object"]
                    self._rv = obj["metadata"]["resourceVersion"]
                    if event["type"] != "BOOKMARK":
                        self.seen.setdefault(obj["metadata"]["name"], time.monotonic())
                    if self._stop.is_set():
                        return
            except Exception:
                time.sleep(0.2)

    def wait(self, names: set[str], timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while not names <= self.seen.keys():
            if time.monotonic() > deadline:
                missing = len(names - self.seen.keys())
                raise TimeoutError(f"{missing} pods still missing after {timeout:.0f}s")
            time.sleep(0.05)
        return max(self.seen[n] for n in names)

    def stop(self) -> None:
        self._stop.set()


def plain_phase(
    api_client: k8s.ApiClient, cluster: Cluster, n: int, tag: str = ""
) -> tuple[float, dict[Any, float]]:
    core = k8s.CoreV1Api(api_client)
    ns = f"plain-{n}{tag}"
    create_namespace(core, ns)
    cfg = OperatorConfig()
    manifests = []
    for i in range(n):
        body = {"apiVersion": "optrun.io/v1alpha1", "kind": "OptimizationRun",
                "metadata": {"name": f"run-{i}", "namespace": ns, "uid": f"00000000-0000-0000-0000-{i:012d}"},
                "spec": SPEC}  # fmt: skip
        pod = builders.pod(builders.Run.from_body(body), 1, cfg)
        pod["metadata"].pop("ownerReferences")  # no owner exists in this phase
        manifests.append(pod)
    watch = PodWatch(cluster, ns)
    before = apiserver_requests(cluster)
    start = time.monotonic()
    for pod in manifests:
        core.create_namespaced_pod(ns, pod)
    elapsed = watch.wait({p["metadata"]["name"] for p in manifests}, timeout=max(120, n)) - start
    watch.stop()
    time.sleep(2)  # the scheduler's share of this phase (unschedulable conditions, events) settles
    requests = delta(apiserver_requests(cluster), before)
    drop_pods(core, ns)
    return elapsed, requests


def start_operator(
    cluster: Cluster, namespace: str, log: Path, extra: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTRUN_OPERATOR_")}
    env.update(
        {
            "KUBECONFIG": str(cluster.kubeconfig),
            "OPTRUN_OPERATOR_NAMESPACES": namespace,
            "OPTRUN_OPERATOR_METRICS_PORT": str(port),
            "OPTRUN_OPERATOR_HEALTH_PORT": "0",
            "OPTRUN_OPERATOR_PEERING_MODE": "standalone",
            "PYTHONUNBUFFERED": "1",
            **(extra or {}),
        }
    )
    with open(log, "ab") as out:
        proc = subprocess.Popen([str(OPTRUN), "operator"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        try:
            with urlopen_local(f"http://127.0.0.1:{port}/metrics") as r:
                r.read()
            return proc, port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the operator did not start; see {log}") from None
            time.sleep(0.2)


def urlopen_local(url: str) -> Any:
    import urllib.request

    return urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=5)


def operator_metric_sum(port: int, name: str) -> float:
    with urlopen_local(f"http://127.0.0.1:{port}/metrics") as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def control_plane_cpu(cluster: Cluster) -> dict[str, float]:
    return {name: cpu_seconds(p.pid) for name, p in cluster.processes.items() if p.alive()}


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def operator_phase(
    api_client: k8s.ApiClient,
    cluster: Cluster,
    n: int,
    log: Path,
    extra: dict[str, str] | None = None,
    tag: str = "",
) -> dict[str, Any]:
    core = k8s.CoreV1Api(api_client)
    objects = k8s.CustomObjectsApi(api_client)
    ns = f"ops-{n}{tag}"
    create_namespace(core, ns)
    proc, port = start_operator(cluster, ns, log, extra)
    try:
        watch = PodWatch(cluster, ns)
        before = apiserver_requests(cluster)
        cpu_before = {**control_plane_cpu(cluster), "operator": cpu_seconds(proc.pid)}
        created: dict[str, float] = {}
        start = time.monotonic()
        for i in range(n):
            body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "OptimizationRun",
                    "metadata": {"name": f"run-{i}"}, "spec": SPEC}  # fmt: skip
            objects.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
            created[f"run-{i}-attempt-1"] = time.monotonic()
        creates = time.monotonic() - start
        last = watch.wait(set(created), timeout=max(120, n))
        elapsed = last - start
        cpu = {**control_plane_cpu(cluster), "operator": cpu_seconds(proc.pid)}
        cpu = {k: round(v - cpu_before.get(k, 0.0), 1) for k, v in cpu.items()}
        latencies = sorted(watch.seen[p] - created[p] for p in created)
        time.sleep(3)  # the status writes after pod creation (Unschedulable) settle
        requests = delta(apiserver_requests(cluster), before)
        own = operator_metric_sum(port, "optrun_operator_api_requests_total")
        rss = peak_rss_mb(proc.pid)
        watch.stop()
    finally:
        stop(proc)
    drop_pods(core, ns)
    return {
        "seconds": elapsed,
        "creates": creates,
        "latencies": latencies,
        "requests": requests,
        "own_requests": own,
        "rss_mb": rss,
        "cpu": cpu,
    }


def request_costs(
    api_client: k8s.ApiClient, cluster: Cluster, n: int
) -> list[tuple[str, float, dict[str, float]]]:
    """Per kind of request on the operator's path: seconds per request and the CPU seconds of
    each control-plane process over n of them in a row (settled for 2 s after the last).

    The requests are the operator's own: the plan of a new run's first reconcile (its ConfigMap,
    pod, status and first Event), sent with the operator's client."""
    core = k8s.CoreV1Api(api_client)
    objects = k8s.CustomObjectsApi(api_client)
    kube = Kube(api_client, timeout=30)
    ns = f"costs-{n}"
    create_namespace(core, ns)
    cfg = OperatorConfig()
    runs: list[dict[str, Any]] = []
    plans: list[reconcile.Plan] = []

    def create_run(i: int) -> None:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "OptimizationRun",
                "metadata": {"name": f"run-{i}"}, "spec": SPEC}  # fmt: skip
        runs.append(objects.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body))
        plans.append(
            reconcile.reconcile(reconcile.Observed(run=runs[i], pods={}, now=dt.datetime.now(dt.UTC)), cfg)
        )

    def create_child(kind: str) -> Any:
        return lambda i: kube.create(next(m for m in plans[i].create if m["kind"] == kind))

    def write_status(i: int) -> None:
        meta = runs[i]["metadata"]
        kube.replace_status(ns, meta["name"], plans[i].status or {}, uid=meta["uid"])

    def post_event(i: int) -> None:
        kube.create(event_body(runs[i]["metadata"], plans[i].events[0], "costs", dt.datetime.now(dt.UTC)))

    kinds: list[tuple[str, Any]] = [
        ("run create", create_run),
        ("ConfigMap create", create_child("ConfigMap")),
        ("pod create", create_child("Pod")),
        ("run status write", write_status),
        ("Event create", post_event),
    ]
    rows = []
    for label, fn in kinds:
        before = control_plane_cpu(cluster)
        start = time.monotonic()
        for i in range(n):
            fn(i)
        seconds = (time.monotonic() - start) / n
        time.sleep(2)  # what follows a request (the scheduler's verdict on a pod, watchers) settles
        cpu = {k: round(v - before.get(k, 0.0), 2) for k, v in control_plane_cpu(cluster).items()}
        rows.append((label, seconds, cpu))
        print(f"  {label:18s} {seconds * 1000:5.1f} ms each; CPU s over {n}: {cpu}", flush=True)
    drop_pods(core, ns)
    return rows


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def spread(values: list[float], unit: str) -> str:
    return f"{statistics.median(values):.2f}{unit} ({min(values):.2f}-{max(values):.2f})"


def takeover(
    api_client: k8s.ApiClient, cluster: Cluster, workdir: Path, lifetime: int, rounds: int
) -> list[float]:
    """Seconds from SIGKILL of the active replica until the standby created a new run's pod."""
    core = k8s.CoreV1Api(api_client)
    objects = k8s.CustomObjectsApi(api_client)
    ns = "takeover"
    create_namespace(core, ns)
    objects.create_namespaced_custom_object("kopf.dev", "v1", ns, "kopfpeerings",
                                            {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering",
                                             "metadata": {"name": "optrun"}})  # fmt: skip
    extra = {
        "OPTRUN_OPERATOR_PEERING_MODE": "mandatory",
        "OPTRUN_OPERATOR_PEERING_LIFETIME_SECONDS": str(lifetime),
    }
    times = []
    active, _ = start_operator(cluster, ns, workdir / "takeover-0.log", extra)
    try:
        for r in range(rounds):
            standby, _ = start_operator(cluster, ns, workdir / f"takeover-{r + 1}.log", extra)
            time.sleep(lifetime / 2 + 2)  # both replicas have seen each other's keep-alive
            watch = PodWatch(cluster, ns)
            os.killpg(active.pid, signal.SIGKILL)
            active.wait(10)
            killed = time.monotonic()
            body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "OptimizationRun",
                    "metadata": {"name": f"after-kill-{r}"}, "spec": SPEC}  # fmt: skip
            objects.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
            seen = watch.wait({f"after-kill-{r}-attempt-1"}, timeout=lifetime * 4 + 60)
            watch.stop()
            times.append(seen - killed)
            print(f"  takeover {r + 1}: {times[-1]:.1f}s (peering lifetime {lifetime}s)", flush=True)
            active = standby
    finally:
        stop(active)
    return times


def write_row(row: dict[str, Any]) -> None:
    CSV.parent.mkdir(parents=True, exist_ok=True)
    new = not CSV.exists()
    with CSV.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, nargs="+", default=[200, 1000], help="N values, in order")
    p.add_argument("--workers", type=int, help="the operator's handler threads (default: its own default)")
    p.add_argument("--repeats", type=int, default=1, help="plain and operator phases per N, alternating")
    p.add_argument("--takeover", action="store_true", help="also measure HA takeover after SIGKILL")
    p.add_argument("--costs", action="store_true", help="first measure each request kind's cost alone")
    p.add_argument("--lifetime", type=int, default=15, help="peering lifetime for --takeover (seconds)")
    p.add_argument("--rounds", type=int, default=3, help="SIGKILLs for --takeover")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats: at least 1 (got {args.repeats})")
    workdir = Path(tempfile.mkdtemp(prefix="optrun-scale-"))
    print(f"machine: {machine()}; logs in {workdir}")
    with Cluster(workdir / "cluster") as cluster:
        api = cluster.api()
        for doc in [crd_mod.crd(), *yaml.safe_load_all((ROOT / "crds" / "kopf-peering.yaml").read_text())]:
            with contextlib.suppress(ApiError):
                api.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", doc)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                api.get(f"/apis/{GROUP}/{VERSION}/{PLURAL}")
                break
            except ApiError:
                time.sleep(0.2)
        api_client = k8s_config.new_client_from_config(config_file=str(cluster.kubeconfig))
        if args.costs:
            print(
                f"\nCost of each request on the operator's path, {max(args.runs)} in a row from one client:"
            )
            request_costs(api_client, cluster, max(args.runs))
        summary: dict[int, list[tuple[float, float, float]]] = {}
        for n, r in ((n, r) for n in args.runs for r in range(args.repeats)):
            # Repeats alternate plain and operator phases on the same control plane, so the host's
            # drift (this shared VM's speed varies by 2x within minutes) reaches both sides alike.
            tag = f"-{r + 1}" if r else ""
            plain_s, plain_req = plain_phase(api_client, cluster, n, tag)
            extra = {"OPTRUN_OPERATOR_WORKERS": str(args.workers)} if args.workers else None
            op = operator_phase(api_client, cluster, n, workdir / f"operator-{n}{tag}.log", extra, tag)
            ratio = plain_s / op["seconds"]
            lat = op["latencies"]
            # The operator's requests: its reconcile counts its own; kopf's are its writes to the runs
            # (finalizers, progress annotations; nobody else writes the main resource). kopf reads
            # the runs with one LIST before the phase; the API server's LIST counter for runs grows
            # by hundreds in a 1000-run phase, yet its audit log of one run (16:09 UTC 2026-11-28) showed five
            # LISTs of runs in all, so that counter is printed but not charged to kopf. Differences
            # of the API server's totals would also count the scheduler's retries of unschedulable
            # pods, which grow with the length of the phase, not with the operator.
            own_per_run = op["own_requests"] / n
            kopf = sum(
                v
                for (verb, res, sub), v in op["requests"].items()
                if res == PLURAL and not sub and verb in ("PATCH", "PUT", "DELETE")
            )
            kopf_per_run = kopf / n
            per_run = own_per_run + kopf_per_run
            total_per_run = (sum(op["requests"].values()) - sum(plain_req.values())) / n
            by_kind = delta(op["requests"], plain_req)
            print(f"\nN = {n}" + (f" (repeat {r + 1} of {args.repeats})" if args.repeats > 1 else ""))
            print(f"  plain client: {n} pods in {plain_s:.2f}s ({n / plain_s:.0f} pods/s)")
            print(
                f"  operator:     {n} runs -> {n} pods in {op['seconds']:.2f}s ({n / op['seconds']:.0f} pods/s)"
            )
            print(f"    of which the client's {n} run creates: {op['creates']:.2f}s")
            print(f"  ratio plain/operator: {ratio:.2f}  (target >= 0.5)")
            print(
                f"  run -> pod latency: p50 {pct(lat, 0.5):.2f}s, p99 {pct(lat, 0.99):.2f}s, max {lat[-1]:.2f}s"
            )
            print(f"  CPU seconds in that time: {op['cpu']}")
            print(f"  operator peak RSS: {op['rss_mb']:.0f} MB  (target < 200 MB at 1000 runs)")
            print(
                f"  operator API requests per run: {per_run:.1f} (reconcile's own {own_per_run:.1f}, kopf's "
                f"{kopf_per_run:.1f}); all clients' requests per run beyond the plain phase: {total_per_run:.1f}"
            )
            print("  API server request mix of the operator phase (per run, beyond the plain phase):")
            top = sorted(by_kind.items(), key=lambda kv: -kv[1])[:8]
            print(
                "   ",
                ", ".join(
                    f"{v / n:.2f} {verb} {res}{'/' + sub if sub else ''}" for (verb, res, sub), v in top
                ),
            )
            write_row(
                {
                    "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                    "device": machine(),
                    "runs": n,
                    "plain_seconds": round(plain_s, 3),
                    "operator_seconds": round(op["seconds"], 3),
                    "ratio": round(ratio, 3),
                    "p50_seconds": round(pct(lat, 0.5), 3),
                    "p99_seconds": round(pct(lat, 0.99), 3),
                    "peak_rss_mb": round(op["rss_mb"], 1),
                    "requests_per_run": round(per_run, 2),
                    "own_requests_per_run": round(own_per_run, 2),
                }
            )
            summary.setdefault(n, []).append((plain_s, op["seconds"], ratio))
        for n, reps in summary.items():
            if len(reps) > 1:
                plain, oper, ratios = ([x[i] for x in reps] for i in range(3))
                print(
                    f"\nN = {n} over {len(reps)} repeats (median, min-max): plain {spread(plain, 's')}, "
                    f"operator {spread(oper, 's')}, ratio {spread(ratios, '')}"
                )
        if args.takeover:
            print(f"\nHA takeover (2 replicas, peering lifetime {args.lifetime}s):")
            times = takeover(api_client, cluster, workdir, args.lifetime, args.rounds)
            print(f"  median {statistics.median(times):.1f}s, max {max(times):.1f}s over {len(times)} kills")
            write_row(
                {
                    "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                    "device": machine(),
                    "runs": f"takeover lifetime={args.lifetime}",
                    "plain_seconds": "",
                    "operator_seconds": round(statistics.median(times), 3),
                    "ratio": "",
                    "p50_seconds": round(statistics.median(times), 3),
                    "p99_seconds": round(max(times), 3),
                    "peak_rss_mb": "",
                    "requests_per_run": "",
                    "own_requests_per_run": "",
                }
            )
        api_client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
