"""The artifact: the model the run judged, written to `<output>/model`, loadable the standard way.

Layout of the directory:

    config.json, model.safetensors, tokenizer files   a Hugging Face model: save_pretrained's
                                                      output, so AutoModelForCausalLM.from_pretrained(dir)
                                                      loads it; the built-in models write
                                                      config.json + model.safetensors (load() below)
    quantized.safetensors                             with weight compression: every quantized
                                                      layer's codes and scales, as computed
    optrun-artifact.json                              what was applied, the held-out loss, the decision

Quantized layers are written twice, deliberately: `model.safetensors` holds their dequantized
float weights, which are exactly what a quantized layer computes with (y = x @ dequant(W)^T), so
any standard loader runs the judged model; `quantized.safetensors` holds the int8/int4 codes and
scales, which `load(dir)` turns back into optrun's QuantizedLinear layers (the memory saving).
Both give the same held-out loss; the acceptance test `infra.artifact-reloads` checks the
standard way against the loss measured on the model in memory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from optrun.api.result import Result
from optrun.runtime.context import RunContext
from optrun.runtime.lm.base import CausalLM, evaluate

log = logging.getLogger(__name__)

META = "optrun-artifact.json"
QUANTIZED = "quantized.safetensors"
FORMAT_HF, FORMAT_BUILTIN = "hf-safetensors", "optrun-safetensors"


def _quantized_layers(model: torch.nn.Module) -> dict[str, Any]:
    from optrun.runtime.compression.quantized_linear import QuantizedLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def applied(ctx: RunContext) -> list[str]:
    """Every optimization applied to the judged model, in lineage order, one line each."""
    r, out = ctx.results, []
    kernels = r.get("kernels")
    if isinstance(kernels, dict) and kernels.get("choices"):
        chosen = {op: c["choice"] for op, c in kernels["choices"].items()}
        out.append("kernels: " + ", ".join(f"{op}={c}" for op, c in chosen.items()))
    train = r.get("train") or {}
    if train.get("steps"):
        out.append(
            f"fine-tuned: {train['steps']} steps, {train.get('epochs', 0)} epochs under the safety gates"
        )
    rlvr = r.get("rlvr")
    if isinstance(rlvr, dict) and rlvr.get("curve"):
        out.append(f"rlvr: GRPO on {rlvr['task']}, {len(rlvr['curve'])} steps")
    comp = r.get("compression")
    if isinstance(comp, dict) and "weights" in comp:
        w = comp["weights"]
        out.append(
            f"compression: {comp['codec']} weight-only, {w['compressedTensors']} of {len(w['tensors'])} linear "
            f"layers within maxReconstructionError {comp['maxReconstructionError']:g}"
        )
    if ctx.spec.optimizations.kv_cache.enabled:
        out.append(
            f"kv-cache: {ctx.spec.optimizations.kv_cache.dtype} (a decoding setting, not stored in the weights: "
            "decode with optrun.runtime.kvcache.generate over a cache of that dtype; a Hugging Face model "
            "also with transformers' generate and optrun.runtime.lm.hf.OptrunCache)"
        )
    return out


def write(ctx: RunContext, directory: Path) -> dict[str, Any]:
    """Write ctx.model to `directory`, reload it the standard way and record both held-out
    losses in ctx.results["artifact"]."""
    model = ctx.model
    if model is None:
        raise RuntimeError("no model to write (the run left none)")
    directory.mkdir(parents=True, exist_ok=True)
    files = model.save(directory)
    quantized = _quantized_layers(model)
    layers = []
    if quantized:
        tensors: dict[str, torch.Tensor] = {}
        for name, layer in quantized.items():
            payload = layer.payload()
            for key, t in payload.tensors.items():
                tensors[f"{name}.{key}"] = t.detach().contiguous().cpu()
            layers.append(
                {
                    "name": name,
                    "inFeatures": layer.in_features,
                    "outFeatures": layer.out_features,
                    "dtype": str(payload.dtype).removeprefix("torch."),
                    "codec": layer.codec.describe(),
                    "tensors": list(payload.tensors),
                }
            )
        save_file(tensors, str(directory / QUANTIZED))
        files.append(QUANTIZED)
    batches = ctx.eval_batches()
    loss = evaluate(model, batches, ctx.device, ctx.dtype)["loss"]
    fmt = FORMAT_BUILTIN if model.family == "tiny-lm" else FORMAT_HF
    meta = {
        "format": fmt,
        "family": model.family,
        "source": ctx.spec.workload.model_name,
        "optimizations": applied(ctx),
        "heldOutLoss": loss,
        "quantizedLayers": layers,
        "decision": None,
    }
    (directory / META).write_text(json.dumps(meta, indent=2) + "\n")
    reloaded = load(directory, ctx.device, quantized=False)
    reloaded_loss = evaluate(reloaded, batches, ctx.device, ctx.dtype)["loss"]
    del reloaded
    standard = [f for f in files if f != QUANTIZED]
    codecs = sorted({str(entry["codec"].get("codec", "?")) for entry in layers})
    info = {
        "path": str(directory),
        "format": fmt,
        "files": sorted(files),
        "sizeBytes": sum((directory / f).stat().st_size for f in standard if (directory / f).is_file()),
        "quantizedBytes": (directory / QUANTIZED).stat().st_size if quantized else None,
        "heldOutLoss": loss,
        "reloadedHeldOutLoss": reloaded_loss,
        "quantization": (
            f"{', '.join(codecs)} weight-only codes and scales of {len(layers)} linear layers in {QUANTIZED}"
            if layers
            else None
        ),
        "optimizations": meta["optimizations"],
    }
    ctx.results["artifact"] = info
    log.info(
        "artifact %s: %d bytes, held-out loss %.6f (reloaded %.6f)",
        directory,
        info["sizeBytes"],
        loss,
        reloaded_loss,
    )
    return info


def record_decision(directory: Path, result: Result) -> None:
    """Add the run's decision to the artifact's metadata once it is known."""
    path = directory / META
    if not path.exists():
        return
    meta = json.loads(path.read_text())
    meta.update(decision=result.decision.value, score=result.score, riskLevel=result.risk_level)
    path.write_text(json.dumps(meta, indent=2) + "\n")


def load(directory: Path, device: torch.device | str = "cpu", *, quantized: bool = True) -> CausalLM:
    """The artifact as an optrun CausalLM: the standard loader (from_pretrained, or the built-in
    model's), then, with `quantized` and quantized layers recorded, those layers rebuilt from
    their stored codes and scales."""
    directory = Path(directory)
    meta = json.loads((directory / META).read_text()) if (directory / META).exists() else {}
    config = json.loads((directory / "config.json").read_text())
    device = torch.device(device)
    if config.get("architecture") == "optrun.TinyLM":
        from optrun.runtime.model import ModelConfig, TinyLM

        dims = {k: v for k, v in config.items() if k != "architecture"}
        model: CausalLM = TinyLM(ModelConfig(**dims))
        model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=True)
    else:
        import transformers

        from optrun.runtime.lm import hf

        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            directory, local_files_only=True, use_safetensors=True
        )
        model = hf.HFCausalLM(loaded, hf.load_tokenizer(str(directory), None), source=str(directory))
    if quantized and meta.get("quantizedLayers"):
        _restore_quantized(model, directory, meta["quantizedLayers"])
    return model.to(device).eval()


def _restore_quantized(model: CausalLM, directory: Path, layers: list[dict[str, Any]]) -> None:
    from optrun.runtime.compression.codecs import Payload, get_codec
    from optrun.runtime.compression.quantized_linear import QuantizedLinear

    tensors = load_file(str(directory / QUANTIZED))
    for entry in layers:
        d = entry["codec"]
        codec = get_codec(
            d["codec"],
            group_size=d.get("groupSize", 128),
            rank=d.get("rank", 4),
            topk_ratio=d.get("topkRatio", 0.01),
        )
        target = name = entry["name"]  # the same wrapper (CausalLM) wrote and reads the names
        old = model.get_submodule(target)
        payload = Payload(
            codec.name,
            (entry["outFeatures"], entry["inFeatures"]),
            getattr(torch, entry["dtype"]),
            {k: tensors[f"{name}.{k}"] for k in entry["tensors"]},
        )
        bias = getattr(old, "bias", None)
        new = QuantizedLinear(entry["inFeatures"], entry["outFeatures"], codec, payload, bias)
        parent, _, child = target.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
