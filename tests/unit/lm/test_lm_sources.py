"""A user's model and data, checked before any long stage: every bad input names its field.

Each case builds the bad input the way a user would end up with it (a directory without
config.json, an architecture with no causal-LM head, a tokenizer bigger than the embedding,
...), runs the real check, and looks for the field-named line. Then the corpus side: the
documented held-out rule, every format `datasets` reads, chat data through the template, and
that nothing a user gave is written to.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from optrun.api.v1alpha1 import DatasetSource, ModelSource, OptimizationRunSpec
from optrun.runtime.data import Corpus
from optrun.runtime.lm import hf, sources
from optrun.runtime.lm.example import documents


def spec(model: Any, dataset: Any = "pydoc", sequence_length: int = 64) -> OptimizationRunSpec:
    return OptimizationRunSpec.model_validate(
        {"workload": {"model": model, "dataset": dataset, "sequenceLength": sequence_length}}
    )


def problems_of(s: OptimizationRunSpec) -> list[str]:
    return sources.check(s)


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(path: Path, **changes: Any) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_a_good_model_and_dataset_have_no_problem(hf_dirs: dict[str, Path], jsonl_dataset: Path) -> None:
    for path in hf_dirs.values():
        assert problems_of(spec({"path": str(path)}, {"path": str(jsonl_dataset)})) == []


@pytest.mark.parametrize(
    ("breakage", "line"),
    [
        ("missing-directory", "spec.workload.model.path: {path} does not exist"),
        ("no-config", "spec.workload.model.path: {path} has no config.json"),
        ("no-safetensors", "spec.workload.model.path: {path} has no *.safetensors weights"),
        (
            "pickled-weights",
            "spec.workload.model.path: {path} has no *.safetensors weights (found pytorch_model.bin: "
            "pickled weights are not loaded)",
        ),
        (
            "no-causal-head",
            "spec.workload.model.path: architecture ViTModel (model_type 'vit') has no causal-LM head in "
            "transformers; allowed: model types AutoModelForCausalLM loads",
        ),
        (
            "custom-code",
            "spec.workload.model.path: {path} needs custom code (auto_map in config.json), which optrun never runs",
        ),
        (
            "tokenizer-too-big",
            "spec.workload.model.path: the tokenizer has {tokens} tokens but the model's embedding holds "
            "vocab_size 64",
        ),
        ("no-tokenizer", "spec.workload.model.path: no tokenizer files in {path}"),
        ("sequence-too-long", "spec.workload.sequenceLength: 4096 exceeds the model's position limit"),
    ],
)
def test_every_bad_model_directory_names_the_field(
    hf_dirs: dict[str, Path], tmp_path: Path, breakage: str, line: str
) -> None:
    path = tmp_path / "model"
    length = 64
    if breakage != "missing-directory":
        copy_model(hf_dirs["llama"], path)
    if breakage == "no-config":
        (path / "config.json").unlink()
    elif breakage in ("no-safetensors", "pickled-weights"):
        (path / "model.safetensors").unlink()
        if breakage == "pickled-weights":
            (path / "pytorch_model.bin").write_bytes(b"not loaded")
    elif breakage == "no-causal-head":
        edit_config(path, model_type="vit", architectures=["ViTModel"])
    elif breakage == "custom-code":
        edit_config(path, auto_map={"AutoModelForCausalLM": "modeling_mine.MyLM"})
    elif breakage == "tokenizer-too-big":
        edit_config(path, vocab_size=64)
    elif breakage == "no-tokenizer":
        for f in path.glob("tokenizer*"):
            f.unlink()
    elif breakage == "sequence-too-long":
        length = 4096
    found = problems_of(spec({"path": str(path)}, sequence_length=length))
    tokens = len(hf.load_tokenizer(str(hf_dirs["llama"]), None).tok)
    expected = line.format(path=path, tokens=tokens)
    # Each line starts with the field it is about, so a user knows what to change.
    assert any(p.startswith(expected) for p in found), f"no line starting {expected!r} in {found}"


def test_a_chat_template_asked_for_but_missing_names_the_field(hf_dirs: dict[str, Path]) -> None:
    found = problems_of(spec({"path": str(hf_dirs["llama"]), "chatTemplate": True}))
    assert any(p.startswith("spec.workload.model.chatTemplate: true, but the tokenizer") for p in found), (
        found
    )


@pytest.mark.parametrize(
    ("breakage", "line"),
    [
        ("missing-file", "spec.workload.dataset.path: {path} does not exist"),
        ("unknown-suffix", "spec.workload.dataset.format: cannot tell the format of {path}"),
        ("missing-field", "spec.workload.dataset.textField: 'body' is not a column of {path}; allowed: text"),
        ("empty", "spec.workload.dataset.path: {path} is empty (no documents)"),
        ("blank-documents", "spec.workload.dataset.path: {path} holds no documents with text in 'text'"),
        ("missing-eval", "spec.workload.dataset.evalPath: {eval} does not exist"),
    ],
)
def test_every_bad_dataset_names_the_field(
    tmp_path: Path, jsonl_dataset: Path, breakage: str, line: str
) -> None:
    path = tmp_path / "train.jsonl"
    extra: dict[str, Any] = {}
    if breakage == "unknown-suffix":
        path = tmp_path / "train.csv"
        path.write_text("text\nhello\n")
    elif breakage == "missing-field":
        shutil.copy(jsonl_dataset, path)
        extra["textField"] = "body"
    elif breakage == "empty":
        path.write_text("")
    elif breakage == "blank-documents":
        path.write_text('{"text": ""}\n{"text": ""}\n')
    elif breakage == "missing-eval":
        shutil.copy(jsonl_dataset, path)
        extra["evalPath"] = str(tmp_path / "eval.jsonl")
    found = problems_of(spec("tiny-lm", {"path": str(path), **extra}))
    expected = line.format(path=path, eval=tmp_path / "eval.jsonl")
    assert any(p.startswith(expected) for p in found), f"no line starting {expected!r} in {found}"


def test_too_few_tokens_for_one_sequence_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "tiny.jsonl"
    path.write_text('{"text": "just a few words"}\n')
    with pytest.raises(
        sources.SourceProblem,
        match=r"spec\.workload\.dataset\.path: the training split of .* holds \d+ tokens; one sequence needs at least sequenceLength \+ 2 = 66",
    ):
        Corpus.build(DatasetSource(path=str(path)), sequence_length=64)


def test_optrun_validate_exits_2_naming_the_field(hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    broken = copy_model(hf_dirs["qwen2"], tmp_path / "model")
    (broken / "config.json").unlink()
    manifest = tmp_path / "run.yaml"
    manifest.write_text(
        "apiVersion: optrun.io/v1alpha1\nkind: OptimizationRun\nmetadata: {name: mine}\n"
        f"spec:\n  workload:\n    model: {{path: {broken}}}\n    dataset: {{path: {tmp_path}/nope.jsonl}}\n"
    )
    for command in ("validate", "run"):
        done = subprocess.run(
            [sys.executable, "-m", "optrun.cli", command, str(manifest)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2, done.stderr
        assert f"error: spec.workload.model.path: {broken} has no config.json" in done.stderr
        assert f"error: spec.workload.dataset.path: {tmp_path}/nope.jsonl does not exist" in done.stderr
        assert "nothing was run" in done.stderr
        assert not (tmp_path / "runs").exists()


# -- a package.module:factory model ---------------------------------------------------------------------

FACTORIES = """\
import transformers
from optrun.runtime.lm import CausalLM
from optrun.runtime.lm.example import config_for, train_tokenizer

NOT_A_FUNCTION = 3


def raises():
    raise RuntimeError("weights bucket unreachable")


def a_dict():
    return {"model": None}


class NoTokenizer(CausalLM):
    pass


def no_tokenizer():
    return NoTokenizer()


def no_head():
    tok = train_tokenizer()
    return transformers.LlamaModel(config_for("llama", 576)), tok


def good():
    tok = train_tokenizer()
    return transformers.LlamaForCausalLM(config_for("llama", 576)), tok
"""


@pytest.fixture
def factories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user's module of factories, importable as `my_factories`."""
    (tmp_path / "my_factories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize(
    ("factory", "line"),
    [
        ("no_such_module_here:make", "'no_such_module_here:make' cannot be imported: ModuleNotFoundError"),
        ("my_factories:missing", "'my_factories:missing' cannot be imported: AttributeError"),
        ("my_factories:NOT_A_FUNCTION", "'my_factories:NOT_A_FUNCTION' is a int, not a function"),
        (
            "my_factories:raises",
            "the factory 'my_factories:raises' raised RuntimeError: weights bucket unreachable (at my_factories.py:",
        ),
        ("my_factories:a_dict", "the factory returned dict; allowed: an optrun CausalLM"),
        ("my_factories:no_tokenizer", "the factory's NoTokenizer is unusable: NotImplementedError"),
        ("my_factories:no_head", "the factory returned LlamaModel, which has no causal-LM head"),
    ],
)
def test_a_factory_that_does_not_give_a_usable_model_names_the_field(
    factories: Path, factory: str, line: str
) -> None:
    import torch

    from optrun.runtime.lm.loading import ModelLoadError, model_factory

    with pytest.raises(ModelLoadError) as caught:
        model_factory(spec(factory), torch.device("cpu"))()
    (problem,) = caught.value.problems
    assert problem.startswith(f"spec.workload.model: {line}"), problem
    assert "allowed: " in problem


def test_a_factory_returning_a_transformers_model_and_tokenizer_is_wrapped(factories: Path) -> None:
    import torch

    from optrun.runtime.lm.loading import model_factory

    model = model_factory(spec("my_factories:good"), torch.device("cpu"))()
    assert isinstance(model, hf.HFCausalLM) and model.family == "llama"
    assert sources.check(spec("my_factories:good")) == []


def test_optrun_validate_and_run_exit_2_on_a_bad_factory(factories: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{factories}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cases = {
        # validate imports the factory (it does not call it): a name that does not import is caught there
        "validate": (
            "my_factories:missing",
            "error: spec.workload.model: 'my_factories:missing' cannot be imported",
        ),
        # run calls it: what the factory raises ends the run before any stage, with exit 2
        "run": (
            "my_factories:raises",
            "error: spec.workload.model: the factory 'my_factories:raises' raised",
        ),
    }
    for command, (factory, line) in cases.items():
        manifest = tmp_path / f"{command}.yaml"
        manifest.write_text(
            "apiVersion: optrun.io/v1alpha1\nkind: OptimizationRun\nmetadata: {name: mine}\n"
            f"spec:\n  workload:\n    model: {factory}\n"
        )
        output = ["--output", str(tmp_path / "out")] if command == "run" else []
        done = subprocess.run(
            [sys.executable, "-m", "optrun.cli", command, str(manifest), *output],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=tmp_path,
        )
        assert done.returncode == 2, done.stderr[-3000:]
        assert line in done.stderr
        assert "Traceback" not in done.stderr
        assert "nothing was run" in done.stderr


# -- the corpus ---------------------------------------------------------------------------------------


def test_the_held_out_rule_is_a_hash_of_each_document_whatever_the_file_order(tmp_path: Path) -> None:
    docs = documents()
    forward, backward = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    forward.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    backward.write_text("".join(json.dumps({"text": d}) + "\n" for d in reversed(docs)))
    a_train, a_held = sources.read_documents(DatasetSource(path=str(forward)))
    b_train, b_held = sources.read_documents(DatasetSource(path=str(backward)))
    assert sorted(a_held) == sorted(b_held) and sorted(a_train) == sorted(b_train)
    assert a_held and set(a_held).isdisjoint(a_train)
    assert all(sources.held_out(d, 0.1) for d in a_held)
    # About evalFraction of the documents, as a hash split of 79 documents gives.
    assert 0.02 <= len(a_held) / len(docs) <= 0.25


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "text", "arrow"])
def test_every_format_gives_the_same_documents(
    tmp_path: Path, jsonl_dataset: Path, parquet_dataset: Path, fmt: str
) -> None:
    import datasets

    expected = [d for d in documents() if d]
    if fmt == "jsonl":
        path = jsonl_dataset
    elif fmt == "parquet":
        path = parquet_dataset
    elif fmt == "text":
        path = tmp_path / "docs.txt"
        expected = [" ".join(d.split()) for d in expected]  # one document per line
        path.write_text("\n".join(expected) + "\n")
    else:
        path = tmp_path / "arrow"
        datasets.Dataset.from_dict({"text": expected}).save_to_disk(str(path))
    train, held = sources.read_documents(DatasetSource(path=str(path)))
    assert sorted(train + held) == sorted(expected)


def test_an_eval_path_is_the_held_out_split(tmp_path: Path) -> None:
    docs = documents()
    train_file, eval_file = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train_file.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:70]))
    eval_file.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[70:]))
    corpus = Corpus.build(DatasetSource(path=str(train_file), evalPath=str(eval_file)), sequence_length=64)
    assert corpus.info["split"] == "evalPath"
    assert corpus.info["documents"] == {"train": 70, "heldOut": len(docs) - 70}


def test_chat_documents_go_through_the_tokenizers_template(chat_model_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    convo = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    path.write_text("".join(json.dumps({"messages": convo}) + "\n" for _ in range(40)))
    tok = hf.load_tokenizer(str(chat_model_dir), None)
    corpus = Corpus.build(DatasetSource(path=str(path), textField="messages"), tok, sequence_length=16)
    text = tok.tok.decode(corpus.train[:40].tolist())
    assert "<|user|>" in text and "What is 2+2?" in text and "<|assistant|>" in text


def test_reading_a_dataset_writes_nothing_next_to_it(tmp_path: Path, jsonl_dataset: Path) -> None:
    import datasets

    folder = tmp_path / "arrow"
    datasets.Dataset.from_dict({"text": documents()}).save_to_disk(str(folder))
    shutil.copy(jsonl_dataset, tmp_path / "train.jsonl")
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    for src in (DatasetSource(path=str(folder)), DatasetSource(path=str(tmp_path / "train.jsonl"))):
        Corpus.build(src, sequence_length=64)
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    assert after == before


def test_a_model_source_is_read_only_for_a_whole_load(hf_dirs: dict[str, Path]) -> None:
    import torch

    path = hf_dirs["mistral"]
    before = {p: p.stat().st_mtime_ns for p in path.rglob("*")}
    model = hf.load(ModelSource(path=str(path)), precision="fp32", device=torch.device("cpu"))
    model.loss(torch.tensor([[3, 4, 5]]), torch.tensor([[4, 5, 6]])).backward()
    assert {p: p.stat().st_mtime_ns for p in path.rglob("*")} == before


def test_a_model_too_big_for_the_device_says_how_many_bytes_it_needs_and_has(
    hf_dirs: dict[str, Path], tmp_path: Path
) -> None:
    import struct

    import torch

    from optrun.runtime.lm.loading import ModelLoadError, model_factory

    path = copy_model(hf_dirs["llama"], tmp_path / "model")
    # What a 70B checkpoint's index looks like to the loader: safetensors headers declaring the
    # tensors (the check reads headers only; the data need not be there to be refused).
    header = json.dumps(
        {
            "model.embed_tokens.weight": {"dtype": "BF16", "shape": [128_256, 8192], "data_offsets": [0, 0]},
            "model.layers.0.mlp.up_proj.weight": {
                "dtype": "BF16",
                "shape": [28_672, 8192 * 300],
                "data_offsets": [0, 0],
            },
        }
    ).encode()
    (path / "model-00002-of-00002.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    build = model_factory(spec({"path": str(path)}), torch.device("cpu"))
    with pytest.raises(ModelLoadError) as caught:
        build()
    (line,) = caught.value.problems
    assert line.startswith(f"spec.workload.model.path: the weights of {path} need ")
    need = int(line.split(" need ")[1].split(" bytes")[0])
    assert need > 70e9 * 4  # fp32 weights of ~71B parameters
    assert " bytes free; training needs about 4x that plus activations" in line


def test_paths_on_a_claim_this_machine_lacks_are_left_to_the_pod(tmp_path: Path) -> None:
    on_claim = OptimizationRunSpec.model_validate(
        {
            "workload": {
                "model": {"path": "/claims-not-here/llama"},
                "dataset": {"path": "/claims-not-here/d.jsonl"},
            },
            "volumes": [{"name": "models", "claimName": "weights", "mountPath": "/claims-not-here"}],
        }
    )
    assert sources.check(on_claim) == []
    # Off the claims, a missing path is the user's mistake, named as ever.
    off_claim = on_claim.model_copy(
        update={
            "workload": on_claim.workload.model_copy(
                update={"model": ModelSource(path=str(tmp_path / "nope"))}
            )
        }
    )
    assert [p for p in sources.check(off_claim) if "does not exist" in p] == [
        f"spec.workload.model.path: {tmp_path / 'nope'} does not exist; allowed: a Hugging Face model directory"
    ]
