"""The one model interface every stage of a run uses: `CausalLM`, and the helpers built on it.

A stage never asks what kind of model it holds. It calls

    model(tokens, cache=None, start=0) -> logits (B, T, V)   forward; with an optrun KV cache,
                                                             `tokens` sit at positions [start, start+T)
    model.attends_to_mask              -> whether forward also takes attention_mask= (B, start+T):
                                          1 for real tokens, 0 for left padding (Hugging Face
                                          models); the built-in models have no mask and see the
                                          padding as part of the prompt. `call` and
                                          `left_padding_mask` below pass one only where it applies
    model.loss(tokens, targets)        -> mean next-token cross-entropy (ignore_index -100), which
                                          is model(tokens, targets=targets): through forward (what
                                          DDP and FSDP hook) and `model.loss_fn` (what a fused
                                          kernel takes over)
    model.blocks()                     -> the decoder layers (FSDP's units)
    model.cfg                          -> Dims: vocab_size, dim, n_layers, n_heads, n_kv_heads,
                                          head_dim, max_seq_len (what caches and sweeps size by)
    model.tokenizer                    -> Tokenizer (text <-> ids, bos/eos/pad)
    model.layer_group(param_name)      -> the gradient gate's group of a parameter
    model.patch_mapping()              -> module type -> kernel Binding, for the patcher
    model.save(directory)              -> the artifact files, loadable the standard way
    model.describe()                   -> what the report says about the model

Two implementations: the built-in models (`optrun.runtime.model.TinyLM`) and Hugging Face causal
LMs (`optrun.runtime.lm.hf.HFCausalLM`). Generation with a cache is `optrun.runtime.kvcache.generate`,
on top of the forward above.

The helpers below exist once for every stage: `autocast` (the run's mixed precision),
`adamw` (the optimizer set-up: decay on matrices only), `evaluate` (held-out loss and
next-token accuracy) and `fingerprint` (what the lineage record compares between stages).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from optrun.runtime.kernels.patcher import Binding
    from optrun.runtime.lm.tokenizers import Tokenizer

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Dims:
    """The dimensions every stage sizes by (caches, sweeps, prompts)."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    max_seq_len: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class LMHeadLoss(nn.Module):
    """Mean cross-entropy of logits = hidden @ weight^T against targets (ignore_index -100).

    The eager form materialises the (N, V) logits; a fused kernel replaces this module."""

    def forward(self, hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
        logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()  # (N, V)
        return F.cross_entropy(logits.float(), targets.reshape(-1), ignore_index=-100)


_LAYER = re.compile(r"^(.*?layers\.\d+)\.")


class CausalLM(nn.Module):
    """Base of every model optrun judges; see the module docstring for the contract."""

    tokenizer: Tokenizer
    family: str = "unknown"  # tiny-lm, llama, qwen2, mistral, ...
    # Whether the patcher may also match layers by their structure (Llama-shaped norms and MLPs
    # of a user's own model) beyond `patch_mapping`.
    recognise_by_structure: bool = True
    # Whether forward takes attention_mask= (left padding masked out, positions counted from
    # each row's first real token); see `left_padding_mask`.
    attends_to_mask: bool = False

    @property
    def cfg(self) -> Any:  # Dims, or a config with the same attributes
        raise NotImplementedError

    def forward(
        self, tokens: Tensor, cache: Any = None, start: int = 0, targets: Tensor | None = None
    ) -> Tensor:
        raise NotImplementedError

    def loss(self, tokens: Tensor, targets: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The loss goes through forward (`targets=`): wrappers that hook a module's forward
        (DDP, FSDP2's fully_shard) then see every computation the model does. `attention_mask`
        only for a model that attends_to_mask (see `left_padding_mask`)."""
        if attention_mask is None:
            return self(tokens, targets=targets)
        return self(tokens, targets=targets, attention_mask=attention_mask)

    def blocks(self) -> list[nn.Module]:
        """The decoder layers, in order (FSDP shards each as its own unit)."""
        raise NotImplementedError

    def layer_group(self, param_name: str) -> str:
        """'layers.3.attn.wq.weight' and 'model.layers.3.mlp.up_proj.weight' -> their block;
        others by first name (embeddings, the final norm, the head)."""
        m = _LAYER.match(param_name)
        return m.group(1) if m else param_name.split(".", 1)[0]

    def patch_mapping(self) -> Mapping[type[nn.Module], Binding]:
        """Module types of this model that a kernel replaces, beyond the patcher's defaults."""
        return {}

    def save(self, directory: Path) -> list[str]:
        """Write the model so the standard loader reads it back; returns the files written."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        params = sum(p.numel() for p in self.parameters())
        return {"family": self.family, "parameters": params, "dims": _dims_dict(self.cfg)}


def left_padding_mask(
    model: nn.Module, prompt: Tensor, pad_id: int, length: int | None = None
) -> Tensor | None:
    """The attention mask (B, length) of a batch of left-padded prompts (B, P), as transformers'
    tokenizers give it with padding_side="left": 0 on each row's leading PAD tokens, 1 from its
    first real token on, and 1 on the `length - P` positions that follow the prompt (generated or
    appended tokens). None where no mask applies: a model that does not attend by mask (the
    built-in models train and evaluate on the padded prompts as they are) or no row padded."""
    if not getattr(model, "attends_to_mask", False):
        return None
    real = (prompt != pad_id).cumsum(dim=1) > 0
    if bool(real.all()):
        return None
    b, p = prompt.shape
    tail = torch.ones((b, (length or p) - p), dtype=torch.long, device=prompt.device)
    return torch.cat((real.long(), tail), dim=1)


def call(
    model: nn.Module, tokens: Tensor, cache: Any = None, start: int = 0, attention_mask: Tensor | None = None
) -> Tensor:
    """model(tokens, cache, start), with attention_mask (covering [0, start+T)) only when one is
    given: a model without masking never sees the keyword."""
    if attention_mask is None:
        return model(tokens, cache, start)  # type: ignore[no-any-return]
    return model(tokens, cache, start, attention_mask=attention_mask[:, : start + tokens.shape[1]])  # type: ignore[no-any-return]


def _dims_dict(cfg: Any) -> dict[str, int]:
    return {k: int(getattr(cfg, k)) for k in Dims.__dataclass_fields__ if hasattr(cfg, k)}


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[Any]:
    """The run's mixed precision: autocast to `dtype` unless it is fp32 (or the weights already are it)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def adamw(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.95),
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, decaying matrices only (norms and biases are not
    decayed, as in GPT-2 and Llama recipes)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("model: no trainable parameters")
    decay = [p for _, p in params if p.dim() >= 2]
    rest = [p for _, p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    # foreach=False: the per-tensor loop keeps a resumed CPU run bitwise equal to an uninterrupted one.
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate, betas=betas, foreach=False)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """Held-out loss (mean cross-entropy), perplexity and next-token accuracy over fixed batches.
    A batch that runs out of memory is evaluated in halves (rows), down to one row."""
    was_training = model.training
    model.eval()
    losses, correct, total = [], 0, 0
    try:
        for x, y in batches:
            loss, right, n = _evaluate_rows(model, x.to(device), y.to(device), device, dtype)
            losses.append(loss)
            correct += right
            total += n
    finally:
        model.train(was_training)
    if not losses:
        raise ValueError("batches: no held-out batch to evaluate on")
    loss = sum(losses) / len(losses)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "accuracy": correct / total}


def _evaluate_rows(
    model: nn.Module, x: Tensor, y: Tensor, device: torch.device, dtype: torch.dtype
) -> tuple[float, int, int]:
    """(mean loss, correct tokens, tokens) of one batch; on an out-of-memory error, of its two
    halves combined by their token counts (the same figures, in two smaller forwards)."""
    try:
        with autocast(device, dtype):
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).item()
        return loss, int((logits.argmax(-1) == y).sum().item()), y.numel()
    except torch.OutOfMemoryError:
        if x.shape[0] == 1:
            raise
    if device.type == "cuda":
        torch.cuda.empty_cache()
    half = x.shape[0] // 2
    log.warning(
        "evaluation ran out of memory at %d rows: evaluating %d and %d", x.shape[0], half, x.shape[0] - half
    )
    a, b = (_evaluate_rows(model, x[s], y[s], device, dtype) for s in (slice(None, half), slice(half, None)))
    n = a[2] + b[2]
    return (a[0] * a[2] + b[0] * b[2]) / n, a[1] + b[1], n


@torch.no_grad()
def fingerprint(model: nn.Module) -> str:
    """A cheap identity of the weights a model computes with (parameters and persistent buffers):
    two models with the same fingerprint hold the same values. The lineage record compares the
    model a stage hands on with the one the next stage receives."""
    total, absolute, count = 0.0, 0.0, 0
    for t in model.state_dict().values():
        if not isinstance(t, Tensor) or not (t.is_floating_point() or t.dtype in (torch.int8, torch.uint8)):
            continue
        d = t.detach().double()
        total += float(d.sum())
        absolute += float(d.abs().sum())
        count += t.numel()
    return f"{count}:{total:.12e}:{absolute:.12e}"


def float_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state_dict with every quantized linear layer written as its dequantized
    float weight (and bias): the names and values a plain model of the same architecture loads."""
    from optrun.runtime.compression.quantized_linear import QuantizedLinear

    state = dict(model.state_dict())
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            prefix = f"{name}." if name else ""
            for key in [k for k in state if k.startswith(prefix) and k[len(prefix) :].startswith("w_")]:
                del state[key]
            state[f"{prefix}weight"] = module.weight.detach().contiguous()
    return {k: v.contiguous() for k, v in state.items()}
