"""The built-in reference models: a small decoder-only language model, Llama-shaped, behind the
model interface every stage uses (`optrun.runtime.lm.CausalLM`).

It carries exactly the layers the kernel work replaces, each as its own module so a patcher can
swap it by type: `RMSNorm`, `SwiGLU` (the feed-forward), `RotaryEmbedding` (applied to q and k),
and `LMHeadLoss` (final projection + cross-entropy, which a fused kernel can compute without
materialising the (tokens x vocab) logits). Attention takes an optional KV cache that follows
`KVCache` below, so generation with a cache and training share one forward.

Presets (`PRESETS`) name sizes: `tiny-lm` trains on a laptop CPU in minutes, `small-lm` and
`base-lm` are GPU-sized.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optrun.runtime.lm.base import CausalLM, LMHeadLoss, float_state_dict
from optrun.runtime.lm.tokenizers import ByteTokenizer

__all__ = ["PRESETS", "CausalLM", "LMHeadLoss", "ModelConfig", "TinyLM", "build_model"]


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 260
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 4
    hidden_dim: int = 344
    max_seq_len: int = 512
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


PRESETS: dict[str, ModelConfig] = {
    "tiny-lm": ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=4, hidden_dim=344, max_seq_len=512),
    "small-lm": ModelConfig(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, hidden_dim=1376, max_seq_len=2048),
    "base-lm": ModelConfig(
        dim=1024, n_layers=16, n_heads=16, n_kv_heads=8, hidden_dim=2752, max_seq_len=4096
    ),
}


class KVCache(Protocol):
    """What attention needs from a cache; the kvcache package provides implementations."""

    def update(self, layer: int, k: Tensor, v: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """Store k, v (B, Hkv, T, D) at positions [start, start+T) of `layer`; return every key
        and value held for positions [0, start+T), dequantized to k's dtype."""
        ...


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 (Zhang & Sennrich, 2019)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class SwiGLU(nn.Module):
    """Feed-forward y = W2 (silu(W1 x) * W3 x) (Shazeer, 2020): w1 is the gate, w3 the up projection."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def rope_tables(
    seq_len: int, head_dim: int, theta: float, device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """cos and sin tables (seq_len, head_dim // 2) for rotary embeddings (Su et al., 2021)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (T, D/2)
    return freqs.cos(), freqs.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half rotary embedding (the Llama / HF convention).

    x: (B, H, T, D); cos, sin: (T, D/2). The pair (x[i], x[i + D/2]) is rotated by angle t * f_i.
    """
    d2 = x.shape[-1] // 2
    x1, x2 = x[..., :d2].float(), x[..., d2:].float()
    c, s = cos[None, None], sin[None, None]  # (1, 1, T, D/2)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Applies rotary position embeddings to q and k; holds the cos/sin tables."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        cos, sin = rope_tables(max_seq_len, head_dim, theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, q: Tensor, k: Tensor, start: int = 0) -> tuple[Tensor, Tensor]:
        t = q.shape[-2]
        cos, sin = self.cos[start : start + t], self.sin[start : start + t]
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)

    def forward(self, x: Tensor, cache: KVCache | None = None, start: int = 0) -> Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rotary(q, k, start)
        if cache is not None:
            k, v = cache.update(self.layer, k, v, start)  # (B, Hkv, start+T, D)
        if self.n_kv_heads != self.n_heads:  # grouped-query attention: share each kv head
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        s = k.shape[-2]
        if t == 1:  # one new token attends to everything cached
            y = F.scaled_dot_product_attention(q, k, v)
        elif s == t:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # a chunk after a cached prefix: causal with an offset
            mask = torch.ones(t, s, dtype=torch.bool, device=x.device).tril(diagonal=s - t)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.dim, cfg.hidden_dim)

    def forward(self, x: Tensor, cache: KVCache | None = None, start: int = 0) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cache, start)
        return x + self.ffn(self.ffn_norm(x))


class TinyLM(CausalLM):
    """Decoder-only LM: embeddings -> n x (RMSNorm, attention, RMSNorm, SwiGLU) -> RMSNorm -> head."""

    family = "tiny-lm"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self._model_cfg = cfg
        self.tokenizer = ByteTokenizer()
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.loss_fn = LMHeadLoss()
        self.apply(self._init)
        for name, p in self.named_parameters():  # scaled init of residual projections (GPT-2)
            if name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def hidden(self, tokens: Tensor, cache: KVCache | None = None, start: int = 0) -> Tensor:
        """Final normalised hidden states (B, T, dim)."""
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, cache, start)
        return self.norm(x)

    def forward(self, tokens: Tensor, cache: KVCache | None = None, start: int = 0) -> Tensor:
        """Logits (B, T, vocab)."""
        return self.output(self.hidden(tokens, cache, start))

    def loss(self, tokens: Tensor, targets: Tensor) -> Tensor:
        """Mean next-token cross-entropy; goes through `loss_fn` so a fused kernel can take over."""
        return self.loss_fn(self.hidden(tokens), self.output.weight, targets)

    @property
    def cfg(self) -> ModelConfig:
        return self._model_cfg

    def save(self, directory: Path) -> list[str]:
        """model.safetensors (float weights: a quantized layer is written dequantized) and
        config.json naming the architecture; `optrun.runtime.artifact.load` reads them back."""
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        save_file(float_state_dict(self), str(directory / "model.safetensors"))
        config = {"architecture": "optrun.TinyLM", **self.cfg.to_dict()}
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        return ["config.json", "model.safetensors"]


def build_model(name: str) -> TinyLM:
    """A built-in model by preset name; the error lists the allowed names."""
    if name not in PRESETS:
        raise ValueError(f"unknown built-in model {name!r}; allowed: {', '.join(PRESETS)}")
    return TinyLM(PRESETS[name])
