"""Which spec fields may change once a run has started, and when a change takes effect.

Every attempt of a run trains under the spec the run started with (the operator writes it once,
into the run's immutable ConfigMap): a checkpoint only resumes under the spec that made it, and a
run judged GO must have been judged on one spec. So once the first attempt has started
(`status.attempts > 0`) only these fields may change:

- at once: `suspend`, `activeDeadlineSeconds`, `backoffLimit`, `ttlSecondsAfterFinished` and the
  live gates `safety.hangTimeoutSeconds`, `safety.maxRecoveries`;
- from the next attempt: `image`, `resources`, `scheduling` (the pod's shape; raising
  `resources.memory` after an OOMKilled attempt helps the retry).

Every other field is immutable from then on. One list, three readers: the admission webhook
refuses the edit (optrun.operator.admission), the CRD carries the same rule as CEL for API
servers that evaluate it (optrun.api.crd), and the reconcile ignores an edit that got past both
(a webhook that was down with failurePolicy Ignore) without counting it as acted on.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

# Paths relative to `spec`, dotted, camelCase as on the wire.
AT_ONCE = (
    "suspend",
    "activeDeadlineSeconds",
    "backoffLimit",
    "ttlSecondsAfterFinished",
    "safety.hangTimeoutSeconds",
    "safety.maxRecoveries",
)
NEXT_ATTEMPT = ("image", "resources", "scheduling")
MUTABLE = AT_ONCE + NEXT_ATTEMPT


def _under(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == root or path.startswith(root + ".") for root in roots)


def is_mutable(path: str) -> bool:
    """Whether a started run's `spec.<path>` may change."""
    return _under(path, MUTABLE)


def takes_effect_next_attempt(path: str) -> bool:
    return _under(path, NEXT_ATTEMPT)


def changed_paths(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    """Dotted paths whose values differ: mappings are compared key by key, everything else
    (lists included: a fault list is one value) as a whole."""
    for key in sorted(set(old) | set(new), key=str):
        path = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            yield from changed_paths(a, b, path + ".")
        elif a != b:
            yield path


def immutable_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The paths (relative to spec) a started run may not change, that differ between two specs."""
    return [p for p in changed_paths(old, new) if not is_mutable(p)]


def describe() -> str:
    """What may change, in one line for error messages and Events."""
    return (
        f"what may change once a run has started: {', '.join(AT_ONCE)} (at once) and "
        f"{', '.join(NEXT_ATTEMPT)} (from the next attempt); create a new run for anything else"
    )
