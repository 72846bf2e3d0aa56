"""The operator's RBAC: exactly the verbs it uses, each with the reason, as data.

The Helm chart renders these rules (charts/optrun/templates/operator-rbac.yaml) and a test
compares the two, so the chart can neither grant more nor forget one. A ClusterRole when the
operator watches every namespace; the same rules in a Role per namespace when it watches a list.

What the operator never gets: Secrets (the runtime pod mounts none and has no token), pods/exec,
pods/log, nodes, PersistentVolumes or claims (a claim is the user's, named in the spec and only
referenced by the pod), and anything in rbac.authorization.k8s.io.
"""

from __future__ import annotations

from typing import Any, TypedDict

from optrun.api import v1alpha1 as api


class Rule(TypedDict):
    apiGroups: list[str]
    resources: list[str]
    verbs: list[str]
    why: str


RULES: list[Rule] = [
    {
        "apiGroups": [api.GROUP],
        "resources": [api.PLURAL],
        "verbs": ["get", "list", "watch", "patch", "delete"],
        "why": (
            "list/watch: kopf's handlers and index follow the runs; get: read a run again after a status "
            "write met a conflict (409); patch: kopf's optrun.io/ annotations (last handled spec, handler "
            "progress) and its finalizer while a run has a live timer; delete: ttlSecondsAfterFinished."
        ),
    },
    {
        "apiGroups": [api.GROUP],
        "resources": [f"{api.PLURAL}/status"],
        "verbs": ["patch"],
        "why": "patch: phase, conditions, decision, progress, attempts: the whole status, by merge patch.",
    },
    {
        "apiGroups": [api.GROUP],
        "resources": [f"{api.PLURAL}/finalizers"],
        "verbs": ["update"],
        "why": (
            "update: the children's owner references set blockOwnerDeletion; clusters with the "
            "OwnerReferencesPermissionEnforcement admission plugin require update on the owner's "
            "finalizers for that."
        ),
    },
    {
        "apiGroups": [""],
        "resources": ["pods"],
        "verbs": ["get", "list", "watch", "create", "delete"],
        "why": (
            "create: one runtime pod per attempt; list/watch: kopf's pod index (label optrun.io/run-uid, "
            "server-side) and the pod events that trigger a reconcile; get: confirm that a pod the watch "
            "no longer shows is really gone, and that a 409 on create is this run's own pod; delete: "
            "suspend, live gates (hang, recovery budget), deadline, a run that failed."
        ),
    },
    {
        "apiGroups": [""],
        "resources": ["configmaps"],
        "verbs": ["get", "create"],
        "why": (
            "create: the run's spec file (<run>-spec) and, once it succeeded, its result (<run>-result, "
            "a later run's baseline), both immutable, never updated; get: check that a 409 on "
            "create is this run's own ConfigMap. Deletion is the garbage collector's (owner references)."
        ),
    },
    {
        "apiGroups": [""],
        "resources": ["services"],
        "verbs": ["get", "create"],
        "why": (
            "create: the headless Service of a multi-node run (<run>), its pods' DNS names for the "
            "rendezvous; get: check that a 409 on create is this run's own. Deletion is the garbage "
            "collector's (owner references)."
        ),
    },
    {
        "apiGroups": [""],
        "resources": ["events"],
        "verbs": ["create"],
        "why": "create: an Event for every transition of a run (and kopf's own warnings); never updated.",
    },
    {
        "apiGroups": ["kopf.dev"],
        "resources": ["clusterkopfpeerings", "kopfpeerings"],
        "verbs": ["list", "watch", "patch"],
        "why": (
            "high availability: list/watch the peering object to see which replica is active; patch its "
            "status with this replica's keep-alives (clusterkopfpeerings cluster-wide, kopfpeerings per namespace)."
        ),
    },
]


# Only for `--webhook managed` (an operator on a developer's machine registering its own webhook):
# cluster-scoped, so a ClusterRole whatever namespaces it watches. The chart installs the webhook
# configuration itself (`--webhook serve`) and never grants this.
MANAGED_WEBHOOK_RULES: list[Rule] = [
    {
        "apiGroups": ["admissionregistration.k8s.io"],
        "resources": ["validatingwebhookconfigurations"],
        "verbs": ["create", "patch"],
        "why": (
            "create: the ValidatingWebhookConfiguration --webhook-configuration, once (409 if it exists); patch: "
            "point its webhook at this operator's URL and certificate, and take it out on a clean exit."
        ),
    },
]


def _rules() -> list[dict[str, Any]]:
    return [{k: list(rule[k]) for k in ("apiGroups", "resources", "verbs")} for rule in RULES]


def manifests(
    *, name: str, namespace: str, service_account: str, watch_namespaces: list[str] | None = None
) -> list[dict[str, Any]]:
    """ServiceAccount + ClusterRole/ClusterRoleBinding (every namespace) or a Role/RoleBinding per
    watched namespace, granting RULES and nothing else."""
    labels = {"app.kubernetes.io/name": "optrun", "app.kubernetes.io/component": "operator"}
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": service_account, "namespace": namespace, "labels": labels},
            # The operator talks to the API with a projected token of its own; nothing else mounts it.
        }
    ]
    subject = {"kind": "ServiceAccount", "name": service_account, "namespace": namespace}
    if not watch_namespaces:
        docs += [
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRole",
                "metadata": {"name": name, "labels": labels},
                "rules": _rules(),
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": name, "labels": labels},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
                "subjects": [subject],
            },
        ]
        return docs
    for ns in watch_namespaces:
        docs += [
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": name, "namespace": ns, "labels": labels},
                "rules": _rules(),
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": name, "namespace": ns, "labels": labels},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                "subjects": [subject],
            },
        ]
    return docs
