"""Field-named validation errors.

pydantic's errors are precise but terse; a user editing YAML wants, on one line each: the field
path as written in the manifest (camelCase), the value that was given, and what is allowed.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Sequence
from typing import Any

import annotated_types
import pydantic
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo


class ManifestError(ValueError):
    """A manifest failed validation; `problems` holds one field-named line per error."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def manifest_errors(exc: ValidationError, prefix: str, model: type[BaseModel]) -> list[str]:
    """One line per pydantic error: '<path>: <what is wrong>; allowed: <what is allowed>'."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = _without_tags(model, [str(p) for p in err["loc"]])
        path = ".".join([prefix, *loc]) if loc else prefix
        lines.append(f"{path}: {_describe(err, model, loc)}")
    return lines


def _describe(err: Any, model: type[BaseModel], loc: list[str]) -> str:
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    field = _field_at(model, loc)
    shown = _show(value)
    if kind == "missing":
        return "field required" + _allowed_suffix(field)
    if kind == "extra_forbidden":
        parent = _model_at(model, loc[:-1])
        names = ", ".join(_aliases(parent)) if parent else "see the schema"
        return f"unknown field; allowed: {names}"
    if kind in ("literal_error", "enum"):
        return f"{shown} is not allowed; allowed: {_literal_values(ctx.get('expected', ''))}"
    if kind in {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}:
        # A list item's bound sits on the item type, not on the field: then the error's own bound says it.
        return f"{shown} is out of range; allowed: {_bounds(field) or _violated_bound(kind, ctx)}"
    if kind in {"too_short", "too_long"}:
        return f"{err['msg'].lower()}; given {shown}"
    if kind == "string_pattern_mismatch":
        return f"{shown} has the wrong form; allowed: strings matching {ctx.get('pattern')}"
    if kind == "source_type":  # a tagged union's own message says what each form looks like
        return f"{shown} has the wrong type; {err['msg']}"
    if kind.endswith(("_type", "_parsing")) or kind in {"model_attributes_type"}:
        return f"{shown} has the wrong type; allowed: {_type_name(kind, field)}"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{shown} is not valid: {msg}"


def _union_tags(annotation: Any) -> set[str]:
    """The tags of a discriminated union (`Annotated[A, Tag("a")] | ...`): pydantic puts the
    chosen tag into an error's location, where a manifest path has no such part."""
    tags: set[str] = set()
    for arg in typing.get_args(annotation):
        if isinstance(arg, pydantic.Tag):
            tags.add(arg.tag)
        elif not isinstance(arg, str):
            tags |= _union_tags(arg)
    return tags


def _without_tags(model: type[BaseModel], loc: list[str]) -> list[str]:
    out: list[str] = []
    for part in loc:
        parent = _model_at(model, out[:-1]) if out else None
        field = _field_by_alias(parent, out[-1]) if parent is not None else None
        if field is not None and part in _union_tags(field.annotation):
            continue
        out.append(part)
    return out


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _aliases(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _literal_values(expected: str) -> str:
    return expected.replace("'", "").replace(" or ", ", ")


def _bounds(field: FieldInfo | None) -> str:
    if field is None:
        return ""
    parts = []
    for m in field.metadata:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if isinstance(m, getattr(annotated_types, attr.capitalize())):
                parts.append(f"{sym} {getattr(m, attr)}")
    return " and ".join(parts)


_BOUND_SYMBOLS = {
    "greater_than": ("gt", ">"),
    "greater_than_equal": ("ge", ">="),
    "less_than": ("lt", "<"),
    "less_than_equal": ("le", "<="),
}


def _violated_bound(kind: str, ctx: dict[str, Any]) -> str:
    key, sym = _BOUND_SYMBOLS[kind]
    return f"{sym} {ctx.get(key)}"


def _type_name(kind: str, field: FieldInfo | None) -> str:
    prefix = kind.split("_")[0]
    names = {
        "int": "integer",
        "float": "number",
        "bool": "true or false",
        "string": "string",
        "dict": "mapping",
        "list": "list",
        "model": "mapping",
    }
    return names.get(prefix, prefix)


def _allowed_suffix(field: FieldInfo | None) -> str:
    return f" ({field.description})" if field is not None and field.description else ""


def _unwrap_model(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel inside an annotation such as `Model`, `Model | None`, `list[Model]`, `dict[str, Model]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, dict, typing.Annotated):
        for arg in typing.get_args(annotation):
            found = _unwrap_model(arg)
            if found is not None:
                return found
    return None


def _model_at(model: type[BaseModel] | None, loc: list[str]) -> type[BaseModel] | None:
    """The model class that the manifest path `loc` points into (list indexes and dict keys skipped)."""
    current = model
    for part in loc:
        if current is None:
            return None
        field = _field_by_alias(current, part)
        if field is None:  # a list index or a dict key: stay in the same item model
            continue
        current = _unwrap_model(field.annotation)
    return current


def _field_at(model: type[BaseModel], loc: list[str]) -> FieldInfo | None:
    for i in range(len(loc) - 1, -1, -1):
        parent = _model_at(model, loc[:i])
        if parent is not None:
            field = _field_by_alias(parent, loc[i])
            if field is not None:
                return field
    return None


def _field_by_alias(model: type[BaseModel], key: str) -> FieldInfo | None:
    for name, f in model.model_fields.items():
        if key in (name, f.alias):
            return f
    return None
