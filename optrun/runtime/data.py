"""Tokenizer and the built-in corpus.

The tokenizer is byte-level (every UTF-8 byte is a token, plus BOS/EOS/PAD): no training, no
unknown tokens, and the same vocabulary serves prose and arithmetic prompts. The corpus is the
documentation text that ships with CPython (`pydoc_data.topics`, about 465 KB), so a run needs
no download. Batches are random windows drawn from a generator seeded by (seed, epoch): the
data position of a run is (epoch, step), which is all a checkpoint needs to resume exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """Token ids split into a training part and a held-out tail (never trained on)."""

    train: Tensor
    val: Tensor

    @classmethod
    def build(cls, name: str, val_fraction: float = 0.1) -> Corpus:
        ids = torch.tensor(encode(load_text(name)), dtype=torch.long)
        cut = int(len(ids) * (1.0 - val_fraction))
        return cls(train=ids[:cut], val=ids[cut:])

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
