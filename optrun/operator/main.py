"""The operator process: kopf's settings, the thin handlers, and `run(argv)` (`optrun operator`).

Each handler is a few lines that hand the run to `Controller.converge` (optrun.operator.controller),
which calls the one idempotent reconcile (optrun.operator.reconcile): creation, resumption after a
restart, a spec update, the periodic look (timer) and a change of one of the run's pods all
converge there. A kopf index gives every handler the runs' pods as the pod watch last showed
them; kopf fills it completely before the first handler runs, which is what lets a restarted
operator find the pods it made instead of making new ones. The runs themselves, as their watch
last showed them, are kept by the run-event handler in the controller's cache (an index of whole
runs would cost kopf's handler machinery once more on every run event, for the same bodies).

Settings live in one place, `configure` (the startup handler), each with the reason for it.
Handlers are registered by `build_registry(cfg)`, because the timer's interval comes from the
configuration, which is read at start-up.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, cast

import kopf

from optrun.api import v1alpha1 as api
from optrun.api.errors import ManifestError
from optrun.operator import admission, builders, config, metrics
from optrun.operator.controller import Controller, Retry, iter_store, trim_pod
from optrun.operator.kube import load_client
from optrun.operator.status import CONTAINER_START_REASONS, TERMINAL_PHASES

log = logging.getLogger(__name__)

RUNS = (api.GROUP, api.VERSION, api.PLURAL)
PODS = ("v1", "pods")
PREFIX = api.GROUP  # our own annotation prefix: optrun.io/...
FINALIZER = f"{api.GROUP}/operator"


# --- settings ---------------------------------------------------------------------------------


def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Every kopf setting the operator changes, and why."""
    cfg: config.OperatorConfig = memo.cfg

    # Our own name for the finalizer kopf adds while a run has a live timer (it stops the timer
    # before the run goes): people reading `metadata.finalizers` see whose it is.
    settings.persistence.finalizer = FINALIZER
    # The last handled spec (what kopf diffs an update against) is kept in memory, not in an
    # annotation: that annotation cost every run one more write of the custom resource (and one
    # more watch event for every watcher), the largest single cost of a burst of new runs.
    # status.observedGeneration tells a restarted operator which runs it has already handled.
    settings.persistence.diffbase_storage = memo.specs
    # Handler progress (only written while a handler is being retried) goes into annotations
    # under optrun.io/, not into status: the CRD's status schema is structural, so the API server
    # would prune kopf's status.kopf field, and status belongs to the run's users.
    settings.persistence.progress_storage = QuietProgressStorage(prefix=PREFIX)

    # Ask the API server to end each watch after 5 minutes and give up on a silent connection
    # after 5.5: a half-dead TCP connection (a restarted API server behind a load balancer) is
    # replaced within minutes instead of hanging the operator forever.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    # Short single requests: a request hanging on an unreachable API server must fail and be
    # retried, not block a handler for kopf's default 5 minutes.
    settings.networking.request_timeout = cfg.api_timeout_seconds
    settings.networking.connect_timeout = 10
    # kopf gives up a request after 8 retries (54 s): a watch that escalates a 403 or a 5xx
    # (an API server restarting, its authorizer still warming up) ends that resource's watcher
    # for good while the process stays up and healthy, so no pod event reaches a run again.
    settings.networking.error_backoffs = Backoffs(cfg.api_retry_max_seconds)

    # Only the pods the operator made are watched (a server-side label selector): a cluster with
    # 100k other pods costs the operator nothing.
    settings.watching.label_selectors[PODS] = builders.LABEL_RUN_UID

    # Peering (high availability): replicas share the KopfPeering object `peering_name`; only the
    # highest priority is active, the others pause. Priorities are distinct by construction:
    # minus the start time in microseconds, so the longest-running replica stays active and a
    # restarted one waits instead of taking over (no needless handovers); any explicit
    # priority >= 0 (a developer's operator) outranks all of them. A replica that dies without
    # saying goodbye is replaced once its keep-alive expires: `peering_lifetime_seconds`.
    settings.peering.name = cfg.peering_name
    settings.peering.priority = cfg.priority if cfg.priority is not None else -int(time.time() * 1e6)
    settings.peering.lifetime = cfg.peering_lifetime_seconds
    settings.peering.mandatory = cfg.peering_mode == "mandatory"
    settings.peering.standalone = cfg.peering_mode == "standalone"
    settings.peering.clusterwide = cfg.clusterwide
    settings.peering.stealth = True  # keep-alives every few seconds are not worth a log line

    # Events: kopf would post one per handler run ("Handler ... succeeded"): noise in
    # `kubectl describe` and one more API request per reconcile. The operator posts its own
    # Events for every transition; kopf posts only its warnings and errors.
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = f"{api.GROUP}/operator"

    # Handlers are synchronous (the API client blocks); this many run at once.
    settings.execution.max_workers = cfg.workers

    # The CRD is installed before the operator (chart or crds/); watching CRDs and namespaces at
    # runtime would need cluster-wide list/watch on both, and buys nothing here.
    settings.scanning.disabled = True

    # The admission webhook (optrun.operator.admission): served by every replica, active or
    # standby (peering pauses the watches, not the webhook server), so a Service in front of
    # them always finds one. Managed: the operator keeps the ValidatingWebhookConfiguration itself.
    if cfg.webhook != "off":
        settings.admission.server = admission.server(cfg, *memo.webhook_certificate)
        settings.admission.managed = cfg.webhook_configuration if cfg.webhook == "managed" else None

    if cfg.metrics_port:
        port = metrics.serve(cfg.metrics_port)
        log.info("operator metrics at :%d/metrics", port)
    metrics.watch_runs(memo.controller.cache.phases)
    log.info(
        "optrun operator: %s, runtime image %s, look every %gs, peering %s (priority %d)",
        "all namespaces" if cfg.clusterwide else ", ".join(cfg.namespaces),
        cfg.runtime_image,
        cfg.scrape_interval_seconds,
        cfg.peering_mode,
        settings.peering.priority,
    )


class Backoffs:
    """Delays between tries of a failed kopf request, 1, 1, 2, 3, 5, ... seconds up to `cap`, and
    without end. kopf reads the iterable afresh for each request and gives up only when it runs
    out; it is not Sized, so kopf's logs count the tries without a total."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def __iter__(self) -> Iterator[float]:
        a, b = min(1.0, self.cap), min(1.0, self.cap)
        while True:
            yield a
            a, b = b, min(a + b, self.cap)


class SpecMemory(kopf.DiffBaseStorage):
    """kopf's diff base (the last handled spec of each run) in this process's memory.

    A run this process has not handled yet (after a start, or a takeover from another replica) is
    judged by its status: observedGeneration equal to metadata.generation means an operator
    reconciled this very spec, so the run is resumed (kopf's resume cause: its current spec is
    the base); otherwise it is handled as created, which the idempotent reconcile treats the same.
    What is lost is only the SpecChangeIgnored/SpecChangeDeferred Event for an edit made while no
    operator ran; the edit itself takes effect as it would have (see optrun.operator.reconcile)."""

    def __init__(self) -> None:
        super().__init__()
        self._essences: dict[str, kopf.BodyEssence] = {}  # only kopf's event loop touches this

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        """The spec alone (the only field a handler diffs), not kopf's deep copy of the whole run
        (status included) on every event, which was a tenth of the operator's CPU in a burst. No
        copy at all: every watch event brings freshly decoded objects, which nobody changes."""
        if any(tuple(field)[:1] != ("spec",) for field in extra_fields or ()):
            return super().build(body=body, extra_fields=extra_fields)
        return cast(kopf.BodyEssence, {"spec": dict(body.spec)})

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        essence = self._essences.get(body.metadata.uid or "")
        if essence is None and _handled(body):
            essence = self.build(body=body)
        return essence

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        self._essences[body.metadata.uid or ""] = essence

    def forget(self, uid: str) -> None:
        self._essences.pop(uid, None)


def _handled(body: kopf.Body) -> bool:
    generation = body.metadata.get("generation")
    return generation is not None and body.status.get("observedGeneration") == generation


class QuietProgressStorage(kopf.AnnotationsProgressStorage):
    """kopf's annotation progress storage without its `<prefix>/kopf-managed: yes` marker, which
    would cost every run a patch of its own just to brand it."""

    def _store_marker(self, prefix: str, patch: kopf.Patch, body: kopf.Body) -> None:
        return None

    def clear(self, *, essence: kopf.BodyEssence) -> kopf.BodyEssence:
        # SpecMemory's essences hold no annotations to clear: skip kopf's deep copy of them.
        return essence if "metadata" not in essence else super().clear(essence=essence)


# --- indexes ----------------------------------------------------------------------------------


def index_pods(body: kopf.Body, labels: kopf.Labels, **_: Any) -> dict[str, Any]:
    return {labels[builders.LABEL_RUN_UID]: trim_pod(body)}


# --- handlers: thin, they all converge ----------------------------------------------------------


Pods = kopf.Index[str, Any]  # run uid -> its pods (trimmed)


def _pods(kwargs: Mapping[str, Any]) -> Pods:
    """kopf passes each index as a keyword named after it."""
    return kwargs["optrun_pods"]


def _converge(
    memo: kopf.Memo, body: Mapping[str, Any], trigger: str, kwargs: Mapping[str, Any], **options: Any
) -> None:
    pods = _pods(kwargs)
    uid = str(body["metadata"]["uid"])
    controller: Controller = memo.controller
    try:
        controller.converge(
            body,
            trigger=trigger,
            indexed_pods=iter_store(pods.get(uid)),
            **options,
        )
    except Retry as retry:
        raise kopf.TemporaryError(str(retry), delay=retry.delay) from None
    finally:
        controller.pods_index = pods  # for the retries the controller queues itself


def on_create(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    _converge(memo, body, "create", kwargs)


def on_resume(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    _converge(memo, body, "resume", kwargs)


def on_update(body: kopf.Body, diff: kopf.Diff, memo: kopf.Memo, **kwargs: Any) -> None:
    changes = tuple(".".join(("spec", *map(str, d[1]))) for d in diff)
    _converge(memo, body, "update", kwargs, spec_changes=changes)


def on_timer(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    _converge(memo, body, "timer", kwargs, scrape_metrics=True)


def needs_a_look(status: kopf.Status, spec: kopf.Spec, **_: Any) -> bool:
    """Which runs the timer looks at: those that change without an event telling the operator.

    A running pod's progress and its live gates (hang, recovery budget) are only seen by looking;
    so are the deadline of a run waiting for a pod, a pod creation the API server refused (tried
    again), and the TTL of a finished run. Everything else reaches the operator as an event of
    the run or of its pod. Runs without a live timer carry no kopf finalizer: creating a
    thousand runs costs no thousand finalizer patches (see docs/operator.md)."""
    phase = status.get("phase")
    if phase in ("Running", "Recovering"):
        return True  # Recovering: a back-off's end is seen only by looking, too
    if phase == "Pending":
        conditions = {c.get("type"): c for c in status.get("conditions") or []}
        return (
            spec.get("activeDeadlineSeconds") is not None
            or (conditions.get("Scheduled") or {}).get("reason") == "PodCreateFailed"
            or (conditions.get("Running") or {}).get("reason") in CONTAINER_START_REASONS
        )
    return phase in TERMINAL_PHASES and spec.get("ttlSecondsAfterFinished") is not None


def on_pod_event(
    event: kopf.RawEvent, body: kopf.Body, labels: kopf.Labels, memo: kopf.Memo, **kwargs: Any
) -> None:
    kind = event.get("type")
    if kind is None:
        return  # the initial listing: the runs' resume handlers look at every run anyway
    uid = labels[builders.LABEL_RUN_UID]
    controller: Controller = memo.controller
    if kind == "DELETED":
        controller.cache.remember_pod(uid, body, deleted=True)
    run = controller.cache.run(uid)
    if run is None or (run.get("metadata") or {}).get("deletionTimestamp"):
        return
    # kopf never retries an event handler (it logs the error and drops the event), and a run
    # without a live timer gets no other look: the controller looks again itself.
    name = run["metadata"].get("name")
    try:
        _converge(memo, run, "pod", kwargs)
    except kopf.TemporaryError as err:
        log.info("%s: will look again in %gs: %s", name, err.delay or 5.0, err)
        controller.retry_later(uid, err.delay or 5.0)
    except Exception:  # not an API error: a bug, logged with its traceback, and looked at again
        log.exception("%s: reconcile failed; will look again in %gs", name, controller.bug_delay)
        controller.retry_later(uid, controller.bug_delay)


async def on_run_event(event: kopf.RawEvent, body: kopf.Body, uid: str, memo: kopf.Memo, **_: Any) -> None:
    if event.get("type") == "DELETED":
        memo.controller.forget(uid)
        memo.specs.forget(uid)
    else:
        memo.controller.cache.remember_run(dict(body))


def on_validate(body: kopf.Body, warnings: list[str], **kwargs: Any) -> None:
    """The admission webhook: the same field-named lines as `optrun validate` (admission.review)."""
    operation, old = str(kwargs.get("operation")), kwargs.get("old")
    new = dict(body)
    before = dict(old) if old is not None else None
    problems = admission.review(operation, new, before)
    if problems:
        raise kopf.AdmissionError("\n".join(problems), code=422)
    warnings.extend(admission.warnings(operation, new, before))


def on_cleanup(memo: kopf.Memo, **_: Any) -> None:
    """The operator stops (SIGTERM): write the status writes it is still batching."""
    memo.controller.flush()


def build_registry(cfg: config.OperatorConfig) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    # kopf's watches authenticate as the operator's own API calls do (optrun.operator.kube): the
    # in-cluster ServiceAccount, else the kubeconfig; a registry of our own gets no default.
    kopf.on.login(registry=registry)(kopf.login_via_client)
    kopf.on.startup(registry=registry)(configure)
    kopf.on.cleanup(registry=registry)(on_cleanup)
    kopf.index(*PODS, id="optrun_pods", labels={builders.LABEL_RUN_UID: kopf.PRESENT}, registry=registry)(
        index_pods
    )
    kopf.on.create(*RUNS, id="reconcile-create", registry=registry)(on_create)
    kopf.on.resume(*RUNS, id="reconcile-resume", registry=registry)(on_resume)
    kopf.on.update(*RUNS, id="reconcile-update", field="spec", registry=registry)(on_update)
    kopf.timer(
        *RUNS,
        id="reconcile-timer",
        interval=cfg.scrape_interval_seconds,
        when=needs_a_look,
        registry=registry,
    )(on_timer)
    kopf.on.event(*PODS, id="pod-event", labels={builders.LABEL_RUN_UID: kopf.PRESENT}, registry=registry)(
        on_pod_event
    )
    kopf.on.event(*RUNS, id="run-event", registry=registry)(on_run_event)
    if cfg.webhook != "off":
        kopf.on.validate(
            *RUNS,
            id=admission.HANDLER_ID,
            operations=list(admission.OPERATIONS),
            side_effects=False,
            ignore_failures=cfg.webhook_failure_policy == "Ignore",
            registry=registry,
        )(on_validate)
    return registry


def run(argv: Sequence[str]) -> int:
    """`optrun operator [options]`: validate the configuration, then run kopf until a signal."""
    args = list(argv)
    if args[:1] == ["--"]:
        args = args[1:]  # `optrun operator -- --flag ...`: argparse's REMAINDER keeps the separator
    try:
        cfg, verbose = config.load(args)
    except ManifestError as exc:
        for line in exc.problems:
            print(f"error: {line}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    if not verbose:
        # kopf logs every handler and timer run per object at INFO: at a thousand runs that is the
        # whole log. Its warnings and errors stay.
        logging.getLogger("kopf").setLevel(logging.WARNING)
        # ... except when a replica pauses for another or resumes: that is how HA is followed.
        logging.getLogger("kopf._core.engines.peering").setLevel(logging.INFO)
    certificate = None
    if cfg.webhook != "off":
        try:
            certificate = admission.certificate(cfg)
        except (OSError, subprocess.CalledProcessError) as exc:
            print(
                f"error: webhook: no certificate ({exc}); give --webhook-cert-dir (tls.crt, tls.key), install "
                "openssl for a self-signed one, or set --webhook off",
                file=sys.stderr,
            )
            return 2
    kube = load_client(cfg.api_timeout_seconds, connections=cfg.workers + 4)
    memo = kopf.Memo(
        cfg=cfg, controller=Controller(cfg, kube), specs=SpecMemory(), webhook_certificate=certificate
    )
    kopf.run(
        registry=build_registry(cfg),
        memo=memo,
        clusterwide=cfg.clusterwide,
        namespaces=cfg.namespaces,
        liveness_endpoint=f"http://0.0.0.0:{cfg.health_port}/healthz" if cfg.health_port else None,
    )
    return 0
