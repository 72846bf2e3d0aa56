"""Tokenizers behind one small interface: text <-> ids, and the special ids a stage needs.

`ByteTokenizer` serves the built-in models (every UTF-8 byte a token, plus BOS/EOS/PAD: no
training, no unknown tokens). `HFTokenizer` wraps a Hugging Face tokenizer loaded from local
files; its chat template, when it has one and the run allows it, formats chat data and the
RLVR prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from torch import Tensor

from optrun.runtime import data


class Tokenizer(Protocol):
    vocab_size: int  # ids are in [0, vocab_size)
    bos_id: int | None
    eos_id: int
    pad_id: int

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """Text of `ids` up to the first EOS, special tokens left out."""
        ...

    def render_chat(self, messages: list[dict[str, str]], *, generation_prompt: bool) -> str | None:
        """The conversation in the model's chat format, or None when it has no chat template."""
        ...

    def completion_text(self, ids: Sequence[int]) -> str:
        """A generated completion (EOS removed) as text in which no special token can pass for
        text: a reward that matches an answer never matches one with PAD or BOS inside."""
        ...


class ByteTokenizer:
    """The built-in models' byte-level tokenizer (`optrun.runtime.data`)."""

    vocab_size = data.VOCAB_SIZE
    bos_id: int | None = data.BOS
    eos_id = data.EOS
    pad_id = data.PAD

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        return data.encode(text, bos=bos, eos=eos)

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        return data.decode(list(ids) if not isinstance(ids, Tensor) else ids)

    def render_chat(self, messages: list[dict[str, str]], *, generation_prompt: bool) -> str | None:
        return None

    def completion_text(self, ids: Sequence[int]) -> str:
        # ASCII as itself, other bytes as latin-1, special tokens as U+FFFD.
        return "".join(
            chr(t) if t < 128 else ("\ufffd" if t >= 256 else bytes([t]).decode("latin-1")) for t in ids
        )


class HFTokenizer:
    """A Hugging Face tokenizer (AutoTokenizer, local files only) behind the interface above.

    Without a pad token the EOS id pads: padded positions are never trained on (targets -100)
    and generation reports them as padding, so sharing the id is safe."""

    def __init__(self, tok: Any, *, chat_template: bool | None = None) -> None:
        self.tok = tok
        if tok.eos_token_id is None:
            raise ValueError("the tokenizer defines no EOS token (eos_token in tokenizer_config.json)")
        self.vocab_size = len(tok)
        self.bos_id = tok.bos_token_id
        self.eos_id = int(tok.eos_token_id)
        self.pad_id = int(tok.pad_token_id) if tok.pad_token_id is not None else self.eos_id
        has_template = bool(getattr(tok, "chat_template", None))
        self.uses_chat_template = has_template if chat_template is None else chat_template and has_template

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = list(self.tok.encode(text, add_special_tokens=False))
        if bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return [*ids, self.eos_id] if eos else ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many documents at once (the fast tokenizer parallelises in Rust)."""
        if not texts:
            return []
        return [list(x) for x in self.tok(texts, add_special_tokens=False)["input_ids"]]

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        if self.eos_id in values:
            values = values[: values.index(self.eos_id)]
        return str(self.tok.decode(values, skip_special_tokens=True))

    def completion_text(self, ids: Sequence[int]) -> str:
        # Special tokens stay in as their literal text ("<pad>"), which no answer equals.
        return str(self.tok.decode(list(ids), skip_special_tokens=False))

    def render_chat(self, messages: list[dict[str, str]], *, generation_prompt: bool) -> str | None:
        if not self.uses_chat_template:
            return None
        return str(
            self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        )
