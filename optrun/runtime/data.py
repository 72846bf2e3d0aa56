"""Tokenizer and the built-in corpus.

The tokenizer is byte-level (every UTF-8 byte is a token, plus BOS/EOS/PAD): no training, no
unknown tokens, and the same vocabulary serves prose and arithmetic prompts. The corpus is the
documentation text that ships with CPython (`pydoc_data.topics`, about 465 KB), so a run needs
no download. Batches are random windows drawn from a generator seeded by (seed, epoch): the
data position of a run is (epoch, step), which is all a checkpoint needs to resume exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

BOS, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 260  # 256 bytes + BOS, EOS, PAD + one spare (keeps the vocabulary even)


def encode(text: str, bos: bool = False, eos: bool = False) -> list[int]:
    ids = list(text.encode("utf-8"))
    return ([BOS] if bos else []) + ids + ([EOS] if eos else [])


def decode(ids: list[int] | Tensor) -> str:
    values = ids.tolist() if isinstance(ids, Tensor) else ids
    out = bytearray()
    for i in values:
        if i == EOS:
            break
        if 0 <= i < 256:
            out.append(i)
    return out.decode("utf-8", errors="replace")


def load_text(name: str) -> str:
    """The text of a built-in dataset; the error lists the allowed names."""
    if name == "pydoc":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics))
    raise ValueError(f"unknown dataset {name!r}; allowed: pydoc")


@dataclass
class Corpus:
    """Token ids split into a training part and a held-out part (never trained on)."""

    train: Tensor
    val: Tensor
    info: dict[str, Any] = field(default_factory=dict)  # source, split rule, counts (the report's)

    @classmethod
    def build(
        cls,
        dataset: Any = "pydoc",
        tokenizer: Any = None,
        *,
        sequence_length: int = 8,
        val_fraction: float = 0.1,
    ) -> Corpus:
        """The corpus of a workload's dataset in `tokenizer`'s ids (byte-level by default).

        The built-in pydoc text is split at its tail (the last `val_fraction` of its tokens is
        held out); a user's dataset by its documented rule (see DatasetSource). Documents are
        joined by the tokenizer's EOS. Too few tokens for one window of `sequence_length` on
        either side is an error that names the dataset field."""
        if isinstance(dataset, str):
            text = load_text(dataset)
            ids = encode(text) if tokenizer is None else tokenizer.encode(text)
            t = torch.tensor(ids, dtype=torch.long)
            cut = int(len(t) * (1.0 - val_fraction))
            corpus = cls(train=t[:cut], val=t[cut:], info={"source": dataset, "split": "tail", "tokens": {}})
        else:
            corpus = _from_documents(dataset, tokenizer, sequence_length)
        corpus.info["tokens"] = {"train": len(corpus.train), "heldOut": len(corpus.val)}
        return corpus

    def batches_per_epoch(self, seq_len: int, batch_size: int) -> int:
        """One epoch sees about as many tokens as the training split holds."""
        return max(1, len(self.train) // (seq_len * batch_size))

    def batch(self, split: str, seq_len: int, batch_size: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """Random windows (B, T) and their next-token targets (B, T)."""
        data = self.train if split == "train" else self.val
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=gen)
        x = torch.stack([data[s : s + seq_len] for s in starts.tolist()])
        y = torch.stack([data[s + 1 : s + seq_len + 1] for s in starts.tolist()])
        return x, y

    def epoch_generator(self, seed: int, epoch: int) -> torch.Generator:
        """The batch order of one epoch depends only on (seed, epoch)."""
        return torch.Generator().manual_seed(seed * 1_000_003 + epoch)

    def eval_batches(self, seq_len: int, batch_size: int, n: int) -> list[tuple[Tensor, Tensor]]:
        """A fixed set of held-out batches, the same for every evaluation of a run."""
        gen = torch.Generator().manual_seed(0)
        return [self.batch("val", seq_len, batch_size, gen) for _ in range(n)]


def _from_documents(source: Any, tokenizer: Any, sequence_length: int) -> Corpus:
    from optrun.runtime.lm import sources

    if tokenizer is None:
        from optrun.runtime.lm.tokenizers import ByteTokenizer

        tokenizer = ByteTokenizer()
    train_docs, held_docs = sources.read_documents(source)

    def stream(docs: list[Any]) -> list[int]:
        texts = [sources.render(d, tokenizer) for d in docs]
        encoded = (
            tokenizer.encode_batch(texts)
            if hasattr(tokenizer, "encode_batch")
            else [tokenizer.encode(t) for t in texts]
        )
        out: list[int] = []
        for ids in encoded:
            out += ids
            out.append(tokenizer.eos_id)
        return out

    need = sequence_length + 2  # one window and its shifted targets, with room to draw a start
    train, val = stream(train_docs), stream(held_docs)
    rule = "evalPath" if source.eval_path else "sha256"
    if not source.eval_path and (len(val) < need or len(train) < need):
        # Too few documents for the hash rule to leave a window on both sides (a tiny or
        # single-document dataset): hold out the tail of the token stream instead, as for pydoc.
        everything = stream(train_docs + held_docs)
        cut = int(len(everything) * (1.0 - source.eval_fraction))
        train, val, rule = everything[:cut], everything[cut:], "tail"
    for part, ids, field_name in (
        ("training", train, "path"),
        ("held-out", val, "evalPath" if source.eval_path else "path"),
    ):
        if len(ids) < need:
            raise sources.SourceProblem(
                f"spec.workload.dataset.{field_name}: the {part} split of {source.path} holds {len(ids)} tokens; "
                f"one sequence needs at least sequenceLength + 2 = {need}"
            )
    return Corpus(
        train=torch.tensor(train, dtype=torch.long),
        val=torch.tensor(val, dtype=torch.long),
        info={
            "source": source.path,
            "format": sources.dataset_format(source),
            "textField": source.text_field,
            "split": rule,
            "documents": {"train": len(train_docs), "heldOut": len(held_docs)},
        },
    )
