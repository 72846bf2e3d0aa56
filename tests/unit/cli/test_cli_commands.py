"""The `optrun` command's front: validate, crd, and what `run` does with a bad manifest.

Exit codes are part of the interface (a script tells the outcomes apart by them): 2 for an
invalid manifest or usage, and nothing is run (no output directory appears)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from optrun import cli
from optrun.api import crd

ROOT = Path(__file__).resolve().parents[3]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"

BAD = """\
apiVersion: optrun.io/v1alpha1
kind: OptimizationRun
metadata: {name: bad}
spec:
  workload: {model: tiny-lm, batchSize: sixteen, precision: fp64}
  trainig: {epochs: 3}
  training: {learningRate: 2.0}
"""


@pytest.fixture
def bad_manifest(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    return path


def test_validate_accepts_the_quickstart(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", str(QUICKSTART)]) == 0
    out = capsys.readouterr().out
    assert "valid OptimizationRun 'quickstart'" in out
    assert "model tiny-lm" in out


def test_validate_prints_every_error_and_exits_2(
    bad_manifest: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["validate", str(bad_manifest)]) == cli.EXIT_INVALID == 2
    err = capsys.readouterr().err.splitlines()
    assert "error: spec.workload.batchSize: 'sixteen' has the wrong type; allowed: integer" in err
    assert "error: spec.workload.precision: 'fp64' is not allowed; allowed: fp32, bf16, fp16" in err
    assert "error: spec.training.learningRate: 2.0 is out of range; allowed: > 0.0 and <= 1.0" in err
    assert any(line.startswith("error: spec.trainig: unknown field; allowed: workload,") for line in err)
    assert err[-1] == f"{bad_manifest}: 4 error(s); nothing was run"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"),
        ("spec: [unclosed", "not valid YAML"),
        ("", "found 0"),
        (QUICKSTART.read_text() + "\n---\n" + QUICKSTART.read_text(), "found 2"),
    ],
    ids=["missing-file", "bad-yaml", "empty", "two-documents"],
)
def test_validate_rejects_unreadable_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str
) -> None:
    path = tmp_path / "manifest.yaml"
    if content is not None:
        path.write_text(content)
    assert cli.main(["validate", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_run_with_a_bad_manifest_exits_2_and_runs_nothing(
    bad_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert cli.main(["run", str(bad_manifest), "--output", str(out), "--quiet"]) == 2
    assert not out.exists()
    assert "nothing was run" in capsys.readouterr().err


def test_runtime_with_a_bad_manifest_exits_2_and_runs_nothing(bad_manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = cli.main(["runtime", "--spec", str(bad_manifest), "--output", str(out), "--termination-log", ""])
    assert code == 2
    assert not out.exists()


def test_validate_exit_code_reaches_the_shell(bad_manifest: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "optrun.cli", "validate", str(bad_manifest)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 2
    assert "spec.trainig: unknown field" in done.stderr
    assert done.stdout == ""


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run"])
    assert exit_.value.code == 2
    assert "file" in capsys.readouterr().err


def test_crd_prints_the_generated_crd(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["crd"]) == 0
    assert capsys.readouterr().out == crd.render()


def test_crd_output_writes_the_file(tmp_path: Path) -> None:
    target = tmp_path / "crd.yaml"
    assert cli.main(["crd", "--output", str(target)]) == 0
    assert target.read_text() == crd.render()


def test_exit_codes_tell_the_decisions_apart() -> None:
    codes = [cli.EXIT["GO"], cli.EXIT["CONDITIONAL_GO"], cli.EXIT["NO_GO"], cli.EXIT_CRASH, cli.EXIT_INVALID]
    assert len(set(codes)) == len(codes)
    assert cli.EXIT["GO"] == 0 and cli.EXIT_TERM == 143
    for code in codes:
        assert f"{code}  " in cli.__doc__ or f"{code} " in cli.__doc__


def test_example_model_writes_a_model_and_dataset_that_validate(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "optrun.cli", "example-model", str(tmp_path / "kit"), "--family", "mistral"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "kit" / "model" / "config.json").exists()
    assert (tmp_path / "kit" / "data" / "train.jsonl").exists()
    manifest = tmp_path / "run.yaml"
    manifest.write_text(
        "apiVersion: optrun.io/v1alpha1\nkind: OptimizationRun\nmetadata: {name: kit}\nspec:\n  workload:\n"
        f"    model: {{path: {tmp_path}/kit/model}}\n    dataset: {{path: {tmp_path}/kit/data/train.jsonl}}\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "optrun.cli", "validate", str(manifest)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert f"model {tmp_path}/kit/model" in done.stdout
