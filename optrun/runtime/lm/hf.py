"""Hugging Face causal LMs behind optrun's model interface (`CausalLM`).

A user's model is a directory as `save_pretrained` writes it (config.json, *.safetensors, the
tokenizer files), on a volume or in the image. It is loaded with `AutoModelForCausalLM` and
`AutoTokenizer` from local files only (HF_HUB_OFFLINE is forced: nothing is ever downloaded),
safetensors only (no pickle), in the dtype the run's precision asks for.

`HFCausalLM` wraps the loaded model so every stage sees the same contract as the built-in
models:
- the forward takes optrun's KV caches: they are handed to transformers wrapped in
  `OptrunCache`, a `transformers.Cache` whose layers store keys and values in optrun's dense
  or quantized cache, so `hf_model.generate(..., cache=OptrunCache(store))` works too;
- the loss goes through `loss_fn` (hidden states of the base model against the LM head's
  weight), so the fused linear cross-entropy kernel replaces it without materialising logits;
- the patch sites are declared per family (`FAMILIES`): the family's RMSNorm and gated MLP
  classes, and its rotary application. transformers calls `apply_rotary_pos_emb` as a module
  function; optrun routes that function through a per-model `RotaryApply` module (a context
  variable set for the duration of this model's forward), so patching one model's rotary
  never changes another model of the same family in the process (Liger-Kernel's monkey patch
  is process-wide). Families not in the table run unpatched, and the kernel table says so.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optrun.runtime.lm.base import CausalLM, Dims, LMHeadLoss, float_state_dict
from optrun.runtime.lm.tokenizers import HFTokenizer

# Before transformers is imported anywhere in this process: local files only.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import transformers
from transformers.cache_utils import Cache, CacheLayerMixin

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

log = logging.getLogger(__name__)


# -- patch sites per family ----------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """Where a model family's patchable layers live in transformers."""

    module: str  # the modeling module (it defines apply_rotary_pos_emb)
    norm: str  # RMSNorm class: y = x * rsqrt(mean(x^2) + variance_epsilon) * weight
    mlp: str  # gated MLP: down_proj(act_fn(gate_proj(x)) * up_proj(x))


FAMILIES: dict[str, Family] = {
    "llama": Family("transformers.models.llama.modeling_llama", "LlamaRMSNorm", "LlamaMLP"),
    "qwen2": Family("transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm", "Qwen2MLP"),
    "mistral": Family("transformers.models.mistral.modeling_mistral", "MistralRMSNorm", "MistralMLP"),
    "qwen3": Family("transformers.models.qwen3.modeling_qwen3", "Qwen3RMSNorm", "Qwen3MLP"),
}

_ROPE_SITE: contextvars.ContextVar[nn.Module | None] = contextvars.ContextVar(
    "optrun_rope_site", default=None
)


class RotaryApply(nn.Module):
    """transformers' `apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)` as a module: the
    rotary patch site of one model. cos, sin: (B, T, D) with duplicated halves (rotate-half)."""

    def __init__(self, fn: Callable[..., tuple[Tensor, Tensor]]) -> None:
        super().__init__()
        self.fn = fn

    def forward(
        self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1
    ) -> tuple[Tensor, Tensor]:
        return self.fn(q, k, cos, sin, unsqueeze_dim)


def _install_rope_dispatch(module_name: str) -> Callable[..., tuple[Tensor, Tensor]]:
    """Route the family module's apply_rotary_pos_emb through the running model's RotaryApply
    (once per module); returns the original function."""
    mod = importlib.import_module(module_name)
    current = mod.apply_rotary_pos_emb
    original = getattr(current, "__optrun_original__", current)
    if current is original:

        def apply_rotary_pos_emb(
            q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1
        ) -> Any:
            site = _ROPE_SITE.get()
            if site is None:
                return original(q, k, cos, sin, unsqueeze_dim)
            return site(q, k, cos, sin, unsqueeze_dim)

        apply_rotary_pos_emb.__optrun_original__ = original  # type: ignore[attr-defined]
        mod.apply_rotary_pos_emb = apply_rotary_pos_emb
    return original


# -- transformers' Cache over optrun's caches ----------------------------------------------------------


class _Layer(CacheLayerMixin):
    """One layer of an optrun cache as transformers sees it: `update` stores the new keys and
    values at the current length and returns every one held so far."""

    is_sliding = False
    is_croppable = True

    def __init__(self, store: Any, index: int) -> None:
        super().__init__()
        self.store, self.index, self.length = store, index, 0
        self.batch_size = store.batch

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.length
        keys, values = self.store.update(self.index, key_states, value_states, start)
        self.length = start + key_states.shape[-2]
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return int(self.store.max_len)

    def crop(self, tokens_to_remove: int) -> None:
        self.length = -tokens_to_remove if tokens_to_remove < 0 else max(0, self.length - tokens_to_remove)

    def reset(self) -> None:
        self.length = 0


class OptrunCache(Cache):
    """A `transformers.Cache` whose keys and values live in an optrun cache (`DenseKVCache`,
    `QuantizedKVCache`): `model.generate(ids, cache=OptrunCache(store))` decodes through it."""

    def __init__(self, store: Any) -> None:
        super().__init__(layers=[_Layer(store, i) for i in range(store.n_layers)])
        self.store = store

    def seek(self, position: int) -> None:
        """Continue writing at `position` (the next forward's tokens go to [position, ...))."""
        for layer in self.layers:
            layer.length = position


def _wrapped(store: Any) -> OptrunCache:
    """The store's transformers view, made once per store (it keeps the write position)."""
    view = getattr(store, "_transformers_view", None)
    if view is None:
        view = OptrunCache(store)
        store._transformers_view = view
    return view


# -- the adapter ---------------------------------------------------------------------------------------


def _dims(config: Any) -> Dims:
    heads = int(config.num_attention_heads)
    hidden = int(config.hidden_size)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return Dims(
        vocab_size=int(config.vocab_size),
        dim=hidden,
        n_layers=int(config.num_hidden_layers),
        n_heads=heads,
        n_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=int(head_dim),
        max_seq_len=int(config.max_position_embeddings),
    )


class HFCausalLM(CausalLM):
    """A transformers causal LM (`hf`) and its tokenizer, as optrun's `CausalLM`."""

    # Patch sites come from FAMILIES only: a look-alike layer of another family (Gemma's norm
    # scales by 1 + weight) would compute something else under a kernel.
    recognise_by_structure = False
    attends_to_mask = True

    def __init__(self, hf: nn.Module, tokenizer: HFTokenizer, *, source: str | None = None) -> None:
        super().__init__()
        self.hf = hf
        self.tokenizer = tokenizer
        self.source = source
        self.family = str(getattr(hf.config, "model_type", "unknown"))
        self.loss_fn = LMHeadLoss()
        self._config_dims = _dims(hf.config)
        family = FAMILIES.get(self.family)
        # The rotary site is a child module, so the patcher finds and swaps it like any layer.
        self.rope: RotaryApply | None = (
            RotaryApply(_install_rope_dispatch(family.module)) if family is not None else None
        )

    @property
    def cfg(self) -> Dims:
        return self._config_dims

    def _base(self) -> nn.Module:
        return getattr(self.hf, self.hf.base_model_prefix)

    @contextlib.contextmanager
    def _sites(self) -> Iterator[None]:
        token = _ROPE_SITE.set(self.rope)
        try:
            yield
        finally:
            _ROPE_SITE.reset(token)

    def forward(
        self,
        tokens: Tensor,
        cache: Any = None,
        start: int = 0,
        targets: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Logits (or, with `targets`, the loss). `attention_mask` (B, start+T), 1 for real
        tokens and 0 for left padding: the padding is masked out of attention and positions
        count from each row's first real token, as transformers' generate and TRL do, so a
        padded prompt computes what it computes alone."""
        masking = self._masking(tokens, start, attention_mask)
        with self._sites():
            if targets is not None:
                return self._loss(tokens, targets, masking)
            if cache is None:
                return self.hf(input_ids=tokens, use_cache=False, **masking).logits
            view = _wrapped(cache)
            view.seek(start)
            return self.hf(input_ids=tokens, cache=view, use_cache=True, **masking).logits

    @staticmethod
    def _masking(tokens: Tensor, start: int, attention_mask: Tensor | None) -> dict[str, Tensor]:
        if attention_mask is None:
            return {}
        t = tokens.shape[1]
        if attention_mask.shape != (tokens.shape[0], start + t):
            raise ValueError(
                f"attention_mask: shape {tuple(attention_mask.shape)}; expected (batch, start + tokens) = "
                f"({tokens.shape[0]}, {start + t})"
            )
        # Padding gets position 0 (it is masked out; any position would do), real tokens 0, 1, ...
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, start:]
        return {"attention_mask": attention_mask, "position_ids": positions}

    def _loss(self, tokens: Tensor, targets: Tensor, masking: dict[str, Tensor]) -> Tensor:
        head = self.hf.get_output_embeddings()
        if getattr(head, "bias", None) is not None or getattr(
            self.hf.config, "final_logit_softcapping", None
        ):
            # A head the fused loss does not compute (a bias, soft-capped logits): the model's own logits.
            logits = self.hf(input_ids=tokens, use_cache=False, **masking).logits
            return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        hidden = self._base()(input_ids=tokens, use_cache=False, **masking).last_hidden_state
        return self.loss_fn(hidden, head.weight, targets)

    def blocks(self) -> list[nn.Module]:
        return list(self._base().layers)

    def patch_mapping(self) -> Mapping[type[nn.Module], Any]:
        from optrun.runtime.kernels.patcher import Binding

        family = FAMILIES.get(self.family)
        if family is None:
            return {}
        mod = importlib.import_module(family.module)
        out: dict[type[nn.Module], Any] = {
            getattr(mod, family.norm): Binding("rms_norm", {"weight": "weight", "eps": "variance_epsilon"}),
            RotaryApply: Binding("rope", {}, form="hf"),
        }
        if getattr(self.hf.config, "hidden_act", "silu") == "silu":
            out[getattr(mod, family.mlp)] = Binding(
                "swiglu", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
            )
        return out

    def save(self, directory: Path) -> list[str]:
        """save_pretrained of the model (float weights: a quantized layer is written dequantized,
        which is exactly what it computes) and of the tokenizer."""
        directory.mkdir(parents=True, exist_ok=True)
        state = float_state_dict(self.hf)
        self.hf.save_pretrained(directory, state_dict=state, safe_serialization=True)
        self.tokenizer.tok.save_pretrained(directory)
        return sorted(p.name for p in directory.iterdir())

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "source": self.source,
            "architecture": type(self.hf).__name__,
            "dtype": str(next(self.hf.parameters()).dtype).removeprefix("torch."),
            "patchSites": sorted({b.op for b in self.patch_mapping().values()}),
        }


# -- loading -------------------------------------------------------------------------------------------


class SourceError(ValueError):
    """A model or dataset source that cannot be used; `problems` are field-named lines."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


def weights_dtype(precision: str) -> torch.dtype:
    """The dtype a Hugging Face model's weights are loaded in: bf16 under bf16 (pure bf16
    training, the usual fine-tuning recipe), fp32 otherwise (fp16 trains with fp32 master
    weights and a gradient scaler: GradScaler cannot unscale fp16 gradients)."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def load_tokenizer(path: str, chat_template: bool | None) -> HFTokenizer:
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return HFTokenizer(tok, chat_template=chat_template)


def load(source: Any, *, precision: str, device: torch.device) -> HFCausalLM:
    """The model of a ModelSource, on `device`, checked (see optrun.runtime.lm.sources.check_model)."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        source.path,
        local_files_only=True,
        use_safetensors=True,
        dtype=weights_dtype(precision),
        attn_implementation=source.attention,
    )
    tokenizer = load_tokenizer(source.tokenizer_path or source.path, source.chat_template)
    model = HFCausalLM(hf, tokenizer, source=source.path)
    return model.to(device)


def wrap(obj: Any, field: str) -> CausalLM:
    """A factory's result as a CausalLM: an optrun CausalLM as it is, a (transformers model,
    tokenizer) pair wrapped; anything else, or a model the stages cannot use (no tokenizer, no
    dimensions), is an error that names the field."""
    allowed = (
        "allowed: an optrun CausalLM (optrun.runtime.lm.CausalLM, with a tokenizer and cfg) or a "
        "(transformers PreTrainedModel with a causal-LM head, tokenizer) pair"
    )
    if isinstance(obj, CausalLM):
        model = obj
    elif (
        isinstance(obj, tuple)
        and len(obj) == 2
        and isinstance(obj[0], transformers.PreTrainedModel)
        and hasattr(obj[1], "encode")
    ):
        if obj[0].get_output_embeddings() is None:
            name = type(obj[0]).__name__
            raise SourceError(
                [f"{field}: the factory returned {name}, which has no causal-LM head; {allowed}"]
            )
        try:
            model = HFCausalLM(obj[0], HFTokenizer(obj[1]))
        except (ValueError, AttributeError, TypeError) as exc:
            raise SourceError(
                [f"{field}: the factory's (model, tokenizer) pair is unusable: {exc}; {allowed}"]
            ) from exc
    else:
        raise SourceError([f"{field}: the factory returned {type(obj).__name__}; {allowed}"])
    try:
        _ = (model.cfg.max_seq_len, model.tokenizer.eos_id)  # what every stage reads first
    except (AttributeError, NotImplementedError) as exc:
        why = f"{type(exc).__name__}: {exc}"
        raise SourceError(
            [f"{field}: the factory's {type(model).__name__} is unusable: {why}; {allowed}"]
        ) from exc
    return model


def read_config(path: Path) -> dict[str, Any]:
    return dict(json.loads((path / "config.json").read_text()))
