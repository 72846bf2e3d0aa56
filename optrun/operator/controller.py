"""Between kopf's handlers and the pure reconcile: observe a run, decide, apply the plan.

Every trigger (create, resume, update, timer, a pod event) calls `Controller.converge`, which,
under a lock per run (kopf runs a run's handlers, its timer and its pods' handlers in different
threads):
1. takes the freshest copy of the run it has (the handler's body, the run watch's last copy, or
   the response to its own last status write: whichever carries the highest resourceVersion),
   with the status it has yet to write (see below);
2. reads the run's pods from kopf's index (complete before any handler runs, after a restart
   too), overlaid with the pods it created itself and the last state of deleted ones; a pod that
   status names but neither shows is looked up once (GET), so "deleted" is never guessed from a
   watch that is merely late;
3. scrapes the current pod's metrics (timer only);
4. runs `reconcile.reconcile` and applies the plan: creations tolerate 409 (and check that what
   exists is this run's), the whole status is written (on this run's uid only), and the Events
   are queued for `EventPoster`, which posts them in the background, best-effort.

Status writes are batched per run (`status_batch_seconds`, 1 s by default), as the Job
controller batches the pod events of a Job: the plan's status is kept as the run's status in
this process at once (every later reconcile starts from it) and written once the window has
passed, so the writes of one transition and the next (a pod created, then found unschedulable a
moment later) become one. A status the operator did not get to write (it was killed) costs
nothing: the next reconcile derives it again from the pods (`reconcile._Reconciler.adopt`).
While the operator creates children in a burst (many runs submitted at once), status writes and
Events wait for the burst to end, 10 s at most (`Burst`): pods first.

The status write carries no resourceVersion precondition. Status has one writer, the active
replica, and each write is computed, under the run's lock, from the freshest copy that replica
has seen, which includes its own last write (the patch's response). A precondition would only
turn each write that follows one of kopf's own annotation patches into a 409, a GET and a second
write (measured: 4 in 10 status writes when 200 runs are created at once), for no safety gained.
API errors propagate as `Retry` (the server's Retry-After, else 5 s for no answer, 429 and 5xx;
30 s for a refusal; at most apiRetryMaxSeconds), which the run handlers turn into a
kopf.TemporaryError: kopf retries the handler after that delay. kopf does not retry its event
handlers, so a reconcile triggered by a pod event that fails is queued again here (`retry_later`), with the same delays (`bug_delay` for
anything but an API error): no swallowed error leaves a run without a next look.
"""

from __future__ import annotations

import datetime as dt
import heapq
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import yaml

from optrun.api import v1alpha1 as api
from optrun.operator import builders, metrics, reconcile, scrape
from optrun.operator.config import OperatorConfig
from optrun.operator.kube import JSON, ApiError, Kube
from optrun.operator.pods import PodView
from optrun.operator.status import METRICS, Event, clip, get_condition, timestamp

log = logging.getLogger(__name__)

# Pods' fields the operator reads; the rest (the whole pod spec) is not kept in memory.
_POD_STATUS_KEYS = ("phase", "reason", "message", "conditions", "containerStatuses", "podIP")


class Retry(Exception):
    """A transient failure: the same reconcile should run again after `delay` seconds."""

    def __init__(self, message: str, delay: float = 5.0) -> None:
        super().__init__(message)
        self.delay = delay


def trim_pod(body: Mapping[str, Any]) -> JSON:
    """The part of a pod the operator needs (see `optrun.operator.pods.PodView`)."""
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    return {
        "metadata": {
            k: meta[k]
            for k in ("name", "namespace", "uid", "labels", "resourceVersion", "deletionTimestamp")
            if k in meta
        },
        "spec": {"nodeName": (body.get("spec") or {}).get("nodeName")},
        "status": {k: status[k] for k in _POD_STATUS_KEYS if k in status},
    }


def _rv(body: Mapping[str, Any] | None) -> int:
    try:
        return int(((body or {}).get("metadata") or {}).get("resourceVersion") or -1)
    except (TypeError, ValueError):
        return -1


def freshest(*bodies: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The body with the highest resourceVersion (etcd revisions increase; ties: the first)."""
    best: Mapping[str, Any] | None = None
    for body in bodies:
        if body is not None and (best is None or _rv(body) > _rv(best)):
            best = body
    return best


class Cache:
    """What the operator wrote or saw deleted, on top of kopf's indexes; the status it has yet to
    write; the per-run locks."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._runs: dict[str, Mapping[str, Any]] = {}
        self._pods: dict[str, dict[str, tuple[JSON, bool]]] = {}  # run uid -> name -> (pod, deleted)
        self._staged: dict[str, JSON] = {}  # run uid -> the whole status to write

    def lock(self, uid: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(uid, threading.Lock())

    def remember_run(self, body: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        if "managedFields" in meta:  # the largest part of a run's metadata, and never read
            body = {**body, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}
        uid = meta["uid"]
        with self._guard:
            best = freshest(self._runs.get(uid), body)
            if best is not None:
                self._runs[uid] = best

    def run(self, uid: str) -> Mapping[str, Any] | None:
        with self._guard:
            return self._runs.get(uid)

    def current(self, uid: str, *bodies: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
        """The freshest of these bodies and the cached one, with the status not yet written."""
        with self._guard:
            best = freshest(*bodies, self._runs.get(uid))
            staged = self._staged.get(uid)
        if best is None or staged is None:
            return best
        return {**best, "status": staged}

    def stage_status(self, uid: str, status: JSON) -> None:
        with self._guard:
            self._staged[uid] = status

    def take_status(self, uid: str) -> JSON | None:
        with self._guard:
            return self._staged.pop(uid, None)

    def staged(self) -> list[str]:
        with self._guard:
            return list(self._staged)

    def remember_pod(self, run_uid: str, body: Mapping[str, Any], *, deleted: bool = False) -> None:
        """A pod this operator created (or found), or the last state of a deleted one (final)."""
        pod = trim_pod(body)
        name = pod["metadata"]["name"]
        with self._guard:
            pods = self._pods.setdefault(run_uid, {})
            known = pods.get(name)
            if deleted:
                pods[name] = (pod, True)
            elif known is None or (not known[1] and _rv(pod) >= _rv(known[0])):
                pods[name] = (pod, False)

    def pods(
        self, run_uid: str, indexed: Iterable[Mapping[str, Any]]
    ) -> dict[str, tuple[Mapping[str, Any], bool]]:
        """The run's pods: kopf's index, unless this cache holds something newer."""
        merged: dict[str, tuple[Mapping[str, Any], bool]] = {}
        for pod in indexed:
            merged[pod["metadata"]["name"]] = (pod, False)
        with self._guard:
            own = self._pods.get(run_uid, {})
            for name, (pod, deleted) in list(own.items()):
                seen = merged.get(name)
                if deleted and (seen is None or _rv(seen[0]) <= _rv(pod)):
                    merged[name] = (pod, True)
                elif not deleted and (seen is None or _rv(seen[0]) < _rv(pod)):
                    merged[name] = (pod, False)
                elif not deleted:
                    del own[name]  # the index caught up with what this operator created
        return merged

    def forget(self, uid: str) -> None:
        with self._guard:
            self._runs.pop(uid, None)
            self._pods.pop(uid, None)
            self._locks.pop(uid, None)
            self._staged.pop(uid, None)

    def phases(self) -> list[str | None]:
        with self._guard:
            return [
                (self._staged.get(uid) or b.get("status") or {}).get("phase") for uid, b in self._runs.items()
            ]


class Burst:
    """Whether the operator is creating children in a burst (many runs submitted at once).

    Status writes and Events wait for a burst to end, up to `max_hold` seconds each: a run's pod
    is what its user waits for, while a status write costs the API server about twice a pod
    create (a custom resource's schema and managed fields) and an Event under half of one (measured,
    benchmarks/operator_scale.py --costs): a new run's status write and two Events cost it more
    than the run's create, ConfigMap and pod together, taken from the pods of the runs still
    arriving."""

    def __init__(self, quiet: float = 0.5, max_hold: float = 10.0) -> None:
        self.quiet = quiet  # no creation for this long: the burst is over
        self.max_hold = max_hold  # a write waits at most this long for the burst to end
        self._last = -float("inf")

    def created(self) -> None:
        self._last = time.monotonic()  # one float: atomic under the GIL, no lock needed

    def remaining(self) -> float:
        """Seconds until the burst ends if nothing more is created (0: no burst)."""
        return max(0.0, self._last + self.quiet - time.monotonic())

    def hold(self, since: float) -> float:
        """How much longer a write queued at `since` (monotonic) should wait; 0: now."""
        return min(self.remaining(), max(0.0, since + self.max_hold - time.monotonic()))


class Batcher:
    """Calls `flush(key)` on a pool of `workers` threads, `delay` seconds after the first
    `mark(key, delay)` since the key's last flush; marks in between change nothing. A flush that
    falls due during a `burst` waits for its end (bounded by the burst's max_hold from the mark)."""

    def __init__(self, flush: Callable[[str], None], *, workers: int, burst: Burst | None = None) -> None:
        self._flush = flush
        self._burst = burst
        self._marked: dict[str, float] = {}  # key -> when its window began; each key is once in the heap
        self._heap: list[tuple[float, str]] = []
        self._wake = threading.Condition()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="optrun-status")
        threading.Thread(target=self._loop, name="optrun-status-timer", daemon=True).start()

    def mark(self, key: str, delay: float) -> None:
        with self._wake:
            if key in self._marked:
                return
            now = time.monotonic()
            self._marked[key] = now
            self._push(key, now + delay)

    def _push(self, key: str, due: float) -> None:
        heapq.heappush(self._heap, (due, key))
        self._wake.notify()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._wake.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                _, key = heapq.heappop(self._heap)
                wait = self._burst.hold(self._marked[key]) if self._burst else 0.0
                if wait > 0:
                    self._push(key, time.monotonic() + wait)
                    continue
                del self._marked[key]
            self._pool.submit(self._flush, key)


class EventPoster:
    """Posts Events from a queue, on a thread of its own: a reconcile never waits for one, and
    during a `burst` of creations the queue waits for its end (bounded), so a burst of new runs
    gets its pods first and its AttemptStarted Events just after. One thread keeps a run's Events
    in the order of its transitions.
    Events are a courtesy to people: one that cannot be posted (or a queue overflowing under a
    storm) is logged and dropped, never retried at the expense of the runs."""

    def __init__(self, kube: Kube, *, burst: Burst | None = None, capacity: int = 10_000) -> None:
        self.kube = kube
        self.burst = burst
        self.queue: queue.Queue[tuple[float, JSON]] = queue.Queue(maxsize=capacity)
        threading.Thread(target=self._work, name="optrun-events", daemon=True).start()

    def post(self, body: JSON) -> None:
        try:
            self.queue.put_nowait((time.monotonic(), body))
        except queue.Full:
            log.warning("event queue full; dropped %s %s", body.get("reason"), body["involvedObject"]["name"])

    def _work(self) -> None:
        while True:
            queued, body = self.queue.get()
            # The queue is in order: while its head waits for the burst, so does the rest.
            while self.burst and (wait := self.burst.hold(queued)) > 0:
                time.sleep(wait)  # the burst's own deadline, not a guess: it says when to look again
            try:
                self.kube.create(body)
            except ApiError as err:
                log.info("event %s not posted: %s", body.get("reason"), err)
            finally:
                self.queue.task_done()


class Controller:
    def __init__(self, cfg: OperatorConfig, kube: Kube, *, cache: Cache | None = None) -> None:
        self.cfg = cfg
        self.kube = kube
        self.cache = cache or Cache()
        self.burst = Burst()
        self.events = EventPoster(kube, burst=self.burst)
        self.instance = socket.gethostname()
        self.status_writes = Batcher(self._write_status, workers=max(1, cfg.workers // 2), burst=self.burst)
        self.retries = Batcher(self._retry, workers=2)
        # Seconds before another look at a run whose reconcile raised something other than an API
        # error (a bug): it must not end the run's looks, nor hammer the API server.
        self.bug_delay = 30.0
        # kopf's pod index (run uid -> its pods), handed over by the first handler that gets it: a
        # retry queued here runs outside kopf's handlers and reads the pods from the same index.
        self.pods_index: Mapping[str, Any] | None = None
        # The spec in each started run's ConfigMap (immutable), read when a run's generation is one
        # the operator has not acted on yet (reconcile.Observed.started_spec).
        self._started_specs: dict[str, Mapping[str, Any]] = {}

    def converge(
        self,
        body: Mapping[str, Any],
        *,
        trigger: str,
        indexed_pods: Iterable[Mapping[str, Any]] = (),
        scrape_metrics: bool = False,
        spec_changes: tuple[str, ...] = (),
    ) -> None:
        meta = body.get("metadata") or {}
        uid = str(meta.get("uid", ""))
        started = time.monotonic()
        with self.cache.lock(uid):
            run = self.cache.current(uid, body)
            assert run is not None
            self.cache.remember_run(run)
            try:
                observed = self._observe(run, list(indexed_pods), scrape_metrics, spec_changes)
                self._apply(observed, reconcile.reconcile(observed, self.cfg))
            except ApiError as err:
                # No answer, throttling, a server error: soon. A refusal (a 403 from an API server
                # whose authorizer is still warming up after a restart, or a Role missing a rule)
                # less often, and loudly: the run waits, the operator keeps trying.
                if not err.transient:
                    log.warning("%s/%s: %s", meta.get("namespace"), meta.get("name"), err)
                raise Retry(str(err), delay=_delay(err, self.cfg.api_retry_max_seconds)) from None
            finally:
                metrics.RECONCILE_SECONDS.labels(trigger=trigger).observe(time.monotonic() - started)

    def retry_later(self, uid: str, delay: float) -> None:
        """Converge the run again in `delay` seconds (a pod-event reconcile failed); a retry that
        fails again is queued again, until one gets through or the run is gone."""
        self.retries.mark(uid, delay)

    def _retry(self, uid: str) -> None:
        run = self.cache.run(uid)
        if run is None or (run.get("metadata") or {}).get("deletionTimestamp"):
            return
        pods = self.pods_index.get(uid) if self.pods_index is not None else None
        try:
            self.converge(run, trigger="retry", indexed_pods=iter_store(pods))
        except Retry as again:
            log.info("%s: will look again in %gs: %s", run["metadata"].get("name"), again.delay, again)
            self.retries.mark(uid, again.delay)
        except Exception:  # a bug must not end the retries of this run or of every other run
            log.exception(
                "%s: reconcile failed; will look again in %gs", run["metadata"].get("name"), self.bug_delay
            )
            self.retries.mark(uid, self.bug_delay)

    def forget(self, uid: str) -> None:
        self.cache.forget(uid)
        self._started_specs.pop(uid, None)

    # --- observe ---------------------------------------------------------------------------------

    def _observe(
        self,
        run: Mapping[str, Any],
        pods_index: list[Mapping[str, Any]],
        scrape_metrics: bool,
        spec_changes: tuple[str, ...],
    ) -> reconcile.Observed:
        meta = run["metadata"]
        uid, namespace = meta["uid"], meta["namespace"]
        views: dict[str, PodView] = {}
        for name, (pod, deleted) in self.cache.pods(uid, pods_index).items():
            view = PodView.from_pod(pod)
            views[name] = view if not deleted or view.finished else view.vanished()
        expected = reconcile.expected_pods(run)
        for name in expected:
            if name in views or meta.get("deletionTimestamp"):
                continue
            try:
                found = self.kube.get_pod(namespace, name)
            except ApiError as err:
                if not err.transient:
                    raise
                found = {}  # no answer: leave it unconfirmed, the reconcile waits
            if found is None or (found and _labels(found).get(builders.LABEL_RUN_UID) != uid):
                attempt = reconcile.read_status(run).attempts
                views[name] = PodView.gone(name, attempt)
            elif found:
                self.cache.remember_pod(uid, found)
                views[name] = PodView.from_pod(found)
        sample = None
        scrape_error = None
        # Pod 0 serves the metrics (global rank 0, in a multi-node run).
        current = views.get(expected[0]) if expected else None
        if scrape_metrics and current is not None and current.state == "running" and current.pod_ip:
            try:
                sample = scrape.scrape(
                    current.pod_ip, self.cfg.runtime_metrics_port, timeout=self.cfg.scrape_timeout_seconds
                )
            except scrape.ScrapeError as err:
                metrics.SCRAPE_ERRORS.inc()
                scrape_error = str(err)
                log.debug("%s/%s: scrape failed: %s", namespace, meta["name"], err)
                fresh = self._pod_that_stopped_answering(run, expected[0])
                if fresh is not None and fresh.finished:
                    views[expected[0]], scrape_error = fresh, None
        return reconcile.Observed(
            run=run,
            pods=views,
            now=dt.datetime.now(dt.UTC),
            sample=sample,
            scrape_error=scrape_error,
            spec_changes=spec_changes,
            started_spec=self._started_spec(run),
        )

    def _pod_that_stopped_answering(self, run: Mapping[str, Any], name: str) -> PodView | None:
        """The pod as the API server has it now, when a runtime that served its metrics stops
        answering: its process most likely ended, and the watch's event of that (the kubelet's
        status write, or a watch that is down) lags the closed port. Read once per such stop,
        not on every failed look (a pod the operator never reached costs no reads)."""
        served = get_condition(reconcile.read_status(run), METRICS)
        if served is None or served.status != "True":
            return None
        meta = run["metadata"]
        try:
            found = self.kube.get_pod(meta["namespace"], name)
        except ApiError:
            return None  # the reconcile goes on with what the watch showed
        if found is None or _labels(found).get(builders.LABEL_RUN_UID) != meta["uid"]:
            return None
        self.cache.remember_pod(meta["uid"], found)
        return PodView.from_pod(found)

    def _started_spec(self, run: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """The spec in the run's ConfigMap, when its generation is not yet acted on (see
        reconcile.Observed.started_spec); read once per run and kept (the ConfigMap is immutable)."""
        meta = run["metadata"]
        st = run.get("status") or {}
        if not st.get("attempts") or st.get("observedGeneration") in (None, meta.get("generation")):
            return None
        uid = meta["uid"]
        if uid not in self._started_specs:
            cm = self.kube.get("ConfigMap", meta["namespace"], builders.configmap_name(meta["name"]))
            if cm is None or _labels(cm).get(builders.LABEL_RUN_UID) != uid:
                return None
            doc = yaml.safe_load((cm.get("data") or {}).get(builders.SPEC_FILE) or "{}") or {}
            self._started_specs[uid] = doc.get("spec") or {}
        return self._started_specs[uid]

    # --- apply -----------------------------------------------------------------------------------

    def _apply(self, observed: reconcile.Observed, plan: reconcile.Plan) -> None:
        """Create, delete, write status, post events, in that order (see the module docstring)."""
        run = observed.run
        meta = run["metadata"]
        uid, namespace, name = meta["uid"], meta["namespace"], meta["name"]
        for manifest in plan.create:
            try:
                created = self.kube.create(manifest)
            except ApiError as err:
                if err.transient:
                    raise
                log.warning("%s/%s: cannot create %s: %s", namespace, name, manifest["kind"], err)
                if builders.is_result_configmap(manifest):
                    continue  # best effort: only a later run's baseline needs it, never this verdict
                plan = reconcile.creation_failed(observed, err.message, code=err.code)
                break
            self.burst.created()
            if created is None:
                created = self._existing(manifest, uid)
            if manifest["kind"] == "Pod":
                self.cache.remember_pod(uid, created)
        for pod in plan.delete_pods:
            log.info("%s/%s: deleting pod %s", namespace, name, pod)
            self.kube.delete_pod(namespace, pod)
        if plan.status:
            self.cache.stage_status(uid, plan.status)
            if self.cfg.status_batch_seconds > 0:
                self.status_writes.mark(uid, self.cfg.status_batch_seconds)
            elif not self._write_staged(uid, namespace, name):
                return  # deleted meanwhile (or replaced by a new run of the same name)
        for event in plan.events:
            self._post(run, event)
        if plan.delete_run:
            log.info("%s/%s: ttlSecondsAfterFinished passed; deleting the run", namespace, name)
            self.kube.delete_run(namespace, name, uid)
        for note in plan.notes:
            _count(note)

    # --- status writes ---------------------------------------------------------------------------

    def _write_staged(self, uid: str, namespace: str, name: str) -> bool:
        """Write the run's staged status (the caller holds the run's lock); False: the run is gone."""
        status = self.cache.take_status(uid)
        if status is None:
            return True
        try:
            updated = self.kube.replace_status(namespace, name, status, uid=uid)
        except ApiError as err:
            if err.code == 422:
                # The uid test failed (a new run of the same name), or the API server refuses the
                # status itself: a bug of the operator's, never to pass in silence.
                log.warning(
                    "%s/%s: status not written (a new run of this name, or refused): %s", namespace, name, err
                )
            if err.code in (404, 409, 422):
                return False  # deleted meanwhile (or replaced by a new run of the same name)
            self.cache.stage_status(uid, status)  # unless a newer one came: we hold the lock
            raise
        self.cache.remember_run(updated)
        return True

    def _write_status(self, uid: str) -> None:
        """The batch window of a run has passed: write its status; on a failure, later."""
        with self.cache.lock(uid):
            run = self.cache.run(uid)
            if run is None:
                return
            meta = run["metadata"]
            try:
                self._write_staged(uid, meta["namespace"], meta["name"])
            except ApiError as err:
                log.log(logging.INFO if err.transient else logging.WARNING,
                        "%s/%s: status not written: %s", meta["namespace"], meta["name"], err)  # fmt: skip
                self.status_writes.mark(uid, _delay(err, self.cfg.api_retry_max_seconds))

    def flush(self) -> None:
        """Write every staged status now (the operator is stopping)."""
        for uid in self.cache.staged():
            self._write_status(uid)

    def _existing(self, manifest: Mapping[str, Any], uid: str) -> JSON:
        """A create answered 409: the child must be this run's (from an earlier reconcile), not a
        leftover of a deleted run of the same name that the garbage collector has yet to remove."""
        kind, meta = manifest["kind"], manifest["metadata"]
        found = self.kube.get(kind, meta["namespace"], meta["name"])
        if found is None:
            raise Retry(f"{kind} {meta['namespace']}/{meta['name']} existed and is gone again", delay=1.0)
        if _labels(found).get(builders.LABEL_RUN_UID) != uid:
            raise Retry(
                f"{kind} {meta['namespace']}/{meta['name']} belongs to an earlier run of the same name; "
                "waiting for the garbage collector to remove it"
            )
        return found

    def _post(self, run: Mapping[str, Any], event: Event) -> None:
        self.events.post(event_body(run["metadata"], event, self.instance, dt.datetime.now(dt.UTC)))


def event_body(run_meta: Mapping[str, Any], event: Event, instance: str, when: dt.datetime) -> JSON:
    """The core/v1 Event about a run (involvedObject by uid, so it follows that run only)."""
    now = timestamp(when)
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{run_meta['name']}.", "namespace": run_meta["namespace"]},
        "involvedObject": {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "name": run_meta["name"],
            "namespace": run_meta["namespace"],
            "uid": run_meta["uid"],
        },
        "type": event.type,
        "reason": event.reason,
        "message": clip(event.message),
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
        "source": {"component": builders.MANAGED_BY},
        "reportingComponent": f"{api.GROUP}/operator",
        "reportingInstance": instance,
    }


def _delay(err: ApiError, longest: float) -> float:
    """When to try again after an API error: the server's Retry-After, else soon for no answer,
    throttling or a server error, less often for a refusal or a conflict (30 s); never later
    than `longest` (apiRetryMaxSeconds)."""
    if err.retry_after is not None:
        return max(0.5, err.retry_after)
    return min(5.0 if err.transient else 30.0, longest)


def _labels(body: Mapping[str, Any]) -> Mapping[str, str]:
    return (body.get("metadata") or {}).get("labels") or {}


def _count(note: reconcile.Note) -> None:
    if note.kind == "attempt_started":
        metrics.ATTEMPTS.inc()
    elif note.kind == "attempt_failed":
        metrics.ATTEMPT_FAILURES.labels(reason=note.label).inc()
    elif note.kind == "attempt_disrupted":
        metrics.ATTEMPT_DISRUPTIONS.labels(reason=note.label).inc()
    elif note.kind == "decision":
        metrics.DECISIONS.labels(decision=note.label).inc()
    elif note.kind == "gate":
        metrics.GATE_ENFORCEMENTS.labels(gate=note.label).inc()
    elif note.kind == "run_failed":
        metrics.RUN_FAILURES.labels(reason=note.label).inc()


def iter_store(store: Any) -> Iterator[Mapping[str, Any]]:
    """The values of a kopf index entry (a Store), or nothing when the key is absent."""
    if store is None:
        return iter(())
    return iter(list(store))
