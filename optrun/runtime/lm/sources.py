"""The user's model and data: checked before any long stage, read from local files only.

`check(spec)` returns field-named problems (empty when the run can start): a
`package.module:factory` that does not import or is not callable, a model directory
without config.json or safetensors weights, an architecture with no causal-LM head, custom code
(`auto_map`, which optrun never runs), a tokenizer whose vocabulary does not fit the model's
embedding, a sequenceLength above the model's position limit, a dataset path that does not
exist, an unknown format, a missing textField, an empty dataset. `optrun validate` and `optrun
run` print them and exit 2; the runtime pod ends with them in its result.

`read_documents(source)` gives the training and held-out documents of a DatasetSource, by the
rule documented on the model (evalPath, else a hash of each document's text). Nothing a user
gave is ever written to: datasets' Arrow cache goes to its own cache directory (HF_DATASETS_CACHE
or ~/.cache/huggingface), and no `map` writes next to a save_to_disk directory.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from optrun.api.v1alpha1 import DatasetSource, ModelSource, OptimizationRunSpec

MODEL_FIELD = "spec.workload.model"
DATASET_FIELD = "spec.workload.dataset"
SUFFIX_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "text"}
# Hugging Face tokenizer files, any one of which lets AutoTokenizer load.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check(spec: OptimizationRunSpec) -> list[str]:
    """Every problem with the run's model and data sources (built-in names have none). A path
    on one of spec.volumes that this machine does not have is the cluster's to check (the
    runtime pod mounts the claim and checks it before training): it is skipped here."""
    problems: list[str] = []
    w = spec.workload
    if isinstance(w.model, ModelSource) and not on_absent_volume(spec, w.model.path):
        problems += check_model(w.model, w.sequence_length)
    elif isinstance(w.model, str) and ":" in w.model:
        try:
            import_factory(w.model)
        except SourceProblem as exc:
            problems.append(str(exc))
    if isinstance(w.dataset, DatasetSource) and not on_absent_volume(spec, w.dataset.path):
        problems += check_dataset(w.dataset, w.sequence_length)
    return problems


def on_absent_volume(spec: OptimizationRunSpec, path: str) -> bool:
    """Whether `path` lies under a spec.volumes mountPath that does not exist on this machine."""
    p = Path(path)
    for v in spec.volumes:
        mount = Path(v.mount_path)
        if (p == mount or mount in p.parents) and not mount.exists():
            return True
    return False


# -- the model -------------------------------------------------------------------------------------


FACTORY_ALLOWED = (
    "allowed: 'package.module:function', a function taking no arguments that returns an optrun CausalLM "
    "(optrun.runtime.lm.CausalLM) or a (transformers PreTrainedModel, tokenizer) pair"
)


def import_factory(name: str) -> Callable[[], Any]:
    """The function a `package.module:factory` model names (imported, not called); a module that
    does not import, a missing name or one that is not callable is a SourceProblem naming the field."""
    module, attr = name.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module), attr)
    except Exception as exc:  # an import runs the user's module: any error it raises is bad input
        raise SourceProblem(
            f"{MODEL_FIELD}: {name!r} cannot be imported: {type(exc).__name__}: {exc}; {FACTORY_ALLOWED}"
        ) from exc
    if not callable(fn):
        raise SourceProblem(
            f"{MODEL_FIELD}: {name!r} is a {type(fn).__name__}, not a function; {FACTORY_ALLOWED}"
        )
    return fn  # type: ignore[no-any-return]


def check_model(source: ModelSource, sequence_length: int) -> list[str]:
    path = Path(source.path)
    where = f"{MODEL_FIELD}.path"
    if not path.exists():
        return [f"{where}: {source.path} does not exist; allowed: a Hugging Face model directory"]
    if not path.is_dir():
        return [
            f"{where}: {source.path} is a file; allowed: a directory holding config.json and *.safetensors"
        ]
    if not (path / "config.json").is_file():
        return [
            f"{where}: {source.path} has no config.json; allowed: a directory as save_pretrained writes it "
            "(config.json, *.safetensors, tokenizer files)"
        ]
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        return [f"{where}: {source.path}/config.json is not readable JSON: {exc}"]
    problems: list[str] = []
    if config.get("auto_map"):
        problems.append(
            f"{where}: {source.path} needs custom code (auto_map in config.json), which optrun never runs; "
            "allowed: architectures transformers ships"
        )
    if not any(path.glob("*.safetensors")):
        bins = sorted(p.name for p in path.glob("*.bin"))
        problems.append(
            f"{where}: {source.path} has no *.safetensors weights"
            + (f" (found {', '.join(bins)}: pickled weights are not loaded)" if bins else "")
            + "; allowed: save_pretrained(..., safe_serialization=True) output"
        )
    problems += _check_architecture(config, where)
    max_positions = config.get("max_position_embeddings")
    if isinstance(max_positions, int) and sequence_length > max_positions:
        problems.append(
            f"spec.workload.sequenceLength: {sequence_length} exceeds the model's position limit "
            f"(max_position_embeddings {max_positions} in {source.path}/config.json); allowed: <= {max_positions}"
        )
    problems += _check_tokenizer(source, config)
    return problems


def _check_architecture(config: dict[str, Any], where: str) -> list[str]:
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = config.get("model_type")
    try:
        cfg = AutoConfig.for_model(model_type) if model_type else None
    except (ValueError, KeyError):
        cfg = None
    known = list(AutoModelForCausalLM._model_mapping.keys())
    if cfg is None or type(cfg) not in known:
        arch = ", ".join(config.get("architectures") or []) or "(none)"
        return [
            f"{where}: architecture {arch} (model_type {model_type!r}) has no causal-LM head in transformers; "
            "allowed: model types AutoModelForCausalLM loads, e.g. llama, qwen2, mistral"
        ]
    return []


def _check_tokenizer(source: ModelSource, config: dict[str, Any]) -> list[str]:
    tok_dir = Path(source.tokenizer_path or source.path)
    where = f"{MODEL_FIELD}.tokenizerPath" if source.tokenizer_path else f"{MODEL_FIELD}.path"
    if not tok_dir.is_dir() or not any((tok_dir / f).exists() for f in TOKENIZER_FILES):
        return [
            f"{where}: no tokenizer files in {tok_dir} (expected one of {', '.join(TOKENIZER_FILES)}); "
            "allowed: a directory tokenizer.save_pretrained wrote, or set tokenizerPath"
        ]
    from optrun.runtime.lm.hf import load_tokenizer

    try:
        tok = load_tokenizer(str(tok_dir), source.chat_template)
    except (OSError, ValueError, TypeError) as exc:
        return [f"{where}: the tokenizer in {tok_dir} does not load: {type(exc).__name__}: {exc}"]
    vocab = config.get("vocab_size")
    if isinstance(vocab, int) and tok.vocab_size > vocab:
        return [
            f"{where}: the tokenizer has {tok.vocab_size} tokens but the model's embedding holds vocab_size "
            f"{vocab}: ids >= {vocab} would index past it; allowed: the model's own tokenizer"
        ]
    if source.chat_template and not tok.uses_chat_template:
        return [f"{MODEL_FIELD}.chatTemplate: true, but the tokenizer in {tok_dir} has no chat template"]
    return []


def parameter_count(path: Path) -> int:
    """Parameters stored in a model directory's safetensors files, read from their headers
    (nothing is loaded)."""
    total = 0
    for file in path.glob("*.safetensors"):
        with file.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        total += sum(math.prod(e["shape"]) for k, e in header.items() if k != "__metadata__")
    return total


# -- the data --------------------------------------------------------------------------------------


def dataset_format(source: DatasetSource, path: Path | None = None) -> str | None:
    """The source's format: given, or from the path (suffix, or a save_to_disk directory)."""
    if source.format:
        return source.format
    p = path or Path(source.path)
    if p.is_dir():
        return "arrow" if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() else None
    return SUFFIX_FORMATS.get(p.suffix.lower())


def check_dataset(source: DatasetSource, sequence_length: int) -> list[str]:
    problems = []
    for attr, field in (("path", "path"), ("eval_path", "evalPath")):
        value = getattr(source, attr)
        if value is None:
            continue
        where = f"{DATASET_FIELD}.{field}"
        p = Path(value)
        if not p.exists():
            problems.append(
                f"{where}: {value} does not exist; allowed: a local file or save_to_disk directory"
            )
            continue
        if dataset_format(source, p) is None:
            problems.append(
                f"{DATASET_FIELD}.format: cannot tell the format of {value}; allowed: jsonl, parquet, text, arrow "
                "(set format, or use a .jsonl/.json, .parquet or .txt file or a save_to_disk directory)"
            )
    if problems:
        return problems
    try:
        train, held = read_documents(source, limit=1000)
    except SourceProblem as exc:
        return [str(exc)]
    if not train:
        return [f"{DATASET_FIELD}.path: {source.path} holds no documents with text in {source.text_field!r}"]
    del held, sequence_length  # the token counts are checked when the corpus is built
    return []


class SourceProblem(ValueError):
    """One field-named problem with a source."""


def _load(source: DatasetSource, path: str) -> Any:
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets

    datasets.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    fmt = dataset_format(source, Path(path))
    if Path(path).is_file() and Path(path).stat().st_size == 0:
        raise SourceProblem(f"{DATASET_FIELD}.path: {path} is empty (no documents)")
    try:
        if fmt == "arrow":
            loaded = datasets.load_from_disk(path)
            if isinstance(loaded, datasets.DatasetDict):
                if source.split not in loaded:
                    raise SourceProblem(
                        f"{DATASET_FIELD}.split: {source.split!r} is not a split of {path}; allowed: "
                        + ", ".join(loaded)
                    )
                loaded = loaded[source.split]
            return loaded
        builder = {"jsonl": "json", "parquet": "parquet", "text": "text"}[str(fmt)]
        return datasets.load_dataset(builder, data_files=path, split="train")
    except SourceProblem:
        raise
    except Exception as exc:  # datasets raises many kinds (pyarrow, json, schema); all are bad input
        raise SourceProblem(
            f"{DATASET_FIELD}.path: {path} does not read as {fmt}: {type(exc).__name__}: {exc}"
        ) from exc


def _texts(source: DatasetSource, path: str, limit: int | None) -> list[Any]:
    ds = _load(source, path)
    field = "text" if dataset_format(source, Path(path)) == "text" else source.text_field
    if field not in ds.column_names:
        raise SourceProblem(
            f"{DATASET_FIELD}.textField: {field!r} is not a column of {path}; allowed: {', '.join(ds.column_names)}"
        )
    n = len(ds) if limit is None else min(len(ds), limit)
    if n == 0:
        raise SourceProblem(f"{DATASET_FIELD}.path: {path} is empty (no documents)")
    column = ds.select(range(n))[field] if n < len(ds) else ds[field]
    return [d for d in column if d]


def held_out(text: str, fraction: float) -> bool:
    """The documented split rule: a document is held out when the first 8 bytes of the SHA-256
    of its text, read as a fraction of 2^64, fall below `fraction`."""
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < fraction


def read_documents(source: DatasetSource, limit: int | None = None) -> tuple[list[Any], list[Any]]:
    """(training documents, held-out documents); a document is a string or a list of
    {role, content} messages (rendered with the chat template later)."""
    cap = source.max_documents if limit is None else min(limit, source.max_documents or limit)
    docs = _texts(source, source.path, cap)
    if source.eval_path:
        return docs, _texts(source, source.eval_path, cap)
    train, held = [], []
    for d in docs:
        (held if held_out(_key(d), source.eval_fraction) else train).append(d)
    return train, held


def _key(doc: Any) -> str:
    return doc if isinstance(doc, str) else json.dumps(doc, sort_keys=True)


def render(doc: Any, tokenizer: Any) -> str:
    """A document as text: a string as it is, a list of messages through the chat template."""
    if isinstance(doc, str):
        return doc
    if isinstance(doc, list) and all(isinstance(m, dict) and "content" in m for m in doc):
        text = tokenizer.render_chat(doc, generation_prompt=False)
        if text is None:
            raise SourceProblem(
                f"{DATASET_FIELD}.textField: documents are chat messages but the tokenizer has no chat "
                "template (or workload.model.chatTemplate is false)"
            )
        return str(text)
    raise SourceProblem(
        f"{DATASET_FIELD}.textField: a document is {type(doc).__name__}; allowed: a string or a list of "
        "{role, content} messages"
    )


def available_memory(device: Any) -> int | None:
    """Bytes free for a model on `device`: free GPU memory, or the smaller of MemAvailable and
    what the container's cgroup still allows; None when unknown."""
    import torch

    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    candidates = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            candidates.append(int(limit) - used)
    except (OSError, ValueError):
        pass
    return min(candidates) if candidates else None
