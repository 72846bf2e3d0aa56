"""Manifests: every example validates, and bad input gets one clear line per problem that names
the field path (camelCase, as written in the YAML), the bad value and what is allowed."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from optrun.api.errors import ManifestError
from optrun.api.v1alpha1 import OptimizationRunSpec, parse_manifest

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def test_the_examples_include_quickstart_fault_injection_and_a_gpu_run() -> None:
    assert {"quickstart.yaml", "fault-injection.yaml", "gpu-small.yaml"} <= {p.name for p in EXAMPLES}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_manifest_validates(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1
    spec = parse_manifest(docs[0])
    assert isinstance(spec, OptimizationRunSpec)
    assert docs[0]["metadata"]["name"] == path.stem


def test_gpu_example_asks_for_a_gpu_and_every_optimization() -> None:
    spec = parse_manifest(yaml.safe_load((ROOT / "examples" / "gpu-small.yaml").read_text()))
    assert (spec.resources.gpus, spec.resources.gpu_product) == (1, "NVIDIA-H100-80GB-HBM3")
    assert (spec.workload.model, spec.workload.precision) == ("small-lm", "bf16")
    o = spec.optimizations
    assert o.kernels.enabled and o.kernels.mode == "auto"
    assert o.compression.enabled and (o.compression.codec, o.compression.target) == ("int8", "weights")
    assert o.kv_cache.enabled and spec.rlvr.enabled


def test_fault_injection_example_injects_a_nan_loss_with_rollback() -> None:
    spec = parse_manifest(yaml.safe_load((ROOT / "examples" / "fault-injection.yaml").read_text()))
    assert spec.workload.model == "tiny-lm"
    assert [(f.type, f.persistent) for f in spec.faults] == [("nan-loss", False)]
    assert spec.safety.non_finite_loss == "rollback"
    total = spec.training.epochs * (spec.training.steps_per_epoch or 0)
    assert 0 < spec.faults[0].at_step < total, "the fault must fire inside the run"


# -- bad input ---------------------------------------------------------------------------------------


def manifest(**spec: Any) -> dict[str, Any]:
    doc = {
        "apiVersion": "optrun.io/v1alpha1",
        "kind": "OptimizationRun",
        "metadata": {"name": "bad"},
        "spec": {"workload": {"model": "tiny-lm"}},
    }
    for key, value in spec.items():
        doc["spec"][key] = value
    return doc


def problems(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(ManifestError) as err:
        parse_manifest(doc)
    assert str(err.value) == "\n".join(err.value.problems)
    return err.value.problems


@pytest.mark.parametrize(
    ("spec", "line"),
    [
        pytest.param(
            {"training": {"epochs": "many"}},
            "spec.training.epochs: 'many' has the wrong type; allowed: integer",
            id="wrong-type",
        ),
        pytest.param(
            {"workload": {"model": "tiny-lm", "batchSize": 0}},
            "spec.workload.batchSize: 0 is out of range; allowed: >= 1 and <= 4096",
            id="out-of-range",
        ),
        pytest.param(
            {"training": {"learningRate": 0.0}},
            "spec.training.learningRate: 0.0 is out of range; allowed: > 0.0 and <= 1.0",
            id="exclusive-bound",
        ),
        pytest.param(
            {"optimizations": {"kvCache": {"contextLengths": [64, 1_000_000]}}},
            "spec.optimizations.kvCache.contextLengths.1: 1000000 is out of range; allowed: <= 131072",
            id="out-of-range-list-item",
        ),
        pytest.param(
            {"trainig": {"epochs": 3}},
            "spec.trainig: unknown field; allowed: workload, optimizations, training, rlvr, safety, "
            "acceptance, faults, resources, scheduling, distributed, volumes, image, backoffLimit, activeDeadlineSeconds, "
            "ttlSecondsAfterFinished, suspend",
            id="unknown-field",
        ),
        pytest.param(
            {"training": {"checkpoint": {"everySteps": 10, "kep": 2}}},
            "spec.training.checkpoint.kep: unknown field; allowed: everySteps, keep, claimName",
            id="unknown-nested-field",
        ),
        pytest.param(
            {"workload": {"sequenceLength": 64}},
            "spec.workload.model: field required (Built-in reference model",
            id="missing-required",
        ),
        pytest.param(
            {"faults": [{"type": "nan-loss"}]},
            "spec.faults.0.atStep: field required (Global optimizer step at which it fires.)",
            id="missing-required-in-list",
        ),
        pytest.param(
            {"workload": {"model": "tiny-lm", "precision": "fp64"}},
            "spec.workload.precision: 'fp64' is not allowed; allowed: fp32, bf16, fp16",
            id="unknown-enum",
        ),
        pytest.param(
            {"safety": {"nonFiniteLoss": "ignore"}},
            "spec.safety.nonFiniteLoss: 'ignore' is not allowed; allowed: rollback, skip, fail",
            id="unknown-enum-nested",
        ),
        pytest.param(
            {"workload": {"model": "gpt-9"}},
            "spec.workload.model: 'gpt-9' is not valid: unknown built-in model; allowed: tiny-lm, small-lm, "
            "base-lm, 'package.module:factory' or {path: DIR}",
            id="unknown-model",
        ),
        pytest.param(
            {"acceptance": {"speedups": {"kernel": {"min": 1.0}}}},
            "unknown speedup key(s) kernel; allowed: kernels, compression, kernels+compression, kvcache, all",
            id="unknown-speedup-key",
        ),
        pytest.param(
            {"resources": {"memory": "lots"}},
            "spec.resources.memory: 'lots' has the wrong form; allowed: strings matching ^[0-9]+",
            id="bad-quantity",
        ),
        pytest.param(
            {"training": 5},
            "spec.training: 5 has the wrong type; allowed: mapping",
            id="scalar-for-section",
        ),
        pytest.param(
            {"acceptance": {"targetPassRate": 0.8, "minimumPassRate": 0.9}},
            "minimumPassRate must not exceed targetPassRate",
            id="cross-field",
        ),
        pytest.param(
            {
                "distributed": {"strategy": "fsdp"},
                "optimizations": {"compression": {"enabled": True, "target": "both"}},
            },
            "optimizations.compression.target both compresses DDP's gradient all-reduce; distributed.strategy "
            "fsdp has none. Allowed: strategy ddp, or compression.target weights",
            id="fsdp-with-gradient-compression",
        ),
        pytest.param(
            {"distributed": {"processesPerNode": 3}, "workload": {"model": "tiny-lm", "batchSize": 8}},
            "workload.batchSize 8 does not split evenly over 3 ranks (distributed.nodes x processesPerNode); "
            "allowed: a multiple of 3",
            id="batch-that-does-not-split",
        ),
    ],
)
def test_bad_input_names_the_field_the_value_and_what_is_allowed(spec: dict[str, Any], line: str) -> None:
    found = problems(manifest(**spec))
    assert any(p.startswith(line) or line in p for p in found), f"no line like {line!r} in {found}"
    assert len(found) == 1, found


def test_every_problem_of_a_manifest_is_reported_at_once() -> None:
    doc = manifest(
        workload={"model": "tiny-lm", "batchSize": "sixteen", "precision": "fp64"},
        trainig={"epochs": 3},
        training={"learningRate": 2.0},
        faults=[{"type": "nan-loss"}],
    )
    doc["kind"] = "Job"
    doc["metadata"] = {"name": "Not_A_Name"}
    found = problems(doc)
    expected_paths = [
        "kind:",
        "metadata.name:",
        "spec.workload.batchSize:",
        "spec.workload.precision:",
        "spec.training.learningRate:",
        "spec.faults.0.atStep:",
        "spec.trainig:",
    ]
    for path in expected_paths:
        assert sum(p.startswith(path) for p in found) == 1, f"{path} not reported once in {found}"
    assert len(found) == len(expected_paths)


@pytest.mark.parametrize(
    ("change", "line"),
    [
        (
            {"apiVersion": "optrun.io/v1"},
            "apiVersion: 'optrun.io/v1' is not allowed; allowed: optrun.io/v1alpha1",
        ),
        ({"kind": "Pod"}, "kind: 'Pod' is not allowed; allowed: OptimizationRun"),
        ({"metadata": {}}, "metadata.name: None is not a valid name; allowed: lowercase DNS label"),
        ({"metadata": {"name": "a" * 64}}, "metadata.name: "),
        ({"extra": 1}, "extra: unknown field; allowed: apiVersion, kind, metadata, spec"),
    ],
)
def test_bad_envelope_is_reported_by_field(change: dict[str, Any], line: str) -> None:
    doc = manifest()
    doc.update(change)
    found = problems(doc)
    assert len(found) == 1 and found[0].startswith(line), found


@pytest.mark.parametrize(("strategy", "target"), [("fsdp", "weights"), ("ddp", "gradients"), ("ddp", "both")])
def test_gradient_compression_is_refused_only_where_no_ddp_hook_runs(strategy: str, target: str) -> None:
    doc = manifest(
        distributed={"strategy": strategy}, optimizations={"compression": {"enabled": True, "target": target}}
    )
    spec = parse_manifest(doc)
    assert (spec.distributed.strategy, spec.optimizations.compression.target) == (strategy, target)


def test_missing_spec_is_an_error() -> None:
    doc = manifest()
    del doc["spec"]
    assert problems(doc) == ["spec: field required"]


def test_a_document_that_is_not_a_mapping_is_an_error() -> None:
    with pytest.raises(ManifestError, match="expected a mapping, got list"):
        parse_manifest([1, 2])  # type: ignore[arg-type]


def test_long_values_are_shortened_in_the_message() -> None:
    found = problems(manifest(workload={"model": "tiny-lm", "precision": "x" * 500}))
    assert len(found[0]) < 200


def test_valid_spec_gets_the_documented_defaults() -> None:
    spec = parse_manifest(manifest())
    assert spec.training.checkpoint.every_steps == 50
    assert spec.safety.non_finite_loss == "rollback"
    assert spec.acceptance.target_pass_rate == 0.95
    assert spec.optimizations.kernels.enabled is True
    assert spec.optimizations.compression.enabled is False


def test_validated_spec_round_trips_through_the_wire_format() -> None:
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    spec = parse_manifest(copy.deepcopy(doc))
    wire = spec.model_dump(mode="json", by_alias=True)
    assert OptimizationRunSpec.model_validate(wire) == spec
    assert "sequenceLength" in wire["workload"]
