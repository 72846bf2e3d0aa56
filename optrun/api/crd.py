"""Generate the OptimizationRun CustomResourceDefinition from the pydantic models.

The models are the source of truth (as Kubebuilder's `*_types.go` are for controller-gen):
this module turns their JSON schema into a Kubernetes *structural* OpenAPI v3 schema:
no `$ref` (definitions are inlined), `nullable` instead of `anyOf [..., null]`, OpenAPI 3.0
exclusive bounds, `default: {}` on nested objects so the API server applies nested defaults.

Unknown fields in the spec are kept, not pruned: every spec object carries
`x-kubernetes-preserve-unknown-fields`, so a misspelt field reaches the admission webhook, which
refuses it naming the field, on every API server version (an API server prunes before admission,
and only 1.25+ can be asked to refuse unknown fields itself). Were the webhook bypassed, the
operator refuses the stored run (InvalidSpec) for the same reason. Status is pruned as usual.

The immutability of a started run's spec (optrun.api.mutability) is also written as CEL
`x-kubernetes-validations`, for API servers that evaluate them (1.25+; 1.28+ for fieldPath and
reason); older ones drop the rules. One rule per immutable field, each bounded in cost: a field
whose size the schema does not bound (a map without maxProperties) is left to the webhook.

`crds/optrun.io_optimizationruns.yaml` is this output; a test fails when the two drift.
"""

from __future__ import annotations

import copy
import typing
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from optrun.api import mutability
from optrun.api import v1alpha1 as api

Schema = dict[str, Any]


def _models(root: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Every model class reachable from `root`, by class name (the key pydantic uses in $defs)."""
    found: dict[str, type[BaseModel]] = {}

    def visit(tp: Any) -> None:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if tp.__name__ in found:
                return
            found[tp.__name__] = tp
            for f in tp.model_fields.values():
                visit(f.annotation)
            return
        for arg in typing.get_args(tp):
            visit(arg)

    visit(root)
    return found


def _factory_default(field: FieldInfo) -> Any:
    """The default a `default_factory` produces, as the wire format (camelCase) shows it."""
    factory = field.default_factory
    if factory is None:
        return None
    value = factory()  # type: ignore[call-arg]
    if isinstance(value, BaseModel):
        return {}  # the API server fills in the nested defaults itself
    return value


def _structural(node: Any, defs: Schema, models: dict[str, type[BaseModel]]) -> Any:
    if isinstance(node, list):
        return [_structural(n, defs, models) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        merged = {**copy.deepcopy(defs[name]), **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs, models)
    union = "anyOf" if "anyOf" in node else "oneOf" if "oneOf" in node else None
    if union is not None:  # oneOf: a discriminated union (a model given by name or as an object)
        options = [o for o in node[union] if o.get("type") != "null"]
        nullable = len(options) < len(node[union])
        rest = {k: v for k, v in node.items() if k != union}
        if len(options) == 1:
            merged_out: Schema = _structural({**options[0], **rest}, defs, models)
        else:  # a genuinely mixed-type value (e.g. a measured scalar): free-form
            kept = _structural(rest, defs, models).items()
            merged_out = {k: v for k, v in kept if k in {"description", "default"}}
            merged_out["x-kubernetes-preserve-unknown-fields"] = True
        if nullable:
            merged_out["nullable"] = True
        return merged_out
    out: Schema = {}
    for key, value in node.items():
        if key == "title":
            continue
        if key == "additionalProperties" and value is False:
            # A model that forbids unknown fields: keep them for the webhook to refuse by name
            # (a structural schema would prune them silently before admission).
            out["x-kubernetes-preserve-unknown-fields"] = True
            continue
        if key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
            continue
        if key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
            continue
        if key == "const":  # a one-value Literal; Kubernetes schemas know no `const`, only `enum`
            out["enum"] = [value]
            continue
        if key == "patternProperties":
            # A mapping with constrained keys. Kubernetes schemas have no patternProperties: the
            # values keep their schema, the key pattern is checked by the models (optrun validate).
            if len(value) != 1:
                raise ValueError(f"cannot express several key patterns in a CRD schema: {sorted(value)}")
            out["additionalProperties"] = _structural(next(iter(value.values())), defs, models)
            continue
        if key == "properties":
            out[key] = {name: _structural(sub, defs, models) for name, sub in value.items()}
            continue
        out[key] = _structural(value, defs, models)
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    return out


def _add_factory_defaults(schema: Schema, model: type[BaseModel], models: dict[str, type[BaseModel]]) -> None:
    """Walk the inlined schema alongside the model classes, adding defaults pydantic leaves out."""
    props = schema.get("properties", {})
    for name, field in model.model_fields.items():
        alias = field.alias or name
        sub = props.get(alias)
        if sub is None:
            continue
        default = _factory_default(field)
        if default is not None and "default" not in sub:
            sub["default"] = default
        inner = _model_of(field.annotation)
        if inner is not None:
            target = sub.get("items") if sub.get("type") == "array" else sub
            if sub.get("type") == "object" and "additionalProperties" in sub and "properties" not in sub:
                target = sub["additionalProperties"]
            if isinstance(target, dict):
                _add_factory_defaults(target, inner, models)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _strip_defaults(node: Any, *, keep: bool) -> None:
    """Drop `default: null` (absent means null) and, where `keep` is false, every default."""
    if isinstance(node, list):
        for n in node:
            _strip_defaults(n, keep=keep)
    elif isinstance(node, dict):
        if "default" in node and (not keep or node["default"] is None):
            del node["default"]
        for key, value in node.items():
            if key != "default":
                _strip_defaults(value, keep=keep)


def openapi_schema(model: type[BaseModel], *, defaults: bool = True) -> Schema:
    """The structural OpenAPI v3 schema of one model.

    Status schemas carry no defaults: the API server would otherwise invent status fields
    that the operator never wrote."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    models = _models(model)
    schema: Schema = _structural(raw, defs, models)
    if defaults:
        _add_factory_defaults(schema, model, models)
    _strip_defaults(schema, keep=defaults)
    return schema


# Only what a started run records: a run whose status says no attempt began may change freely
# (created suspended, say); `status` cannot be set through the main resource, so it is the
# operator's word.
_STARTED = "has(oldSelf.status) && has(oldSelf.status.attempts) && oldSelf.status.attempts > 0"


def _bounded(node: Schema) -> bool:
    """Whether the schema bounds the size of a value, so that comparing two of them has a cost the
    API server can bound when it admits the CRD (strings by maxLength or enum, lists by maxItems,
    maps by maxProperties)."""
    kind = node.get("type")
    if kind == "string":
        return "maxLength" in node or "enum" in node
    if kind == "array":
        return "maxItems" in node and _bounded(node["items"])
    if kind == "object":
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            return "maxProperties" in node and _bounded(extra)
        return all(_bounded(sub) for sub in node.get("properties", {}).values())
    return kind in ("integer", "number", "boolean")


def immutable_fields(spec: Schema, prefix: str = "") -> tuple[list[str], list[str]]:
    """(fields a CEL rule guards, fields only the webhook guards): the largest subtrees of the spec
    that contain no mutable field, split further where their size is unbounded."""
    guarded: list[str] = []
    webhook_only: list[str] = []
    for name, sub in spec.get("properties", {}).items():
        path = f"{prefix}{name}"
        if mutability.is_mutable(path):
            continue
        holds_mutable = any(m.startswith(path + ".") for m in mutability.MUTABLE)
        if not holds_mutable and _bounded(sub):
            guarded.append(path)
        elif sub.get("properties"):
            inner = immutable_fields(sub, path + ".")
            guarded += inner[0]
            webhook_only += inner[1]
        else:
            webhook_only.append(path)
    return guarded, webhook_only


def immutability_rules(spec: Schema) -> list[Schema]:
    """One transition rule per guarded field: unchanged once the run has started."""
    rules = []
    for path in immutable_fields(spec)[0]:
        new, old = f"self.spec.{path}", f"oldSelf.spec.{path}"
        rules.append(
            {
                "rule": f"!({_STARTED}) || (has({new}) ? has({old}) && {new} == {old} : !has({old}))",
                "message": f"spec.{path} may not change once the run has started; {mutability.describe()}",
                "fieldPath": f".spec.{path}",
                "reason": "FieldValueForbidden",
            }
        )
    return rules


def crd() -> Schema:
    """The whole CustomResourceDefinition object."""
    spec = openapi_schema(api.OptimizationRunSpec)
    status = openapi_schema(api.OptimizationRunStatus, defaults=False)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{api.PLURAL}.{api.GROUP}",
            "labels": {"app.kubernetes.io/name": "optrun", "app.kubernetes.io/part-of": "optrun"},
        },
        "spec": {
            "group": api.GROUP,
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": list(api.SHORT_NAMES),
                "categories": ["optrun"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {"name": "Decision", "type": "string", "jsonPath": ".status.decision"},
                        {
                            "name": "Pass Rate",
                            "type": "number",
                            "format": "float",
                            "jsonPath": ".status.passRate",
                        },
                        {
                            "name": "Attempts",
                            "type": "integer",
                            "jsonPath": ".status.attempts",
                            "priority": 1,
                        },
                        {"name": "Pod", "type": "string", "jsonPath": ".status.podName", "priority": 1},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "An optimization run: a GPU job that trains, optimizes and is judged GO/CONDITIONAL_GO/NO_GO.",
                            "required": ["spec"],
                            "x-kubernetes-validations": immutability_rules(spec),
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec,
                                "status": status,
                            },
                        }
                    },
                }
            ],
        },
    }


HEADER = "# Generated by `optrun crd` from optrun/api/v1alpha1.py. Do not edit: change the models.\n"


def render() -> str:
    return HEADER + yaml.safe_dump(crd(), sort_keys=False, width=120)
