"""Between kopf's handlers and the pure reconcile: observe a run, decide, apply the plan.

Every trigger (create, resume, update, timer, a pod event) calls `Controller.converge`, which,
under a lock per run (kopf runs a run's handlers, its timer and its pods' handlers in different
threads):
1. takes the freshest copy of the run it has (the handler's body, kopf's index, or the response
   to its own last status patch: whichever carries the highest resourceVersion);
2. reads the run's pods from kopf's index (complete before any handler runs, after a restart
   too), overlaid with the pods it created itself and the last state of deleted ones; a pod that
   status names but neither shows is looked up once (GET), so "deleted" is never guessed from a
   watch that is merely late;
3. scrapes the current pod's metrics (timer only);
4. runs `reconcile.reconcile` and applies the plan: creations tolerate 409, the status patch
   carries the resourceVersion it was computed from (409: read the run again and redo), events
   are posted last and best-effort.
Transient API errors (no answer, 429, 5xx) propagate as `Retry`, which the handlers turn into a
kopf.TemporaryError: kopf retries them with a delay, a timer simply runs again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from optrun.api import v1alpha1 as api
from optrun.operator import builders, metrics, reconcile, scrape
from optrun.operator.config import OperatorConfig
from optrun.operator.kube import JSON, ApiError, Kube
from optrun.operator.pods import PodView
from optrun.operator.status import Event, clip, timestamp

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
    """What the operator wrote or saw deleted, on top of kopf's indexes, and the per-run locks."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._runs: dict[str, Mapping[str, Any]] = {}
        self._pods: dict[str, dict[str, tuple[JSON, bool]]] = {}  # run uid -> name -> (pod, deleted)

    def lock(self, uid: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(uid, threading.Lock())

    def remember_run(self, body: Mapping[str, Any]) -> None:
        uid = body["metadata"]["uid"]
        with self._guard:
            best = freshest(self._runs.get(uid), body)
            if best is not None:
                self._runs[uid] = best

    def run(self, uid: str) -> Mapping[str, Any] | None:
        with self._guard:
            return self._runs.get(uid)

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

    def phases(self) -> list[str | None]:
        with self._guard:
            return [(b.get("status") or {}).get("phase") for b in self._runs.values()]


class Controller:
    def __init__(self, cfg: OperatorConfig, kube: Kube, *, cache: Cache | None = None) -> None:
        self.cfg = cfg
        self.kube = kube
        self.cache = cache or Cache()
        self.instance = socket.gethostname()

    def converge(
        self,
        body: Mapping[str, Any],
        *,
        trigger: str,
        indexed_pods: Iterable[Mapping[str, Any]] = (),
        indexed_run: Mapping[str, Any] | None = None,
        scrape_metrics: bool = False,
        spec_changes: tuple[str, ...] = (),
    ) -> None:
        meta = body.get("metadata") or {}
        uid = str(meta.get("uid", ""))
        started = time.monotonic()
        with self.cache.lock(uid):
            run = freshest(body, indexed_run, self.cache.run(uid))
            assert run is not None
            self.cache.remember_run(run)
            pods_index = list(indexed_pods)
            try:
                for _ in range(3):
                    observed = self._observe(run, pods_index, scrape_metrics, spec_changes)
                    plan = reconcile.reconcile(observed, self.cfg)
                    fresh = self._apply(observed, plan)
                    if fresh is None:
                        break
                    run = fresh  # the status changed under us: decide again on what is there now
                else:
                    raise Retry(
                        f"{meta.get('namespace')}/{meta.get('name')}: status kept changing", delay=1.0
                    )
            except ApiError as err:
                if err.transient:
                    raise Retry(str(err)) from None
                raise
            finally:
                metrics.RECONCILE_SECONDS.labels(trigger=trigger).observe(time.monotonic() - started)

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
            views[name] = view if not deleted or view.finished else PodView.gone(name, view.attempt)
        expected = reconcile.expected_pod(run)
        if expected and expected not in views and not meta.get("deletionTimestamp"):
            try:
                found = self.kube.get_pod(namespace, expected)
            except ApiError as err:
                if not err.transient:
                    raise
                found = {}  # no answer: leave it unconfirmed, the reconcile waits
            if found is None or (found and _labels(found).get(builders.LABEL_RUN_UID) != uid):
                attempt = reconcile.read_status(run).attempts
                views[expected] = PodView.gone(expected, attempt)
            elif found:
                self.cache.remember_pod(uid, found)
                views[expected] = PodView.from_pod(found)
        sample = None
        current = views.get(expected) if expected else None
        if scrape_metrics and current is not None and current.state == "running" and current.pod_ip:
            try:
                sample = scrape.scrape(
                    current.pod_ip, self.cfg.runtime_metrics_port, timeout=self.cfg.scrape_timeout_seconds
                )
            except scrape.ScrapeError as err:
                metrics.SCRAPE_ERRORS.inc()
                log.debug("%s/%s: scrape failed: %s", namespace, meta["name"], err)
        return reconcile.Observed(
            run=run,
            pods=views,
            now=dt.datetime.now(dt.UTC),
            sample=sample,
            spec_changes=spec_changes,
        )

    # --- apply -----------------------------------------------------------------------------------

    def _apply(self, observed: reconcile.Observed, plan: reconcile.Plan) -> Mapping[str, Any] | None:
        """Apply the plan; returns the run as it is now if the status patch met a conflict."""
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
                plan = reconcile.creation_failed(observed, err.message, code=err.code)
                break
            if created is None:
                created = self._existing(manifest, uid)
            if manifest["kind"] == "Pod":
                self.cache.remember_pod(uid, created)
        for pod in plan.delete_pods:
            log.info("%s/%s: deleting pod %s", namespace, name, pod)
            self.kube.delete_pod(namespace, pod)
        if plan.status:
            try:
                updated = self.kube.patch_status(namespace, name, plan.status, meta.get("resourceVersion"))
            except ApiError as err:
                if err.code == 409:
                    fresh = self.kube.get_run(namespace, name)
                    if fresh is None or fresh["metadata"].get("uid") != uid:
                        return None  # deleted meanwhile: nothing left to do
                    self.cache.remember_run(fresh)
                    return fresh
                if err.code == 404:
                    return None
                raise
            self.cache.remember_run(updated)
        for event in plan.events:
            self._post(run, event)
        if plan.delete_run:
            log.info("%s/%s: ttlSecondsAfterFinished passed; deleting the run", namespace, name)
            self.kube.delete_run(namespace, name, uid)
        for note in plan.notes:
            _count(note)
        return None

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
        meta = run["metadata"]
        now = timestamp(dt.datetime.now(dt.UTC))
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": api.API_VERSION,
                "kind": api.KIND,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "type": event.type,
            "reason": event.reason,
            "message": clip(event.message),
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "source": {"component": builders.MANAGED_BY},
            "reportingComponent": f"{api.GROUP}/operator",
            "reportingInstance": self.instance,
        }
        # Events are a courtesy to people: one that cannot be posted must not stop the run.
        with contextlib.suppress(ApiError):
            self.kube.create(body)


def _labels(body: Mapping[str, Any]) -> Mapping[str, str]:
    return (body.get("metadata") or {}).get("labels") or {}


def _count(note: reconcile.Note) -> None:
    if note.kind == "attempt_started":
        metrics.ATTEMPTS.inc()
    elif note.kind == "attempt_failed":
        metrics.ATTEMPT_FAILURES.labels(reason=note.label).inc()
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
