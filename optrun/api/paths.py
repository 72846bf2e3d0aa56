"""Metric paths: dotted paths into report.json that a user's acceptance test reads.

A path names one number of the result contract (`optrun.api.result.Result`, dumped by alias),
key by key: ``training.finalAccuracy``, ``speedups.all.median``, ``safety.trips.nan_loss``,
``details.kvcache.capacity.int8.bytes_per_token``. A list is entered by its index
(``details.kvcache.rows.0.tokens_per_second``).

Two checks, because part of report.json has a schema and part has none:

- `check_path` (when the manifest is validated): a path into a schema'd section must reach a
  number of that schema; speedup keys must be among `SPEEDUP_KEYS`. A path into ``details``
  (free-form: whatever the stages measured) or into a mapping with open keys
  (``safety.trips``) is accepted here, since only the run knows its keys.
- `resolve` (when the run is judged): the path must reach a finite number in the real
  report; otherwise the error lists the numbers available where the walk stopped.

The verdict itself (decision, score, riskLevel, acceptance, scorecard, tests, recommendations,
suggestions, figures, baseline, ...) is no metric: a test of the score would be judged by the
score it changes. Pure Python: no torch, no kubernetes.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Final

from pydantic import BaseModel

from optrun.api.result import Result
from optrun.api.v1alpha1 import SPEEDUP_KEYS

# The sections of report.json a metric may read. The rest of the result is the verdict.
MEASURED_SECTIONS: Final = ("training", "speedups", "safety", "hardware", "details")
# Known keys of the mappings whose keys a schema cannot list.
_KNOWN_KEYS: Final[dict[str, tuple[str, ...]]] = {"speedups": SPEEDUP_KEYS}
# How many available paths an error lists before "and N more".
_LISTED: Final = 40


class MetricPathError(ValueError):
    """A metric path that names no number; the message lists the ones that exist."""


def _alias(name: str, model: type[BaseModel]) -> str:
    return model.model_fields[name].alias or name


def _numeric(annotation: Any) -> bool:
    if annotation in (int, float):
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return bool(args) and all(a in (int, float) for a in args)
    return False


def _walk_schema(annotation: Any, prefix: str, out: list[str]) -> None:
    """Every numeric leaf below `annotation`, written as a path pattern: `{a,b}` for known keys,
    `<key>` for open ones, `...` for free-form content."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        # A model's numeric fields are listed together: training.{epochs,steps,...}.
        numbers = [
            _alias(n, annotation) for n, f in annotation.model_fields.items() if _numeric(f.annotation)
        ]
        if len(numbers) > 1:
            out.append(f"{prefix}.{{{','.join(numbers)}}}")
        elif numbers:
            out.append(f"{prefix}.{numbers[0]}")
        for name, field in annotation.model_fields.items():
            if not _numeric(field.annotation):
                _walk_schema(field.annotation, f"{prefix}.{_alias(name, annotation)}", out)
        return
    origin = typing.get_origin(annotation)
    if origin is dict:
        _, value = typing.get_args(annotation)
        section = prefix.lstrip(".")
        known = _KNOWN_KEYS.get(section)
        key = "{" + ",".join(known) + "}" if known else "<key>"
        if value is Any:
            out.append(f"{prefix}.<any path>")
        else:
            _walk_schema(value, f"{prefix}.{key}", out)
        return
    if _numeric(annotation):
        out.append(prefix)


def available_paths() -> list[str]:
    """The metric paths report.json offers, as patterns (see the module docstring)."""
    out: list[str] = []
    for section in MEASURED_SECTIONS:
        name = _field_name(Result, section)
        assert name is not None
        _walk_schema(Result.model_fields[name].annotation, section, out)
    return out


def _field_name(model: type[BaseModel], key: str) -> str | None:
    for name, field in model.model_fields.items():
        if key in (name, field.alias):
            return name
    return None


def _unwrap(annotation: Any) -> Any:
    """`X | None` -> X."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def check_path(path: str) -> None:
    """Raise MetricPathError unless `path` can name a number of report.json (see the module docstring)."""
    parts = path.split(".")
    if not path or any(not p for p in parts):
        raise MetricPathError(f"not a dotted path; {_allowed()}")
    if parts[0] not in MEASURED_SECTIONS:
        verdict = " (part of the verdict, not a measurement)" if _field_name(Result, parts[0]) else ""
        raise MetricPathError(f"{parts[0]} is not a measured section{verdict}; {_allowed()}")
    annotation: Any = Result
    walked: list[str] = []
    for part in parts:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            name = _field_name(annotation, part)
            if name is None:
                raise MetricPathError(f"{'.'.join([*walked, part])} is not in report.json; {_allowed()}")
            annotation = annotation.model_fields[name].annotation
        elif typing.get_origin(annotation) is dict:
            _, value = typing.get_args(annotation)
            known = _KNOWN_KEYS.get(".".join(walked))
            if known is not None and part not in known:
                raise MetricPathError(
                    f"{part} is not a key of {'.'.join(walked)}; allowed: {', '.join(known)}"
                )
            if value is Any:
                return  # free-form below this point: checked against the real report
            annotation = value
        else:
            raise MetricPathError(f"{'.'.join(walked)} has no fields below it; {_allowed()}")
        walked.append(part)
    if not _numeric(_unwrap(annotation)):
        raise MetricPathError(f"names a section, not a number; {_allowed()}")


def _allowed() -> str:
    return "allowed: " + ", ".join(available_paths())


def resolve(doc: Mapping[str, Any], path: str) -> float:
    """The finite number at `path` in a report.json document, or MetricPathError naming what is there."""
    current: Any = doc
    walked: list[str] = []
    for part in path.split("."):
        if isinstance(current, Mapping) and part in current:
            current = current[part]
        elif isinstance(current, Sequence) and not isinstance(current, str) and part.isdigit():
            if int(part) >= len(current):
                raise MetricPathError(
                    f"{path}: {'.'.join(walked)} has {len(current)} entries, no index {part}"
                )
            current = current[int(part)]
        else:
            where = ".".join(walked)
            listed = numeric_leaves(current, where)
            here = f"under {where}" if where else "in report.json"
            if not listed:
                raise MetricPathError(f"{path}: not in this run's report.json, and no number {here}")
            raise MetricPathError(
                f"{path}: not in this run's report.json; numbers {here}: {_listing(listed)}"
            )
        walked.append(part)
    if isinstance(current, bool) or not isinstance(current, int | float):
        listed = numeric_leaves(current, path)
        more = f"; numbers under it: {_listing(listed)}" if listed else ""
        raise MetricPathError(f"{path}: is {_kind(current)}, not a number{more}")
    value = float(current)
    if not math.isfinite(value):
        raise MetricPathError(f"{path}: is {value}, not a finite number")
    return value


def numeric_leaves(node: Any, prefix: str = "") -> list[str]:
    """Paths of the numbers below `node` (bools excluded), depth first."""
    out: list[str] = []

    def visit(value: Any, at: str) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                visit(v, f"{at}.{k}" if at else str(k))
        elif isinstance(value, list | tuple):
            for i, v in enumerate(value):
                visit(v, f"{at}.{i}" if at else str(i))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out.append(at)

    visit(node, prefix)
    return out


def _listing(paths: list[str]) -> str:
    shown = ", ".join(paths[:_LISTED])
    return shown + (f" and {len(paths) - _LISTED} more" if len(paths) > _LISTED else "")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return f"{type(value).__name__} {value!r}"[:60]
