"""The locks (requirements/*.txt, written by hack/lock.sh): up to date with pyproject.toml, each
satisfying the requirements of what installs it, closed under the dependencies of what they
lock, agreeing with each other, and exactly what this environment (hack/setup.sh's) holds."""

from __future__ import annotations

import importlib.metadata
import runpy
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[3]
LOCKS = REPO / "requirements"
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
EXTRAS = PROJECT["optional-dependencies"]
# What each lock is for: the requirements it must satisfy (hack/lock.sh's targets).
TARGETS = {
    "dev.txt": PROJECT["dependencies"] + [r for extra in EXTRAS.values() for r in extra],
    "operator.txt": PROJECT["dependencies"] + EXTRAS["operator"],
    "runtime.txt": PROJECT["dependencies"] + EXTRAS["runtime"],
}


def _pins(lock: str) -> dict[str, Version]:
    pins = {}
    for line in (LOCKS / lock).read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = Version(version)
    return pins


@pytest.mark.parametrize("lock", sorted(TARGETS))
def test_lock_is_not_older_than_the_dependency_lines_of_pyproject(lock: str) -> None:
    digest = runpy.run_path(str(REPO / "hack" / "deps_digest.py"))["digest"](REPO / "pyproject.toml")
    header = (LOCKS / lock).read_text()
    assert f"# pyproject-dependencies-sha256: {digest}\n" in header, (
        f"requirements/{lock} was written for other dependency lines: run hack/lock.sh"
    )


@pytest.mark.parametrize("lock", sorted(TARGETS))
def test_lock_satisfies_every_requirement_of_what_installs_it(lock: str) -> None:
    pins = _pins(lock)
    unmet = []
    for text in TARGETS[lock]:
        req = Requirement(text)
        if req.marker and not req.marker.evaluate():
            continue
        version = pins.get(canonicalize_name(req.name))
        if version is None or not req.specifier.contains(version, prereleases=True):
            unmet.append(f"{text}: locked {version}")
    assert not unmet, unmet


def test_the_image_locks_are_parts_of_the_whole_lock_at_the_same_versions() -> None:
    everything = _pins("dev.txt")
    for lock in ("operator.txt", "runtime.txt"):
        pins = _pins(lock)
        assert pins.items() <= everything.items(), {n: v for n, v in pins.items() if everything.get(n) != v}
    assert "torch" not in _pins("operator.txt") and "triton" not in _pins("operator.txt")
    # The lock names the release; this machine's CPU wheel (2.13.0+cpu) and PyPI's CUDA build
    # both satisfy it.
    assert str(everything["torch"]) == "2.13.0"


def _installed() -> dict[str, importlib.metadata.Distribution]:
    return {canonicalize_name(d.metadata["Name"]): d for d in importlib.metadata.distributions()}


@pytest.mark.parametrize("lock", sorted(TARGETS))
def test_lock_is_closed_under_the_dependencies_of_what_it_locks(lock: str) -> None:
    """What the operator image installs with --no-deps lacks nothing (its metadata read here,
    from the same versions in this environment)."""
    pins, installed = _pins(lock), _installed()
    missing = []
    for name in pins:
        for text in installed[name].requires or []:
            req = Requirement(text)
            if req.marker and not req.marker.evaluate({"extra": ""}):
                continue
            if canonicalize_name(req.name) not in pins:
                missing.append(f"{name} needs {text}")
    assert not missing, missing


def test_this_environment_holds_exactly_the_whole_lock() -> None:
    """hack/setup.sh installs requirements/dev.txt and nothing else (pip and this checkout
    aside): each locked package at its locked version, torch's local label aside."""
    pins, installed = _pins("dev.txt"), _installed()
    tools = {"pip", "optrun"}
    wrong = {
        n: installed[n].version
        for n in pins
        if n in installed and Version(installed[n].version).public != str(pins[n])
    }
    assert not wrong, f"installed versions that differ from the lock: {wrong}"
    assert not set(pins) - set(installed), f"locked, not installed: {set(pins) - set(installed)}"
    assert not set(installed) - set(pins) - tools, (
        f"installed, not locked: {set(installed) - set(pins) - tools}"
    )
