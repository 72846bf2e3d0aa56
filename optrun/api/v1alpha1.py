"""OptimizationRun v1alpha1: spec and status models, the single source of truth.

The CRD schema is generated from these models (`optrun crd`, see `crd.py`), the local run and
the operator validate with them, and every field carries a description that states its unit.
Python names are snake_case; the wire format (YAML, JSON, the Kubernetes object) is camelCase.
Unknown fields are errors: a typo must not silently vanish.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict

from optrun.api.result import AcceptanceSummary, Decision, Scalar

GROUP = "optrun.io"
VERSION = "v1alpha1"
KIND = "OptimizationRun"
PLURAL = "optimizationruns"
SINGULAR = "optimizationrun"
SHORT_NAMES = ["optrun", "optruns"]
API_VERSION = f"{GROUP}/{VERSION}"

# Kubernetes quantities (cpu "8", "500m"; memory "64Gi").
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$"
# A model is a built-in preset or "package.module:factory" importable inside the runtime image.
MODEL_PATTERN = r"^([a-z0-9][a-z0-9-]*|[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*)$"
BUILTIN_MODELS = ("tiny-lm", "small-lm", "base-lm")
SPEEDUP_KEYS = ("kernels", "compression", "kernels+compression", "kvcache", "all")


class Spec(BaseModel):
    """Base for every spec model: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", validate_default=True
    )


# --- workload -------------------------------------------------------------------------------


class Workload(Spec):
    """What is optimized: a model, the data it trains on, and the shape of a batch."""

    model: Annotated[str, Field(pattern=MODEL_PATTERN, max_length=253)] = Field(
        description=(
            "Built-in reference model (tiny-lm: CPU-sized; small-lm, base-lm: GPU-sized) or "
            "'package.module:factory' importable in the runtime image."
        ),
    )
    dataset: Literal["pydoc"] = Field(
        "pydoc", description="Built-in corpus: pydoc is the documentation text shipped with CPython."
    )
    sequence_length: int = Field(64, ge=8, le=32768, description="Tokens per training sequence.")
    batch_size: int = Field(16, ge=1, le=4096, description="Sequences per optimizer step.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="Compute dtype of training and inference (bf16/fp16 need a GPU that supports them).",
    )

    @field_validator("model")
    @classmethod
    def _known_builtin(cls, v: str) -> str:
        if ":" not in v and v not in BUILTIN_MODELS:
            raise ValueError(
                f"unknown built-in model; allowed: {', '.join(BUILTIN_MODELS)} or 'package.module:factory'"
            )
        return v


# --- optimizations --------------------------------------------------------------------------


class Kernels(Spec):
    """Fused Triton kernels for RMSNorm, SwiGLU, rotary embedding and cross-entropy."""

    enabled: bool = Field(True, description="Apply the kernel optimizer.")
    mode: Literal["auto", "triton", "compile", "eager"] = Field(
        "auto",
        description=(
            "auto: measure every candidate per operation on the device and keep the fastest correct one; "
            "triton, compile, eager: force one."
        ),
    )


class Compression(Spec):
    """Tensor compression under a reconstruction-error gate."""

    enabled: bool = Field(False, description="Apply compression.")
    codec: Literal["int8", "int8-block", "fp8", "int4", "topk", "lowrank"] = Field(
        "int8",
        description="Codec: int8 absmax per channel, int8 per block, fp8 e4m3, int4 group-wise, top-k, low-rank.",
    )
    target: Literal["weights", "gradients", "both"] = Field(
        "weights",
        description="weights: weight-only quantized inference; gradients: compressed data-parallel allreduce.",
    )
    max_reconstruction_error: float = Field(
        0.02,
        gt=0.0,
        le=1.0,
        description="Largest relative error (||x - x'|| / ||x||) a tensor may have; above it the tensor stays full precision.",
    )
    group_size: int = Field(
        128, ge=8, le=4096, description="Elements per scale group for int4 and int8-block."
    )
    rank: int = Field(4, ge=1, le=1024, description="Rank of the low-rank codec.")
    topk_ratio: float = Field(0.01, gt=0.0, le=1.0, description="Fraction of elements the top-k codec keeps.")
    gradient_steps: int = Field(
        20,
        ge=3,
        le=10_000,
        description=(
            "Optimizer steps of the 2-process data-parallel comparison (target gradients or both), run once with "
            "plain allreduce and once compressed."
        ),
    )
    loss_tolerance: float = Field(
        0.05,
        gt=0.0,
        le=1.0,
        description="Largest relative difference of held-out loss, compressed against uncompressed data-parallel run.",
    )
    perplexity_tolerance: float = Field(
        0.05,
        gt=0.0,
        le=10.0,
        description="Largest relative rise of held-out perplexity of the weight-quantized model over the float model.",
    )


class KVCache(Spec):
    """Inference KV cache: dtype and the scaling sweep."""

    enabled: bool = Field(False, description="Run the KV-cache scaling sweep.")
    dtype: Literal["fp32", "fp16", "bf16", "int8", "fp8"] = Field("int8", description="Cache storage dtype.")
    batch_sizes: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        default_factory=lambda: [1, 4, 16],
        min_length=1,
        max_length=16,
        description="Batch sizes of the sweep.",
    )
    context_lengths: list[Annotated[int, Field(ge=8, le=131072)]] = Field(
        default_factory=lambda: [64, 256],
        min_length=1,
        max_length=16,
        description="Context lengths (tokens) of the sweep.",
    )
    memory_budget_bytes: int | None = Field(
        None,
        ge=1,
        description="Cache memory budget for the largest-batch search, in bytes; default: a quarter of device memory.",
    )


class Optimizations(Spec):
    kernels: Kernels = Field(default_factory=Kernels, description="Fused kernels.")
    compression: Compression = Field(default_factory=Compression, description="Tensor compression.")
    kv_cache: KVCache = Field(default_factory=KVCache, description="KV-cache scaling.")


# --- training -------------------------------------------------------------------------------


class Checkpoint(Spec):
    every_steps: int = Field(50, ge=1, le=1_000_000, description="Optimizer steps between checkpoints.")
    keep: int = Field(3, ge=1, le=100, description="How many of the newest checkpoints are kept.")
    claim_name: str | None = Field(
        None,
        max_length=253,
        description="PersistentVolumeClaim for checkpoints in the cluster; default: an emptyDir.",
    )


class Training(Spec):
    epochs: int = Field(5, ge=1, le=1000, description="Passes over the training split.")
    steps_per_epoch: int | None = Field(
        None,
        ge=1,
        le=10_000_000,
        description="Optimizer steps per epoch; default: as many as the split holds tokens for.",
    )
    learning_rate: float = Field(3.0e-4, gt=0.0, le=1.0, description="Peak learning rate (AdamW).")
    warmup_steps: int = Field(20, ge=0, le=1_000_000, description="Linear warm-up steps before cosine decay.")
    weight_decay: float = Field(0.1, ge=0.0, le=1.0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0.0, le=1000.0, description="Global gradient-norm clip.")
    seed: int = Field(1234, ge=0, le=2**31 - 1, description="Seed of weights, data order and sampling.")
    target_accuracy: float = Field(
        0.35, ge=0.0, le=1.0, description="Held-out next-token accuracy the run must reach."
    )
    eval_batches: int = Field(8, ge=1, le=1000, description="Held-out batches per evaluation.")
    checkpoint: Checkpoint = Field(default_factory=Checkpoint, description="Checkpointing.")


class RLVR(Spec):
    """Reinforcement learning from verifiable rewards (GRPO)."""

    enabled: bool = Field(False, description="Run the RLVR stage after training.")
    task: Literal["addition", "multiplication"] = Field("addition", description="Verifiable task family.")
    steps: int = Field(120, ge=1, le=100_000, description="GRPO policy updates.")
    group_size: int = Field(8, ge=2, le=256, description="Completions sampled per prompt.")
    prompts_per_step: int = Field(16, ge=1, le=1024, description="Prompts per GRPO update.")
    kl_coefficient: float = Field(
        0.04, ge=0.0, le=10.0, description="Weight of the KL penalty to the frozen reference (0 allowed)."
    )
    learning_rate: float = Field(1.0e-4, gt=0.0, le=1.0, description="Policy learning rate.")
    warmup_steps: int = Field(
        1000,
        ge=0,
        le=100_000,
        description=(
            "Most supervised warm-up steps on the task family before RL (reported); fewer when "
            "warmupTargetAccuracy is reached first."
        ),
    )
    max_digits: int = Field(2, ge=1, le=9, description="Largest operand size, in digits.")
    warmup_learning_rate: float = Field(
        1.0e-3, gt=0.0, le=1.0, description="Learning rate of the supervised warm-up (AdamW)."
    )
    warmup_batch_size: int = Field(64, ge=1, le=4096, description="Problems per supervised warm-up step.")
    warmup_target_accuracy: float | None = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description=(
            "Stop the warm-up once greedy exact match on training problems (checked every 25 steps) reaches "
            "this share, leaving RL a policy that is right often enough to learn from; null: run every warmupStep."
        ),
    )
    rewards: dict[
        Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]*$")], Annotated[float, Field(ge=0.0, le=100.0)]
    ] = Field(
        default_factory=lambda: {"exact-match": 1.0, "format": 0.1},
        min_length=1,
        description=(
            "Reward functions by registered name (built in: exact-match, format) and their weights; "
            "the reward of a completion is the weighted sum."
        ),
    )
    clip_epsilon: float = Field(0.2, gt=0.0, le=1.0, description="PPO clip range of the probability ratio.")
    updates_per_batch: int = Field(
        2, ge=1, le=16, description="Policy updates per sampled batch (with 1 the clip is inert)."
    )
    temperature: float = Field(
        1.0, gt=0.0, le=10.0, description="Sampling temperature of the group completions."
    )
    eval_problems: int = Field(
        1000,
        ge=10,
        le=100_000,
        description="Held-out problems the accuracy before and after RL is measured on.",
    )
    max_kl: float = Field(
        1.0,
        gt=0.0,
        le=100.0,
        description="Largest mean per-token KL to the reference (nats) the acceptance test allows.",
    )


# --- safety ---------------------------------------------------------------------------------


class GradientFlow(Spec):
    min_norm: float = Field(
        1.0e-8, ge=0.0, description="Below this per-group gradient norm the flow has vanished."
    )
    max_norm: float = Field(
        1.0e4, gt=0.0, description="Above this per-group gradient norm the flow has exploded."
    )

    @model_validator(mode="after")
    def _ordered(self) -> GradientFlow:
        if self.min_norm >= self.max_norm:
            raise ValueError("minNorm must be smaller than maxNorm")
        return self


class Safety(Spec):
    non_finite_loss: Literal["rollback", "skip", "fail"] = Field(
        "rollback",
        description="On a NaN/Inf loss: roll back to the last good checkpoint, skip the batch, or fail.",
    )
    gradient_flow: GradientFlow = Field(
        default_factory=GradientFlow, description="Gradient-norm bounds per layer group."
    )
    max_recoveries: int = Field(
        3, ge=0, le=100, description="Recoveries allowed before the safety gate fails."
    )
    hang_timeout_seconds: int = Field(
        300, ge=5, le=86400, description="Seconds without progress before a hang is reported."
    )


# --- acceptance -----------------------------------------------------------------------------


class Range(Spec):
    min: float | None = Field(None, ge=0.0, description="Lowest acceptable value.")
    max: float | None = Field(None, ge=0.0, description="Highest acceptable value.")

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min must not exceed max")
        return self


class Reproducibility(Spec):
    rtol: float = Field(
        1.3e-6, ge=0.0, le=1.0, description="Relative tolerance between two same-seed runs (fp32)."
    )
    atol: float = Field(
        1.0e-5, ge=0.0, le=1.0, description="Absolute tolerance between two same-seed runs (fp32)."
    )


class Weights(Spec):
    critical_infrastructure: float = Field(
        0.40, ge=0.0, le=1.0, description="Weight of critical infrastructure tests."
    )
    safety_gates: float = Field(0.20, ge=0.0, le=1.0, description="Weight of safety gate tests.")
    pass_rate: float = Field(0.15, ge=0.0, le=1.0, description="Weight of the overall pass rate.")
    non_critical_failures: float = Field(
        0.15, ge=0.0, le=1.0, description="Weight of the non-critical tests."
    )
    gpu_stability: float = Field(0.10, ge=0.0, le=1.0, description="Weight of the stability tests.")

    @model_validator(mode="after")
    def _sum_to_one(self) -> Weights:
        total = sum(self.model_dump().values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"weights must sum to 1.0 (they sum to {total:g})")
        return self


class Acceptance(Spec):
    target_pass_rate: float = Field(0.95, ge=0.0, le=1.0, description="Pass rate for GO.")
    minimum_pass_rate: float = Field(0.85, ge=0.0, le=1.0, description="Pass rate for CONDITIONAL_GO.")
    speedups: dict[str, Range] = Field(
        default_factory=dict,
        description=(
            "Accepted speedup ranges (ratio to the baseline) per optimization: kernels, compression, "
            "kernels+compression, kvcache, all. Unset keys use the device class defaults."
        ),
    )
    convergence_smoothness: float = Field(
        0.05,
        gt=0.0,
        le=10.0,
        description="Largest allowed relative rise of held-out loss between consecutive evaluations (0.05 = 5%).",
    )
    reproducibility: Reproducibility = Field(
        default_factory=Reproducibility, description="Same-seed tolerances."
    )
    weights: Weights = Field(default_factory=Weights, description="Score weights (sum to 1).")
    repeats: int = Field(
        5, ge=1, le=100, description="Repeats of each timed measurement (the median is judged)."
    )

    @field_validator("speedups")
    @classmethod
    def _known_keys(cls, v: dict[str, Range]) -> dict[str, Range]:
        unknown = sorted(set(v) - set(SPEEDUP_KEYS))
        if unknown:
            raise ValueError(
                f"unknown speedup key(s) {', '.join(unknown)}; allowed: {', '.join(SPEEDUP_KEYS)}"
            )
        return v

    @model_validator(mode="after")
    def _ordered(self) -> Acceptance:
        if self.minimum_pass_rate > self.target_pass_rate:
            raise ValueError("minimumPassRate must not exceed targetPassRate")
        return self


# --- faults, resources, scheduling ----------------------------------------------------------


class Fault(Spec):
    """A deliberate fault, injected to prove that the gates catch it."""

    type: Literal["nan-loss", "exception", "oom", "stall", "exploding-gradient"] = Field(
        description="What to inject."
    )
    at_step: int = Field(ge=0, le=100_000_000, description="Global optimizer step at which it fires.")
    persistent: bool = Field(
        False,
        description="Fire at atStep and at every step after it (a fault no recovery fixes); default: once.",
    )
    duration_seconds: float = Field(
        0.0, ge=0.0, le=86400.0, description="For stall: how long the step hangs, in seconds."
    )


class Toleration(Spec):
    key: str | None = Field(None, description="Taint key.")
    operator: Literal["Exists", "Equal"] = Field("Exists", description="Exists or Equal.")
    value: str | None = Field(None, description="Taint value (with Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect."
    )


class Resources(Spec):
    gpus: int = Field(1, ge=0, le=16, description="nvidia.com/gpu count for the runtime pod.")
    gpu_product: str | None = Field(
        None,
        max_length=253,
        description="Value of the nvidia.com/gpu.product node label to schedule on, e.g. NVIDIA-H100-80GB-HBM3.",
    )
    cpu: Annotated[str, Field(pattern=QUANTITY_PATTERN)] = Field(
        "4", description="CPU request and limit (Kubernetes quantity)."
    )
    memory: Annotated[str, Field(pattern=QUANTITY_PATTERN)] = Field(
        "16Gi", description="Memory request and limit (Kubernetes quantity)."
    )


class Scheduling(Spec):
    priority_class_name: str | None = Field(
        None, max_length=253, description="PriorityClass of the runtime pod."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Extra tolerations."
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="Extra node selector labels.")


class OptimizationRunSpec(Spec):
    """An optimization run: what to optimize, how, and what counts as success."""

    workload: Workload = Field(description="What is optimized.")
    optimizations: Optimizations = Field(
        default_factory=Optimizations, description="Which optimizations to apply."
    )
    training: Training = Field(default_factory=Training, description="Training loop.")
    rlvr: RLVR = Field(default_factory=RLVR, description="RLVR stage.")
    safety: Safety = Field(default_factory=Safety, description="Safety gates.")
    acceptance: Acceptance = Field(default_factory=Acceptance, description="Acceptance policy.")
    faults: list[Fault] = Field(default_factory=list, max_length=32, description="Faults to inject.")
    resources: Resources = Field(default_factory=Resources, description="Runtime pod resources.")
    scheduling: Scheduling = Field(default_factory=Scheduling, description="Runtime pod placement.")
    image: str | None = Field(
        None, max_length=512, description="Runtime image; default: the operator's configured image."
    )
    backoff_limit: int = Field(
        3,
        ge=0,
        le=100,
        description="Failed attempts retried (resuming from the checkpoint) before the run fails.",
    )
    active_deadline_seconds: int | None = Field(
        None, ge=1, le=2_592_000, description="Wall-clock limit of the whole run, in seconds."
    )
    ttl_seconds_after_finished: int | None = Field(
        None,
        ge=0,
        le=31_536_000,
        description="Seconds after the run finishes before it is deleted; unset: kept.",
    )
    suspend: bool = Field(False, description="Stop the runtime pod and keep the checkpoint; false resumes.")


# --- status ---------------------------------------------------------------------------------


class Status(BaseModel):
    """Status models are written by the operator; tolerant of fields a newer operator adds."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


# The shape of metav1.Condition: the reason a machine can match on, RFC 3339 times.
CONDITION_REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
DATE_TIME: JsonDict = {"format": "date-time"}


class Condition(Status):
    type: str = Field(
        max_length=316,
        description=(
            "Ready (the summary), Scheduled, Running, MetricsAvailable, SafetyGatesPassed, AcceptancePassed, "
            "Complete or Failed."
        ),
    )
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(
        min_length=1,
        max_length=1024,
        pattern=CONDITION_REASON_PATTERN,
        description="CamelCase reason a person or a health check can search for.",
    )
    message: str = Field("", max_length=32768, description="Human-readable detail.")
    last_transition_time: str = Field(
        json_schema_extra=DATE_TIME, description="RFC 3339 time of the last status change."
    )
    observed_generation: int | None = Field(
        None, ge=0, description="metadata.generation the condition was computed from."
    )


class FailedTest(Status):
    name: str = Field(description="Acceptance test name.")
    category: str = Field("", description="Test category.")
    critical: bool = Field(False, description="Whether the test is critical.")
    measured: Scalar | list[Scalar] = Field(None, description="Measured value.")
    expected: str = Field("", description="Expected value or range.")
    reason: str = Field("", description="Why it failed.")


class AcceptanceStatus(AcceptanceSummary):
    failures: list[FailedTest] = Field(
        default_factory=list, description="Failed tests, measured against expected."
    )


class Progress(Status):
    stage: str = Field("", description="Runtime stage.")
    epoch: int | None = Field(None, description="Current epoch.")
    step: int | None = Field(None, description="Global optimizer step.")
    loss: float | None = Field(None, description="Latest training loss.")
    tokens_per_second: float | None = Field(None, description="Training throughput.")
    updated_at: str | None = Field(
        None, json_schema_extra=DATE_TIME, description="When progress last moved (RFC 3339)."
    )


class SafetyStatus(Status):
    trips: dict[str, int] = Field(default_factory=dict, description="Gate trips by gate.")
    recoveries: int = Field(0, description="Recoveries performed.")


Phase = Literal["Pending", "Running", "Recovering", "Succeeded", "Failed", "Suspended"]


class OptimizationRunStatus(Status):
    phase: Phase | None = Field(
        None, description="Pending, Running, Recovering, Succeeded, Failed or Suspended."
    )
    decision: Decision | None = Field(None, description="GO, CONDITIONAL_GO or NO_GO.")
    score: float | None = Field(None, description="Weighted score, 0..1.")
    risk_level: Literal["low", "medium", "high"] | None = Field(None, description="Risk from what failed.")
    pass_rate: float | None = Field(None, description="Acceptance pass rate, 0..1 (printer column).")
    acceptance: AcceptanceStatus | None = Field(None, description="Acceptance summary.")
    recommendations: list[str] = Field(default_factory=list, description="Suggested changes (never applied).")
    safety: SafetyStatus | None = Field(None, description="Safety gate trips and recoveries.")
    progress: Progress | None = Field(None, description="Live progress of the current attempt.")
    speedups: dict[str, float] = Field(default_factory=dict, description="Median speedup per optimization.")
    attempts: int = Field(0, description="Runtime pods started for this run.")
    failed_attempts: int = Field(
        0,
        description=(
            "Attempts that ended in failure, counted against spec.backoffLimit (a suspension or a disruption "
            "is not one)."
        ),
    )
    disrupted_attempts: int = Field(
        0,
        description=(
            "Attempts ended by a disruption (eviction, preemption, node drain or shutdown, a DisruptionTarget "
            "condition): restarted at once, not counted against spec.backoffLimit."
        ),
    )
    next_attempt_time: str | None = Field(
        None,
        json_schema_extra=DATE_TIME,
        description="When the next attempt starts, after the back-off that follows a failed one (RFC 3339).",
    )
    pod_name: str | None = Field(None, description="Current or last runtime pod.")
    start_time: str | None = Field(
        None, json_schema_extra=DATE_TIME, description="When the first attempt started (RFC 3339)."
    )
    completion_time: str | None = Field(
        None, json_schema_extra=DATE_TIME, description="When the run reached a terminal phase (RFC 3339)."
    )
    observed_generation: int | None = Field(
        None,
        description=(
            "The last metadata.generation the operator acted on; a spec edit it ignores (an immutable field of a "
            "started run that got past the admission webhook) does not advance it."
        ),
    )
    message: str = Field("", description="Latest human-readable summary.")
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
        description="Conditions in the Kubernetes API convention, one per type.",
    )


def parse_manifest(doc: dict[str, Any]) -> OptimizationRunSpec:
    """Validate a whole OptimizationRun object (apiVersion, kind, metadata, spec).

    Raises ManifestError with field-named messages."""
    from optrun.api.errors import ManifestError, manifest_errors

    problems: list[str] = []
    if not isinstance(doc, dict):
        raise ManifestError([f"(document): expected a mapping, got {type(doc).__name__}"])
    if doc.get("apiVersion") != API_VERSION:
        problems.append(f"apiVersion: {doc.get('apiVersion')!r} is not allowed; allowed: {API_VERSION}")
    if doc.get("kind") != KIND:
        problems.append(f"kind: {doc.get('kind')!r} is not allowed; allowed: {KIND}")
    name = (doc.get("metadata") or {}).get("name") if isinstance(doc.get("metadata"), dict) else None
    if not name or not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", str(name)) or len(str(name)) > 63:
        problems.append(
            f"metadata.name: {name!r} is not a valid name; allowed: lowercase DNS label, at most 63 characters"
        )
    unknown = sorted(set(doc) - {"apiVersion", "kind", "metadata", "spec", "status"})
    problems += [f"{k}: unknown field; allowed: apiVersion, kind, metadata, spec" for k in unknown]
    if "spec" not in doc:
        problems.append("spec: field required")
        raise ManifestError(problems)
    try:
        spec = OptimizationRunSpec.model_validate(doc["spec"])
    except ValidationError as exc:  # turned into field-named lines
        problems += manifest_errors(exc, prefix="spec", model=OptimizationRunSpec)
        raise ManifestError(problems) from None
    if problems:
        raise ManifestError(problems)
    return spec
