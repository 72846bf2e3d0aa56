"""A user's model directory and dataset, made locally: `optrun example-model DIR`.

It writes exactly what a platform team's volume holds, with nothing downloaded: a small random
Hugging Face causal LM (Llama, Qwen2 or Mistral, built from its transformers config class and
saved with `save_pretrained`), a byte-level BPE tokenizer trained with `tokenizers` on the
documentation text that ships with CPython, and that text as a JSONL dataset (one document per
documentation topic). The tests build their models the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("llama", "qwen2", "mistral")
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]
# A minimal chat template (role headers, then the content), for the chat-data tests.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def documents() -> list[str]:
    """CPython's documentation topics (pydoc_data), one document each, in a fixed order."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def train_tokenizer(vocab_size: int = 512, *, chat_template: bool = False) -> Any:
    """A byte-level BPE tokenizer trained on `documents()`, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def config_for(
    family: str, vocab_size: int, *, hidden: int = 64, layers: int = 2, max_positions: int = 512
) -> Any:
    """A small transformers config of `family` (hidden size 64, two layers by default)."""
    import transformers

    classes = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "mistral": transformers.MistralConfig,
    }
    if family not in classes:
        raise ValueError(f"family: {family!r} is not allowed; allowed: {', '.join(classes)}")
    return classes[family](
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(hidden * 8 / 3 + 7) // 8 * 8,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
    )


def make_model(
    directory: Path,
    family: str = "llama",
    *,
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
    chat_template: bool = False,
) -> Path:
    """Write a random model of `family` and its tokenizer to `directory` (save_pretrained)."""
    import transformers

    from optrun.runtime.lm import hf  # noqa: F401  (local files only, quiet progress bars)

    tokenizer = train_tokenizer(chat_template=chat_template)
    # Room above the tokenizer, rounded to 64, as released models pad their vocabularies (and
    # some tokenizer classes add a token of their own when loaded, e.g. Qwen2's unk).
    vocab = (len(tokenizer) + 64) // 64 * 64
    config = config_for(family, vocab, hidden=hidden, layers=layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def write_dataset(path: Path, *, field: str = "text", fmt: str = "jsonl") -> Path:
    """`documents()` as a dataset file: jsonl (one {field: text} object per line) or parquet."""
    docs = documents()
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        with path.open("w") as f:
            for d in docs:
                f.write(json.dumps({field: d}) + "\n")
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({field: docs}), path)
    else:
        raise ValueError(f"fmt: {fmt!r} is not allowed; allowed: jsonl, parquet")
    return path


def make_example(directory: Path, family: str = "llama") -> dict[str, Path]:
    """The newcomer's kit: DIR/model (the model and tokenizer) and DIR/data/train.jsonl."""
    model = make_model(directory / "model", family)
    data = write_dataset(directory / "data" / "train.jsonl")
    return {"model": model, "dataset": data}
