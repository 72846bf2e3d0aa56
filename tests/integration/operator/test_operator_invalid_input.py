"""Bad input at the cluster's door: generated invalid OptimizationRuns, each rejected naming its field.

The mutations are derived from the spec models themselves (optrun/api/v1alpha1.py): every
bounded number gets values outside its bounds, every choice an unknown value, every field a
value of the wrong type, every required field goes missing, and the cross-field rules a schema
cannot express (pass-rate order, weights that do not sum to 1, gradient bounds, speedup ranges
and keys, built-in model names) are broken. Each manifest is refused either by the API server's
schema (422, the message names the field) or, once stored, by the operator's validation
(Failed/InvalidSpec, the message names the field), and never gets a pod.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import re
import types
import typing
from typing import Any, Literal

import annotated_types
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes.client.rest import ApiException
from pydantic import BaseModel

from optrun.api.errors import ManifestError
from optrun.api.v1alpha1 import OptimizationRunSpec, Spec, parse_manifest
from tests.integration.operator.conftest import Runs, tiny_spec
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

EXAMPLES = 220

# List items the walker descends into, valid as given.
LIST_ITEMS = {"faults": {"type": "nan-loss", "atStep": 10}, "tolerations": {"operator": "Exists"}}
DICT_ITEMS = {"speedups": ("kernels", {"min": 1.0, "max": 2.0})}


@dataclasses.dataclass(frozen=True)
class Mutation:
    """Set `path` (list index as int) to `value`, or delete it (value is MISSING)."""

    path: tuple[str | int, ...]
    value: Any
    kind: str
    mentions: str  # what the rejection must name (a field path, camelCase)

    def apply(self, spec: dict[str, Any]) -> dict[str, Any]:
        out = copy.deepcopy(spec)
        node: Any = out
        for key in self.path[:-1]:
            if isinstance(key, int):
                node = node[key]
            else:
                node = node.setdefault(key, {})
        if self.value is MISSING:
            node.pop(self.path[-1], None)
        else:
            node[self.path[-1]] = self.value
        return out


MISSING = object()


def _dotted(path: tuple[str | int, ...]) -> str:
    return "spec" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)


def _base(spec: dict[str, Any]) -> dict[str, Any]:
    """The valid manifest every mutation starts from: one of each list item, one speedup range."""
    spec = copy.deepcopy(spec)
    spec["faults"] = [dict(LIST_ITEMS["faults"])]
    spec["scheduling"] = {"tolerations": [dict(LIST_ITEMS["tolerations"])]}
    spec.setdefault("acceptance", {})["speedups"] = {
        DICT_ITEMS["speedups"][0]: dict(DICT_ITEMS["speedups"][1])
    }
    return spec


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(the type inside Optional/Annotated, whether None is allowed)"""
    nullable = False
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            nullable = nullable or len(args) < len(typing.get_args(annotation))
            if len(args) != 1:
                return annotation, nullable
            annotation = args[0]
        else:
            return annotation, nullable


def _bounds(metadata: list[Any]) -> dict[str, Any]:
    """ge/gt/le/lt, max_length and pattern constraints of a field."""
    out: dict[str, Any] = {}
    for m in metadata:
        for attr in ("ge", "gt", "le", "lt"):
            if isinstance(m, getattr(annotated_types, attr.capitalize())):
                out[attr] = getattr(m, attr)
        if isinstance(m, annotated_types.MaxLen):
            out["max_length"] = m.max_length
        if getattr(m, "pattern", None):
            out["pattern"] = m.pattern
    return out


def leaves(
    model: type[BaseModel], prefix: tuple[str | int, ...] = ()
) -> list[tuple[tuple[str | int, ...], Any, Any]]:
    """(path, annotation, field) of every field of `model` and of the models inside it."""
    found = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        path = (*prefix, key)
        inner, _ = _unwrap(field.annotation)
        found.append((path, field.annotation, field))
        if isinstance(inner, type) and issubclass(inner, Spec):
            found += leaves(inner, path)
        elif typing.get_origin(inner) is list and key in LIST_ITEMS:
            item = typing.get_args(inner)[0]
            found += leaves(item, (*path, 0))
        elif typing.get_origin(inner) is dict and key in DICT_ITEMS:
            item = typing.get_args(inner)[1]
            found += leaves(item, (*path, DICT_ITEMS[key][0]))
    return found


def _wrong_type(inner: Any) -> list[Any]:
    if inner is bool:
        return ["yes", 1, [True]]
    if inner is int:
        return ["seven", 1.5, True, [1]]
    if inner is float:
        return ["fast", True, {"value": 1}]
    if inner is str:
        return [123, True, ["a"]]
    origin = typing.get_origin(inner)
    if origin is Literal:
        return [7, False]
    if origin is list:
        return ["not-a-list", 3]
    if origin is dict or (isinstance(inner, type) and issubclass(inner, BaseModel)):
        return ["not-a-mapping", 5, [1, 2]]
    return []


def mutations() -> list[Mutation]:
    """Every way, derived from the models, to make the base manifest invalid."""
    out: list[Mutation] = []
    for path, annotation, field in leaves(OptimizationRunSpec):
        inner, _ = _unwrap(annotation)
        dotted = _dotted(path)
        for value in _wrong_type(inner):
            out.append(Mutation(path, value, "wrong type", dotted))
        b = _bounds([*field.metadata, *getattr(annotation, "__metadata__", ())])
        for m in getattr(annotation, "__metadata__", ()):
            b.update(_bounds(list(getattr(m, "metadata", []))))
        if inner is str and "max_length" in b:
            out.append(Mutation(path, "x" * (b["max_length"] + 1), "out of range", dotted))
        if inner is str and "pattern" in b:
            out.append(Mutation(path, "not a valid form!", "wrong form", dotted))
        if inner in (int, float):
            step = 1 if inner is int else 1e-3
            if "ge" in b:
                out.append(Mutation(path, b["ge"] - step, "out of range", dotted))
            if "gt" in b:
                out.append(Mutation(path, b["gt"], "out of range", dotted))
            if "le" in b:
                out.append(
                    Mutation(path, b["le"] + step * (1000 if inner is int else 1), "out of range", dotted)
                )
            if "lt" in b:
                out.append(Mutation(path, b["lt"], "out of range", dotted))
        if typing.get_origin(inner) is Literal:
            out.append(Mutation(path, "definitely-not-a-choice", "unknown enum", dotted))
        if field.is_required():
            out.append(Mutation(path, MISSING, "missing field", dotted))
    # What only the operator's validation sees (the schema cannot express it).
    out += [
        Mutation(("acceptance", "minimumPassRate"), 0.99, "cross-field", "minimumPassRate"),
        Mutation(("acceptance", "weights", "passRate"), 0.5, "cross-field", "spec.acceptance.weights"),
        Mutation(("safety", "gradientFlow", "minNorm"), 1e5, "cross-field", "spec.safety.gradientFlow"),
        Mutation(
            ("acceptance", "speedups", "kernels", "min"), 9.0, "cross-field", "spec.acceptance.speedups"
        ),
        Mutation(
            ("acceptance", "speedups", "turbo"), {"min": 1.0}, "cross-field", "spec.acceptance.speedups"
        ),
        Mutation(("workload", "model"), "giant-lm", "cross-field", "spec.workload.model"),
    ]
    return out


MUTATIONS = mutations()
BY_KIND = {kind: [m for m in MUTATIONS if m.kind == kind] for kind in sorted({m.kind for m in MUTATIONS})}
# The kind first, then a mutation of that kind: a rare kind (4 required fields among 400 ways to
# break a manifest) is drawn as often as a common one.
ANY_MUTATION = st.sampled_from(sorted(BY_KIND)).flatmap(lambda kind: st.sampled_from(BY_KIND[kind]))


def names(mutation: Mutation, message: str) -> bool:
    """Whether `message` names the mutated field, in any of the spellings of a list item:
    spec.faults[0].type (ours), spec.faults.type (the API server's), spec.faults.0.type (pydantic's)."""
    field = mutation.mentions
    spellings = {field, re.sub(r"\[\d+\]", "", field), re.sub(r"\[(\d+)\]", r".\1", field)}
    return any(s in message for s in spellings)


def invalid(spec: dict[str, Any]) -> bool:
    """Whether the operator's own validation refuses the spec (the schema may refuse it first: it
    is stricter about types, e.g. `true` for an integer, which pydantic's lax mode would take as 1)."""
    try:
        parse_manifest(
            {
                "apiVersion": "optrun.io/v1alpha1",
                "kind": "OptimizationRun",
                "metadata": {"name": "x"},
                "spec": spec,
            }
        )
    except ManifestError:
        return True
    return False


def test_generated_invalid_manifests_are_each_rejected_naming_the_field(
    start_operator: Any, runs: Runs, namespace: str
) -> None:
    operator = start_operator(namespace)
    base = _base(
        tiny_spec(workload={"batchSize": 16}, resources={"gpus": 16})
    )  # were one accepted, its pod would stay Pending
    assert not invalid(base), "the base manifest must be valid"
    counter = itertools.count()
    by_schema: list[Mutation] = []
    stored: dict[str, Mutation] = {}
    kinds: set[str] = set()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(ANY_MUTATION)
    def one(mutation: Mutation) -> None:
        spec = mutation.apply(base)
        name = f"bad-{next(counter)}"
        kinds.add(mutation.kind)
        try:
            runs.create(name, spec)
        except ApiException as err:
            assert err.status == 422, (mutation, err.body)
            message = json.loads(err.body)["message"]
            assert names(mutation, message), (mutation, message)
            by_schema.append(mutation)
            return
        assert invalid(spec), f"the API server stored a run the operator would accept: {mutation}"
        stored[name] = mutation

    one()
    assert len(by_schema) + len(stored) >= 200
    assert kinds == {
        "wrong type",
        "out of range",
        "unknown enum",
        "missing field",
        "wrong form",
        "cross-field",
    }
    assert by_schema and stored, "both the schema and the operator's validation were exercised"

    def all_refused() -> bool:
        for name in stored:
            cond = runs.conditions(name).get("Failed")
            if not cond or cond["reason"] != "InvalidSpec":
                return False
        return True

    wait_for(all_refused, timeout=60, message="every stored invalid run to be Failed/InvalidSpec")
    for name, mutation in stored.items():
        status = runs.status(name)
        assert status["phase"] == "Failed"
        assert names(mutation, status["message"]), (mutation, status["message"])
    assert not runs.core.list_namespaced_pod(namespace).items, "no pod for an invalid run"
    assert operator.alive and operator.starts == 1, "the operator never crashed"


def test_with_the_webhook_every_generated_invalid_manifest_is_refused_at_the_door(
    start_operator: Any, runs: Runs, namespace: str, kube: Any
) -> None:
    from kubernetes import client as k8s

    operator = start_operator(namespace, webhook="managed")
    admission = k8s.AdmissionregistrationV1Api(kube)
    wait_for(
        lambda: admission.read_validating_webhook_configuration(f"{namespace}.optrun.io").webhooks,
        timeout=30,
        message="the operator to register its webhook",
    )
    base = _base(tiny_spec(workload={"batchSize": 16}, resources={"gpus": 16}))
    counter = itertools.count()
    refused: list[str] = []

    @settings(
        max_examples=120,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(ANY_MUTATION)
    def one(mutation: Mutation) -> None:
        spec = mutation.apply(base)
        try:
            runs.create(f"bad-{next(counter)}", spec)
        except ApiException as err:
            assert err.status == 422, (mutation, err.body)
            message = json.loads(err.body)["message"]
            assert names(mutation, message), (mutation, message)
            refused.append(mutation.kind)
            return
        raise AssertionError(f"stored past the webhook: {mutation}")

    one()
    assert "cross-field" in refused, "the rules a schema cannot express were refused at the door too"
    items = runs.objects.list_namespaced_custom_object("optrun.io", "v1alpha1", namespace, "optimizationruns")
    assert not items["items"] and operator.alive
