"""Does a weight-quantized model still behave like the float one? Perplexity and greedy outputs.

Perplexity is exp(mean next-token cross-entropy) over fixed held-out batches; greedy agreement is
the share of generated tokens that match when both models decode the same prompts greedily (no
sampling, no cache: the full context is recomputed each token, so nothing but the weights can
differ). Greedy agreement of a barely trained model is fragile (near-ties flip), so it is
reported beside perplexity, which is what the acceptance test judges.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch
from torch import Tensor, nn

from optrun.runtime.data import Corpus

# Held-out windows decoded greedily by both models: how many, how long a prompt, how many tokens.
PROMPTS, PROMPT_TOKENS = 4, 8


@torch.no_grad()
def mean_loss(model: nn.Module, batches: list[tuple[Tensor, Tensor]], device: torch.device) -> float:
    model.eval()
    return statistics.fmean(float(model.loss(x.to(device), y.to(device))) for x, y in batches)


def compare(
    reference: nn.Module,
    candidate: nn.Module,
    corpus: Corpus,
    device: torch.device,
    *,
    seq_len: int = 64,
    batch_size: int = 8,
    batches: int = 4,
    new_tokens: int = 8,
) -> dict[str, Any]:
    """Perplexity of both models on the same held-out batches, and their greedy agreement on
    prompts cut from the held-out data (no cache: only the weights can differ)."""
    from optrun.runtime.kvcache.generate import generate

    evals = corpus.eval_batches(seq_len, batch_size, batches)
    ref_loss, cand_loss = mean_loss(reference, evals, device), mean_loss(candidate, evals, device)
    prompt = evals[0][0][:PROMPTS, :PROMPT_TOKENS].to(device)
    a = generate(reference, prompt, new_tokens, use_cache=False, eos_id=None).completions
    b = generate(candidate, prompt, new_tokens, use_cache=False, eos_id=None).completions
    ref_ppl, cand_ppl = math.exp(ref_loss), math.exp(cand_loss)
    return {
        "referenceLoss": ref_loss,
        "quantizedLoss": cand_loss,
        "referencePerplexity": ref_ppl,
        "quantizedPerplexity": cand_ppl,
        "perplexityRise": cand_ppl / ref_ppl - 1.0,
        "greedyAgreement": float((a == b).float().mean()),
    }
