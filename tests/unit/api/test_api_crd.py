"""The CRD: generated from the models, committed, structural, and in step with the models.

The API server accepts only a *structural* schema (every node typed, no $ref, no logic
junctors carrying types or defaults); it prunes fields the schema does not name and applies the
schema's defaults. So the committed file must be exactly what the models generate, every node
must be typed, and the defaults it applies must be the ones the models apply locally.
"""

from __future__ import annotations

import copy
import difflib
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from optrun.api import crd
from optrun.api import v1alpha1 as api

ROOT = Path(__file__).resolve().parents[3]
CRD_FILE = ROOT / "crds" / "optrun.io_optimizationruns.yaml"
REGENERATE = ".venv/bin/optrun crd --output crds/optrun.io_optimizationruns.yaml"

# The fields of apiextensions.k8s.io/v1 JSONSchemaProps; anything else is dropped or refused.
SCHEMA_KEYS = {
    "description",
    "type",
    "format",
    "title",
    "default",
    "maximum",
    "exclusiveMaximum",
    "minimum",
    "exclusiveMinimum",
    "maxLength",
    "minLength",
    "pattern",
    "maxItems",
    "minItems",
    "multipleOf",
    "enum",
    "maxProperties",
    "minProperties",
    "required",
    "items",
    "properties",
    "additionalProperties",
    "nullable",
    "example",
    "externalDocs",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-int-or-string",
    "x-kubernetes-embedded-resource",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
    "x-kubernetes-validations",
}
FORBIDDEN = {"$ref", "$defs", "definitions", "anyOf", "allOf", "oneOf", "not", "const", "uniqueItems"}
TYPES = {"object", "array", "string", "integer", "number", "boolean"}


def structural_problems(node: Any, path: str = "") -> list[str]:
    """Why `node` is not a structural schema Kubernetes accepts (empty when it is)."""
    if not isinstance(node, dict):
        return [f"{path or '/'}: a schema node must be a mapping"]
    problems = [f"{path}: {key} is not allowed in a structural schema" for key in FORBIDDEN & node.keys()]
    problems += [f"{path}: unknown schema key {key}" for key in node.keys() - SCHEMA_KEYS - FORBIDDEN]
    free = node.get("x-kubernetes-preserve-unknown-fields") is True
    kind = node.get("type")
    if kind is None and not free:
        problems.append(f"{path}: no type and no x-kubernetes-preserve-unknown-fields")
    elif kind is not None and kind not in TYPES:
        problems.append(f"{path}: unknown type {kind!r}")
    if "properties" in node and isinstance(node.get("additionalProperties"), dict):
        problems.append(f"{path}: properties and additionalProperties together")
    if node.get("additionalProperties") is False:
        problems.append(f"{path}: additionalProperties: false is not allowed")
    if kind == "array" and not isinstance(node.get("items"), dict):
        problems.append(f"{path}: an array needs one items schema")
    for name in node.get("required", []):
        if name not in node.get("properties", {}):
            problems.append(f"{path}: required field {name} is not a property")
    for name, sub in node.get("properties", {}).items():
        problems += structural_problems(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        problems += structural_problems(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        problems += structural_problems(node["additionalProperties"], f"{path}{{}}")
    if "default" in node:
        problems += [f"{path}: default {p}" for p in value_problems(node["default"], node)]
    return problems


def value_problems(value: Any, node: dict[str, Any]) -> list[str]:
    """Why `value` does not validate against `node` (types, enums, bounds, lengths)."""
    if value is None:
        return [] if node.get("nullable") else ["null where the node is not nullable"]
    if node.get("x-kubernetes-preserve-unknown-fields") and "type" not in node:
        return []
    python = {
        "object": dict,
        "array": list,
        "string": str,
        "boolean": bool,
        "integer": int,
        "number": (int, float),
    }
    kind = node["type"]
    if not isinstance(value, python[kind]) or (kind in {"integer", "number"} and isinstance(value, bool)):
        return [f"{value!r} is not of type {kind}"]
    problems = []
    if "enum" in node and value not in node["enum"]:
        problems.append(f"{value!r} is not one of {node['enum']}")
    if "minimum" in node and (
        value < node["minimum"] or (node.get("exclusiveMinimum") and value == node["minimum"])
    ):
        problems.append(f"{value!r} is below the minimum {node['minimum']}")
    if "maximum" in node and (
        value > node["maximum"] or (node.get("exclusiveMaximum") and value == node["maximum"])
    ):
        problems.append(f"{value!r} is above the maximum {node['maximum']}")
    if kind == "array":
        if len(value) < node.get("minItems", 0) or len(value) > node.get("maxItems", len(value)):
            problems.append(f"{value!r} has a length outside {node.get('minItems')}..{node.get('maxItems')}")
        for item in value:
            problems += value_problems(item, node["items"])
    if kind == "object":
        for key, item in value.items():
            sub = node.get("properties", {}).get(key) or node.get("additionalProperties")
            if not isinstance(sub, dict):
                problems.append(f"field {key} is not in the schema")
            else:
                problems += value_problems(item, sub)
    return problems


def version() -> dict[str, Any]:
    return crd.crd()["spec"]["versions"][0]


def schema() -> dict[str, Any]:
    return version()["schema"]["openAPIV3Schema"]


# -- the committed file ----------------------------------------------------------------------------


def test_committed_crd_equals_the_generated_one() -> None:
    committed = CRD_FILE.read_text() if CRD_FILE.exists() else ""
    generated = crd.render()
    if committed != generated:
        diff = "".join(
            list(
                difflib.unified_diff(
                    committed.splitlines(keepends=True),
                    generated.splitlines(keepends=True),
                    "crds/optrun.io_optimizationruns.yaml (committed)",
                    "optrun.api.crd.render() (from the models)",
                )
            )[:60]
        )
        pytest.fail(
            f"the committed CRD has drifted from optrun/api/v1alpha1.py; regenerate it with\n"
            f"    {REGENERATE}\nand commit the result.\n{diff}"
        )


def test_committed_crd_is_one_yaml_document_the_generator_reads_back() -> None:
    docs = list(yaml.safe_load_all(CRD_FILE.read_text()))
    assert docs == [crd.crd()]


# -- structural --------------------------------------------------------------------------------------


def test_schema_is_structural() -> None:
    problems = structural_problems(schema())
    assert not problems, "\n".join(problems)


def test_structural_checker_finds_what_the_api_server_refuses() -> None:
    # The checker itself must catch each kind of problem, or the test above proves nothing.
    bad = {
        "type": "object",
        "properties": {
            "untyped": {"description": "no type"},
            "ref": {"$ref": "#/definitions/X"},
            "either": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
            "one": {"type": "string", "const": "x"},
            "badDefault": {"type": "integer", "minimum": 1, "default": 0},
            "list": {"type": "array"},
        },
        "required": ["missing"],
    }
    problems = "\n".join(structural_problems(bad))
    for where in (
        ".untyped: no type",
        ".ref: $ref",
        ".either: anyOf",
        ".one: const",
        ".badDefault: default",
        ".list: an array needs",
        "required field missing",
    ):
        assert where in problems, f"the checker missed {where!r}:\n{problems}"


def test_every_spec_field_is_described() -> None:
    def undescribed(node: dict[str, Any], path: str) -> list[str]:
        missing = [] if node.get("description") or not path else [path]
        for name, sub in node.get("properties", {}).items():
            missing += undescribed(sub, f"{path}.{name}")
        if isinstance(node.get("items"), dict) and node["items"].get("properties"):
            missing += undescribed({**node["items"], "description": "item"}, f"{path}[]")
        return missing

    assert undescribed(schema()["properties"]["spec"], "") == []


def test_spec_required_fields_are_the_ones_without_defaults() -> None:
    spec = schema()["properties"]["spec"]
    assert schema()["required"] == ["spec"]
    assert spec["required"] == ["workload"]
    assert spec["properties"]["workload"]["required"] == ["model"]
    assert sorted(spec["properties"]["faults"]["items"]["required"]) == ["atStep", "type"]


def test_enums_and_bounds_reach_the_schema() -> None:
    spec = schema()["properties"]["spec"]["properties"]
    assert spec["workload"]["properties"]["precision"]["enum"] == ["fp32", "bf16", "fp16"]
    assert spec["volumes"]["items"]["properties"]["mountPath"]["pattern"] == "^/"

    assert spec["safety"]["properties"]["nonFiniteLoss"]["enum"] == ["rollback", "skip", "fail"]
    lr = spec["training"]["properties"]["learningRate"]
    assert (lr["minimum"], lr.get("exclusiveMinimum"), lr["maximum"]) == (0.0, True, 1.0)
    batch = spec["optimizations"]["properties"]["kvCache"]["properties"]["batchSizes"]
    assert (batch["minItems"], batch["maxItems"], batch["items"]["minimum"]) == (1, 16, 1)


def test_a_name_or_a_source_is_free_form_in_the_schema_and_checked_by_the_models() -> None:
    """model and dataset take a name or an object: a structural schema cannot say "string or
    object", so the API server keeps them as given and `parse_manifest` (optrun validate, the
    operator) checks them."""
    workload = schema()["properties"]["spec"]["properties"]["workload"]["properties"]
    for name in ("model", "dataset"):
        assert workload[name].get("x-kubernetes-preserve-unknown-fields") is True, name
        assert "type" not in workload[name], name
    assert workload["dataset"]["default"] == "pydoc"


# -- names, columns, subresources -----------------------------------------------------------------


def test_crd_names_printer_columns_and_status_subresource() -> None:
    doc = crd.crd()
    assert doc["metadata"]["name"] == "optimizationruns.optrun.io"
    names = doc["spec"]["names"]
    assert names["kind"] == "OptimizationRun"
    assert names["plural"] == "optimizationruns"
    assert names["shortNames"] == ["optrun", "optruns"]
    assert doc["spec"]["scope"] == "Namespaced"
    v = version()
    assert (v["name"], v["served"], v["storage"]) == ("v1alpha1", True, True)
    assert v["subresources"] == {"status": {}}
    columns = {c["name"]: c for c in v["additionalPrinterColumns"]}
    assert {"Phase", "Decision", "Pass Rate", "Age"} <= columns.keys()
    assert columns["Phase"]["jsonPath"] == ".status.phase"
    assert columns["Decision"]["jsonPath"] == ".status.decision"
    assert columns["Pass Rate"]["jsonPath"] == ".status.passRate"
    assert columns["Age"] == {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


def test_printer_columns_point_at_status_fields_that_exist() -> None:
    status = schema()["properties"]["status"]["properties"]
    for column in version()["additionalPrinterColumns"]:
        path = column["jsonPath"]
        if path.startswith(".status."):
            field = path.removeprefix(".status.")
            assert field in status, f"printer column {column['name']} reads {path}, which the schema lacks"
            kind = status[field]["type"]
            assert column["type"] == kind or (column["type"], kind) == ("number", "number")


def test_status_schema_has_no_defaults() -> None:
    # A default in status would make the API server invent fields the operator never wrote.
    def defaults(node: Any) -> list[str]:
        if not isinstance(node, dict):
            return []
        found = ["default"] if "default" in node else []
        for value in node.values():
            found += defaults(value) if isinstance(value, dict) else []
        return found

    assert defaults(schema()["properties"]["status"]) == []


# -- defaults ----------------------------------------------------------------------------------------


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def default_mismatches(model: type[BaseModel], node: dict[str, Any], path: str) -> list[str]:
    """Walk a model and its schema node together: each field's default, as the wire shows it,
    must be the schema's default (a nested model: `{}`, which the API server fills in)."""
    problems = []
    props = node.get("properties", {})
    for name, field in model.model_fields.items():
        alias = field.alias or name
        where = f"{path}.{alias}"
        if alias not in props:
            problems.append(f"{where}: in the model, not in the schema")
            continue
        sub = props[alias]
        if field.is_required():
            if "default" in sub:
                problems.append(f"{where}: required in the model, defaulted in the schema")
            if alias not in node.get("required", []):
                problems.append(f"{where}: required in the model, optional in the schema")
        else:
            value = field.get_default(call_default_factory=True)
            wire = {} if isinstance(value, BaseModel) else value
            if wire is None:
                if "default" in sub:
                    problems.append(f"{where}: no default in the model, {sub['default']!r} in the schema")
            elif sub.get("default") != wire or type(sub.get("default")) is not type(wire):
                problems.append(f"{where}: model default {wire!r}, schema default {sub.get('default')!r}")
        inner = _model_in(field.annotation)
        if inner is not None and sub.get("x-kubernetes-preserve-unknown-fields") and "properties" not in sub:
            continue  # a name or an object (model, dataset): free-form in the schema, the models check it
        if inner is not None:
            target = sub["items"] if sub.get("type") == "array" else sub
            if "additionalProperties" in target and "properties" not in target:
                target = target["additionalProperties"]
            problems += default_mismatches(inner, target, where)
    extra = props.keys() - {f.alias or n for n, f in model.model_fields.items()}
    problems += [f"{path}.{name}: in the schema, not in the model" for name in sorted(extra)]
    return problems


def test_schema_defaults_equal_the_model_defaults() -> None:
    problems = default_mismatches(api.OptimizationRunSpec, schema()["properties"]["spec"], "spec")
    assert not problems, "\n".join(problems)


def test_api_server_defaulting_gives_the_models_defaults() -> None:
    # Apply the schema's defaults the way the API server does (nested objects from `{}` on down)
    # to a minimal spec; the result must validate into exactly the spec the models build locally.
    def apply_defaults(value: Any, node: dict[str, Any]) -> Any:
        if isinstance(value, dict) and "properties" in node:
            out = dict(value)
            for key, sub in node["properties"].items():
                if key not in out and "default" in sub:
                    out[key] = sub["default"]
                if key in out:
                    out[key] = apply_defaults(out[key], sub)
            return out
        if isinstance(value, list) and isinstance(node.get("items"), dict):
            return [apply_defaults(v, node["items"]) for v in value]
        return value

    minimal = {"workload": {"model": "tiny-lm"}, "faults": [{"type": "oom", "atStep": 3}]}
    defaulted = apply_defaults(minimal, schema()["properties"]["spec"])
    assert api.OptimizationRunSpec.model_validate(defaulted) == api.OptimizationRunSpec.model_validate(
        minimal
    )
    assert defaulted["training"]["checkpoint"]["everySteps"] == 50
    assert defaulted["faults"][0]["persistent"] is False


def test_default_walk_reports_a_schema_default_that_differs() -> None:
    node = copy.deepcopy(schema()["properties"]["spec"])
    node["properties"]["training"]["properties"]["epochs"]["default"] = 6
    del node["properties"]["safety"]["properties"]["gradientFlow"]["properties"]["maxNorm"]["default"]
    problems = default_mismatches(api.OptimizationRunSpec, node, "spec")
    assert problems == [
        "spec.training.epochs: model default 5, schema default 6",
        "spec.safety.gradientFlow.maxNorm: model default 10000.0, schema default None",
    ]
