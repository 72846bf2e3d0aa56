"""OptimizationRun v1alpha1: spec and status models, the single source of truth.

The CRD schema is generated from these models (`optrun crd`, see `crd.py`), the local run and
the operator validate with them, and every field carries a description that states its unit.
Python names are snake_case; the wire format (YAML, JSON, the Kubernetes object) is camelCase.
Unknown fields are errors: a typo must not silently vanish.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict

from optrun.api.result import AcceptanceSummary, Category, Decision, Scalar

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
# Paths the operator mounts in every runtime pod (spec, checkpoints and report, scratch, shared
# memory): a user's volume may not sit on or above them.
RESERVED_MOUNT_PATHS = ("/etc/optrun", "/var/lib/optrun", "/scratch", "/dev/shm")
SPEEDUP_KEYS = ("kernels", "compression", "kernels+compression", "kvcache", "all")


class Spec(BaseModel):
    """Base for every spec model: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", validate_default=True
    )


# --- workload -------------------------------------------------------------------------------


class ModelSource(Spec):
    """A Hugging Face causal LM in a local directory (on a volume or in the image). It is loaded
    with transformers' Auto classes from local files only: nothing is ever downloaded."""

    path: Annotated[str, Field(min_length=1, max_length=4096)] = Field(
        description=(
            "Directory of the model as save_pretrained writes it: config.json, the weights "
            "(*.safetensors) and, unless tokenizerPath is set, the tokenizer files."
        ),
    )
    tokenizer_path: Annotated[str, Field(min_length=1, max_length=4096)] | None = Field(
        None, description="Directory of the tokenizer when it is not in `path`."
    )
    chat_template: bool | None = Field(
        None,
        description=(
            "Render chat-formatted data (a list of {role, content} messages) and the RLVR prompts with the "
            "tokenizer's chat template: true, false, or unset (use it when the tokenizer has one)."
        ),
    )
    attention: Literal["sdpa", "eager"] = Field(
        "sdpa", description="Attention implementation transformers uses (attn_implementation)."
    )


DATASET_FORMATS = ("jsonl", "parquet", "text", "arrow")


class DatasetSource(Spec):
    """The user's training data from local files, read with `datasets` (never downloaded). Text
    is tokenized with the model's tokenizer, documents joined by its EOS token, and packed into
    sequenceLength windows. The held-out split is `evalPath` when given; otherwise each document
    whose SHA-256 falls in the lowest `evalFraction` of the hash range is held out (the same
    documents for every run and file order; duplicates land on the same side)."""

    path: Annotated[str, Field(min_length=1, max_length=4096)] = Field(
        description="A file (jsonl, parquet, text) or a directory written by datasets' save_to_disk (arrow)."
    )
    format: Literal["jsonl", "parquet", "text", "arrow"] | None = Field(
        None,
        description=(
            "jsonl, parquet, text (one document per line) or arrow (save_to_disk); unset: from the file "
            "suffix (.jsonl/.json, .parquet, .txt) or a save_to_disk directory."
        ),
    )
    text_field: Annotated[str, Field(min_length=1, max_length=253)] = Field(
        "text",
        description="Column holding each document: a string, or a list of {role, content} messages (chat).",
    )
    split: Annotated[str, Field(min_length=1, max_length=253)] = Field(
        "train", description="Split to read from an arrow DatasetDict."
    )
    eval_path: Annotated[str, Field(min_length=1, max_length=4096)] | None = Field(
        None, description="A separate held-out file or directory in the same format; unset: split by hash."
    )
    eval_fraction: float = Field(
        0.1, gt=0.0, le=0.5, description="Share of documents held out when evalPath is unset."
    )
    max_documents: int | None = Field(
        None, ge=1, le=100_000_000, description="Read at most this many documents (in file order)."
    )


def _source_tag(value: Any) -> str | None:
    if isinstance(value, str):
        return "name"
    if isinstance(value, dict | BaseModel):
        return "source"
    return None


ModelField = Annotated[
    Annotated[Annotated[str, Field(pattern=MODEL_PATTERN, max_length=253)], Tag("name")]
    | Annotated[ModelSource, Tag("source")],
    Discriminator(
        _source_tag,
        custom_error_type="source_type",
        custom_error_message="expected a built-in model name, 'package.module:factory' or {path: DIR}",
    ),
]
DatasetField = Annotated[
    Annotated[Literal["pydoc"], Tag("name")] | Annotated[DatasetSource, Tag("source")],
    Discriminator(
        _source_tag,
        custom_error_type="source_type",
        custom_error_message="expected pydoc or {path: FILE, format: jsonl|parquet|text|arrow, textField: ...}",
    ),
]


class Workload(Spec):
    """What is optimized: a model, the data it trains on, and the shape of a batch."""

    model: ModelField = Field(
        description=(
            "Built-in reference model (tiny-lm: CPU-sized; small-lm, base-lm: GPU-sized), "
            "'package.module:factory' importable in the runtime image (returning an optrun CausalLM or a "
            "transformers causal LM), or {path: DIR}: a Hugging Face model directory."
        ),
    )
    dataset: DatasetField = Field(
        "pydoc",
        description=(
            "pydoc (the documentation text shipped with CPython) or {path, format, textField}: the user's "
            "data from local files."
        ),
    )
    sequence_length: int = Field(64, ge=8, le=32768, description="Tokens per training sequence.")
    batch_size: int = Field(16, ge=1, le=4096, description="Sequences per optimizer step.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description=(
            "Compute dtype of training and inference (bf16/fp16 need a GPU that supports them). A Hugging Face "
            "model is loaded in bf16 under bf16, in fp32 otherwise (fp16 trains with fp32 master weights and "
            "a gradient scaler)."
        ),
    )

    @field_validator("model")
    @classmethod
    def _known_builtin(cls, v: str | ModelSource) -> str | ModelSource:
        if isinstance(v, str) and ":" not in v and v not in BUILTIN_MODELS:
            raise ValueError(
                f"unknown built-in model; allowed: {', '.join(BUILTIN_MODELS)}, 'package.module:factory' "
                "or {path: DIR}"
            )
        return v

    @property
    def model_name(self) -> str:
        """A short name for logs, metrics labels and reports."""
        return self.model if isinstance(self.model, str) else self.model.path


class Volume(Spec):
    """A PersistentVolumeClaim mounted read-only in the runtime pod (the model and data of the
    run live there); locally the path is simply read from this machine."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)] = Field(
        description="Volume name in the pod (a DNS label)."
    )
    claim_name: Annotated[str, Field(min_length=1, max_length=253)] = Field(
        description="PersistentVolumeClaim in the run's namespace."
    )
    mount_path: Annotated[str, Field(pattern=r"^/", max_length=4096)] = Field(
        description="Absolute path the claim is mounted at, read-only (e.g. /models)."
    )
    sub_path: str | None = Field(None, max_length=4096, description="Directory inside the claim to mount.")

    @field_validator("mount_path")
    @classmethod
    def _not_reserved(cls, v: str) -> str:
        path = v.rstrip("/") or "/"
        if path == "/" or any(
            path == r or r.startswith(path + "/") or path.startswith(r + "/") for r in RESERVED_MOUNT_PATHS
        ):
            raise ValueError(
                f"overlaps the runtime's own mounts; not allowed: /, {', '.join(RESERVED_MOUNT_PATHS)}"
            )
        return v


# --- optimizations --------------------------------------------------------------------------


class Kernels(Spec):
    """Fused Triton kernels for RMSNorm, SwiGLU, rotary embedding and cross-entropy."""

    enabled: bool = Field(True, description="Apply the kernel optimizer.")
    mode: Literal["auto", "triton", "liger", "compile", "eager"] = Field(
        "auto",
        description=(
            "auto: measure every candidate per operation on the device (optrun's Triton kernels, Liger-Kernel's, "
            "torch.compile, eager) and keep the fastest correct one; triton, liger, compile, eager: force one."
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
    replay_coefficient: float = Field(
        1.0,
        ge=0.0,
        le=100.0,
        description=(
            "Weight of a language-model loss on the run's own training data added to every warm-up and GRPO "
            "update (InstructGPT's PPO-ptx), so that RL on the task does not erase what fine-tuning taught; 0: none."
        ),
    )
    replay_batch_size: int = Field(8, ge=1, le=4096, description="Sequences per replay batch.")
    max_heldout_loss_rise: float = Field(
        0.10,
        ge=0.0,
        le=100.0,
        description=(
            "Largest relative rise of the model's held-out loss on the run's data across the RLVR stage "
            "the acceptance test allows (0.10 = 10%)."
        ),
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
    stability: float = Field(0.10, ge=0.0, le=1.0, description="Weight of the stability tests.")

    @model_validator(mode="after")
    def _sum_to_one(self) -> Weights:
        total = sum(self.model_dump().values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"weights must sum to 1.0 (they sum to {total:g})")
        return self


Objective = Literal["speed", "memory", "both"]
# Memory figures judged with objective memory or both: reference bytes over optimized bytes.
MEMORY_KEYS = ("kvcache", "weights")
# A test of the user's own has a name without a dot; every built-in test's name has one
# (`area.test`), so the two can never clash and an entry's name says which it is.
TEST_NAME_PATTERN = r"^[a-z0-9]([a-z0-9.+_-]*[a-z0-9])?$"
METRIC_PATH_PATTERN = r"^[A-Za-z0-9_+-]+(\.[A-Za-z0-9_+-]+)*$"


class AcceptanceTestSpec(Spec):
    """A test of the user's own (a name without a dot, with a metric), or an override of a
    built-in test by its name (with a dot, no metric): its threshold and critical flag."""

    name: Annotated[str, Field(pattern=TEST_NAME_PATTERN, max_length=128)] = Field(
        description=(
            "Your own test: a name without a dot (my-accuracy). A built-in test to override: its name "
            "(e2e.target-accuracy; the names are listed in report.json's tests)."
        ),
    )
    metric: Annotated[str, Field(pattern=METRIC_PATH_PATTERN, max_length=512)] | None = Field(
        None,
        description=(
            "Your own test: the dotted path of the number in report.json it judges (training.finalAccuracy, "
            "speedups.all.median, details.<path>). Not allowed on an override."
        ),
    )
    min: float | None = Field(
        None, description="Lowest value that passes (an override replaces this end only)."
    )
    max: float | None = Field(
        None, description="Highest value that passes (an override replaces this end only)."
    )
    category: Category | None = Field(
        None,
        description=(
            "Your own test's category (critical-infrastructure, safety, end-to-end, stability, tuning); "
            "default tuning. A built-in test's category is fixed."
        ),
    )
    critical: bool | None = Field(
        None,
        description="Whether a failure means NO_GO; default false for your own test, the built-in's flag for an override.",
    )

    @property
    def is_override(self) -> bool:
        return "." in self.name

    @model_validator(mode="after")
    def _consistent(self) -> AcceptanceTestSpec:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min must not exceed max")
        if self.is_override:
            if self.metric is not None:
                raise ValueError(
                    f"{self.name!r} names a built-in test (a name with a dot), whose metric is its own: drop "
                    "metric to override its min, max or critical, or name your own test without a dot"
                )
            if self.category is not None:
                raise ValueError(
                    f"category of the built-in test {self.name!r} is fixed; allowed: min, max, critical"
                )
            if self.min is None and self.max is None and self.critical is None:
                raise ValueError(f"the override of {self.name!r} changes nothing; set min, max or critical")
            return self
        if self.metric is None:
            raise ValueError(
                f"metric is required for your own test {self.name!r} (a name without a dot); "
                "to override a built-in test, use its name (area.test)"
            )
        if self.min is None and self.max is None:
            raise ValueError(
                f"your own test {self.name!r} needs min or max (a test that cannot fail tests nothing)"
            )
        return self

    @field_validator("metric")
    @classmethod
    def _known_path(cls, v: str | None) -> str | None:
        from optrun.api.paths import MetricPathError, check_path

        if v is not None:
            try:
                check_path(v)
            except MetricPathError as exc:
                raise ValueError(str(exc)) from None
        return v


class BaselineSpec(Spec):
    """An earlier run to compare this one with: each measured figure within a tolerance."""

    report: str | None = Field(
        None, max_length=4096, description="Path of an earlier run's report.json, readable by the runtime."
    )
    run: Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)] | None = Field(
        None,
        description="An earlier OptimizationRun of the same namespace (in the cluster; the operator passes its result).",
    )
    tolerances: dict[
        Annotated[str, Field(pattern=METRIC_PATH_PATTERN)], Annotated[float, Field(ge=0.0, le=10.0)]
    ] = Field(
        default_factory=dict,
        description=(
            "Largest relative worsening allowed per figure (0.05 = 5 %), by metric path or a prefix of one "
            "(speedups, training.finalAccuracy, tests.kvcache.token-agreement); the longest match wins. "
            "Unset: the defaults per kind of figure (docs/acceptance.md)."
        ),
    )

    @model_validator(mode="after")
    def _one_source(self) -> BaselineSpec:
        if (self.report is None) == (self.run is None):
            raise ValueError(
                "set exactly one of report (a report.json path) or run (an OptimizationRun name)"
            )
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
    objective: Objective = Field(
        "speed",
        description=(
            "What the optimizations are for. speed: every speedup floor is at least 1.0 (no slowdown beyond "
            "the measured noise); memory: the speedup floors are relaxed to catch pathological slowdowns only, "
            "and the memory reductions (KV-cache bytes, weight bytes) are tested; both: the speed floors and "
            "the memory reductions. Default ranges: docs/acceptance.md."
        ),
    )
    memory: dict[str, Range] = Field(
        default_factory=dict,
        description=(
            "Accepted memory reductions (reference bytes / optimized bytes) per optimization: kvcache, weights; "
            "judged with objective memory or both. Unset keys use the defaults."
        ),
    )
    tests: list[AcceptanceTestSpec] = Field(
        default_factory=list,
        max_length=64,
        description="Your own tests (name, metric, min/max, category, critical) and overrides of built-in tests by name.",
    )
    baseline: BaselineSpec | None = Field(
        None,
        description="An earlier run to compare with; a regression beyond tolerance fails baseline.no-regression.",
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

    @field_validator("memory")
    @classmethod
    def _known_memory_keys(cls, v: dict[str, Range]) -> dict[str, Range]:
        unknown = sorted(set(v) - set(MEMORY_KEYS))
        if unknown:
            raise ValueError(f"unknown memory key(s) {', '.join(unknown)}; allowed: {', '.join(MEMORY_KEYS)}")
        return v

    @field_validator("tests")
    @classmethod
    def _unique_names(cls, v: list[AcceptanceTestSpec]) -> list[AcceptanceTestSpec]:
        counts = Counter(t.name for t in v)
        repeated = sorted(name for name, n in counts.items() if n > 1)
        if repeated:
            raise ValueError(f"test names must be unique; repeated: {', '.join(repeated)}")
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
    rank: int | None = Field(
        None, ge=0, le=8191, description="The rank it fires on in a distributed run; default: every rank."
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


class Distributed(Spec):
    """Data-parallel and sharded training on torch.distributed: `nodes` pods (one per node) of
    `processesPerNode` ranks each, started by torchrun; the global batch stays
    workload.batchSize, split evenly over the ranks."""

    nodes: int = Field(1, ge=1, le=128, description="Pods, one per node (torchrun's --nnodes).")
    processes_per_node: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Ranks per pod (torchrun's --nproc-per-node); default: resources.gpus, or 1 without GPUs.",
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: DistributedDataParallel (each rank holds the model); fsdp: FSDP2 (fully_shard: "
        "parameters, gradients and optimizer state sharded over the ranks).",
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="Collective backend; auto: nccl on GPUs, gloo on CPUs."
    )
    timeout_seconds: int = Field(
        300,
        ge=10,
        le=86_400,
        description="A collective that waits longer than this (a rank hung or gone) ends the attempt with a reason.",
    )


class Scheduling(Spec):
    priority_class_name: str | None = Field(
        None, max_length=253, description="PriorityClass of the runtime pod."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Extra tolerations."
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="Extra node selector labels.")
    runtime_class_name: str | None = Field(
        None, max_length=253, description="RuntimeClass of the runtime pods (e.g. nvidia)."
    )
    service_account_name: str | None = Field(
        None,
        max_length=253,
        description="ServiceAccount of the runtime pods (its token is not mounted: the runtime never calls the API).",
    )
    image_pull_secrets: list[str] = Field(
        default_factory=list, max_length=16, description="Secrets (by name) the kubelet pulls the image with."
    )


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
    distributed: Distributed = Field(
        default_factory=Distributed,
        description="torch.distributed training over several processes and nodes.",
    )
    volumes: list[Volume] = Field(
        default_factory=list,
        max_length=16,
        description=(
            "PersistentVolumeClaims mounted read-only in the runtime pod, e.g. the one holding workload.model.path "
            "and workload.dataset.path."
        ),
    )
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

    @property
    def world_size(self) -> int:
        """Ranks in all: nodes x processes per node (default: one per GPU, or one)."""
        return self.distributed.nodes * self.processes_per_node

    @property
    def processes_per_node(self) -> int:
        return self.distributed.processes_per_node or max(1, self.resources.gpus)

    @model_validator(mode="after")
    def _distributable(self) -> OptimizationRunSpec:
        world = self.world_size
        if world > 1 and self.workload.batch_size % world:
            raise ValueError(
                f"workload.batchSize {self.workload.batch_size} does not split evenly over {world} ranks "
                f"(distributed.nodes x processesPerNode); allowed: a multiple of {world}"
            )
        if self.distributed.nodes > 1 and not self.training.checkpoint.claim_name:
            # Every pod writes its shards into the same checkpoint directory and a restarted group
            # resumes from it: a pod's own emptyDir would leave each node a different history.
            raise ValueError(
                f"distributed.nodes {self.distributed.nodes} needs training.checkpoint.claimName: a "
                "PersistentVolumeClaim every pod mounts (ReadWriteMany) for the checkpoints and the report; "
                "allowed: a claim name, or distributed.nodes 1"
            )
        if self.distributed.strategy == "fsdp" and self.workload.precision == "fp16":
            raise ValueError(
                "distributed.strategy fsdp trains in fp32 or bf16; allowed precision: fp32, bf16"
            )
        c = self.optimizations.compression
        if self.distributed.strategy == "fsdp" and c.enabled and c.target in ("gradients", "both"):
            # Gradient compression is a DDP communication hook; FSDP reduce-scatters its gradients
            # with no hook to compress them, so the run would measure nothing of what it asks for.
            raise ValueError(
                f"optimizations.compression.target {c.target} compresses DDP's gradient all-reduce; "
                "distributed.strategy fsdp has none. Allowed: strategy ddp, or compression.target weights"
            )
        return self

    @field_validator("volumes")
    @classmethod
    def _distinct_volumes(cls, v: list[Volume]) -> list[Volume]:
        for attr, what in (("name", "name"), ("mount_path", "mountPath")):
            seen = [getattr(vol, attr).rstrip("/") for vol in v]
            dup = sorted({x for x in seen if seen.count(x) > 1})
            if dup:
                raise ValueError(f"each volume needs its own {what}; repeated: {', '.join(dup)}")
        return v


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
    pod_name: str | None = Field(
        None, description="Current or last runtime pod (rank 0's in a multi-node run)."
    )
    pods: list[str] = Field(
        default_factory=list,
        description="The runtime pods of the current or last attempt, by node index (index 0 hosts rank 0).",
    )
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
    nodes = spec.distributed.nodes
    if nodes > 1 and name and not re.fullmatch(rf"[a-z][-a-z0-9]{{0,{61 - len(str(nodes - 1))}}}", str(name)):
        # The pods' hostnames are <name>-<index> and their headless Service is <name>: DNS labels
        # of at most 63 characters, and a Service name starts with a letter.
        problems.append(
            f"metadata.name: {name!r} cannot name a run of spec.distributed.nodes {nodes} (pod hostnames "
            f"<name>-<index>, Service <name>); allowed: a DNS label starting with a letter, at most "
            f"{62 - len(str(nodes - 1))} characters"
        )
    if problems:
        raise ManifestError(problems)
    return spec
