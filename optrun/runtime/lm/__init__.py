"""The model interface (`CausalLM`) and its two implementations: the built-in models
(`optrun.runtime.model`) and Hugging Face causal LMs (`optrun.runtime.lm.hf`, imported only
when a run asks for one: transformers is a heavy import). `optrun.runtime.lm.loading` turns a
run's workload into a model, `optrun.runtime.lm.sources` checks a user's model and data before
any long stage."""

from optrun.runtime.lm.base import CausalLM, Dims, LMHeadLoss, adamw, autocast, evaluate, fingerprint
from optrun.runtime.lm.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer

__all__ = [
    "ByteTokenizer",
    "CausalLM",
    "Dims",
    "HFTokenizer",
    "LMHeadLoss",
    "Tokenizer",
    "adamw",
    "autocast",
    "evaluate",
    "fingerprint",
]
