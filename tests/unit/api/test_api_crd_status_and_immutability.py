"""The generated CRD's status conditions (a list-map on type, reason required, date-time times),
the spec's unknown fields kept for the webhook, and the CEL immutability rules generated from
optrun.api.mutability."""

from __future__ import annotations

from typing import Any

from optrun.api import crd, mutability


def _schema() -> dict[str, Any]:
    return crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_conditions_are_a_list_map_on_type_with_reason_required_and_date_time_times() -> None:
    status = _schema()["properties"]["status"]["properties"]
    conditions = status["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    item = conditions["items"]
    assert set(item["required"]) >= {"type", "status", "reason", "lastTransitionTime"}  # map keys must be
    assert item["properties"]["reason"]["minLength"] == 1
    assert item["properties"]["lastTransitionTime"]["format"] == "date-time"
    assert item["properties"]["observedGeneration"]["minimum"] == 0
    for field in ("startTime", "completionTime", "nextAttemptTime"):
        assert status[field]["format"] == "date-time"


def test_every_spec_object_keeps_unknown_fields_for_the_webhook_to_refuse_by_name() -> None:
    def objects(node: dict[str, Any], path: str) -> list[tuple[str, dict[str, Any]]]:
        found = [(path, node)] if node.get("properties") else []
        for name, sub in node.get("properties", {}).items():
            found += objects(sub, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            found += objects(node["items"], f"{path}[]")
        return found

    spec = _schema()["properties"]["spec"]
    unpruned = [
        p for p, node in objects(spec, "spec") if not node.get("x-kubernetes-preserve-unknown-fields")
    ]
    assert unpruned == []
    assert not _schema()["properties"]["status"].get("x-kubernetes-preserve-unknown-fields")


def test_a_cel_rule_guards_every_immutable_field_whose_size_the_schema_bounds() -> None:
    spec = _schema()["properties"]["spec"]
    guarded, webhook_only = crd.immutable_fields(spec)
    rules = _schema()["x-kubernetes-validations"]
    assert [r["fieldPath"] for r in rules] == [f".spec.{p}" for p in guarded]
    # Unions of a name and a source object (kept unknown fields, no type) and maps without
    # maxProperties have no size the API server can bound: the webhook alone guards them.
    assert webhook_only == [
        "workload.model",
        "workload.dataset",
        "rlvr.rewards",
        "acceptance.speedups",
        "acceptance.memory",
        "acceptance.baseline.tolerances",
    ]
    # Nothing mutable is guarded; every immutable top-level field is, or is split into guarded parts.
    assert not [p for p in guarded if mutability.is_mutable(p)]
    for top in spec["properties"]:
        if not mutability.is_mutable(top) and not any(m.startswith(top + ".") for m in mutability.MUTABLE):
            assert any(p == top or p.startswith(top + ".") for p in guarded + webhook_only), top
    assert "safety.nonFiniteLoss" in guarded and "safety.hangTimeoutSeconds" not in guarded
    # workload is split: its sources are the webhook's, its bounded fields each have a rule.
    assert "workload" not in guarded and "workload.sequenceLength" in guarded
    length = next(r for r in rules if r["fieldPath"] == ".spec.workload.sequenceLength")
    assert length["rule"].startswith("!(has(oldSelf.status) && has(oldSelf.status.attempts)")
    assert "self.spec.workload.sequenceLength == oldSelf.spec.workload.sequenceLength" in length["rule"]
    assert length["reason"] == "FieldValueForbidden" and "may not change" in length["message"]


def test_the_bound_check_tells_bounded_values_from_unbounded_ones() -> None:
    assert crd._bounded({"type": "string", "maxLength": 10})
    assert crd._bounded({"type": "string", "enum": ["a"]})
    assert not crd._bounded({"type": "string"})
    assert not crd._bounded({"type": "array", "items": {"type": "integer"}})
    assert crd._bounded({"type": "array", "maxItems": 3, "items": {"type": "integer"}})
    assert not crd._bounded({"type": "object", "additionalProperties": {"type": "number"}})


def test_changed_paths_compare_mappings_by_key_and_lists_whole() -> None:
    old = {
        "training": {"epochs": 1, "checkpoint": {"keep": 2}},
        "faults": [{"type": "oom"}],
        "suspend": False,
    }
    new = {"training": {"epochs": 2, "checkpoint": {"keep": 2}}, "faults": [], "suspend": True}
    assert list(mutability.changed_paths(old, new)) == ["faults", "suspend", "training.epochs"]
    assert mutability.immutable_changes(old, new) == ["faults", "training.epochs"]
