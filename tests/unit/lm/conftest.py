"""A user's model directories and datasets, built as a user's volume holds them: tiny random
Hugging Face models from their config classes (Llama, Qwen2, Mistral; hidden size 64, two
layers) saved with save_pretrained next to a tokenizer trained locally on CPython's docs, and
JSONL / parquet datasets of those docs. Nothing is downloaded (optrun.runtime.lm.example)."""

from __future__ import annotations

from pathlib import Path

import pytest

from optrun.runtime.lm.example import FAMILIES, make_model, write_dataset


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Triton kernels run in Triton's interpreter on the CPU; selection caches stay in tmp."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("OPTRUN_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-models")
    return {family: make_model(root / family, family) for family in FAMILIES}


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("hf-chat") / "llama", "llama", chat_template=True)


@pytest.fixture(scope="session")
def jsonl_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "train.jsonl")


@pytest.fixture(scope="session")
def parquet_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "train.parquet", fmt="parquet")
