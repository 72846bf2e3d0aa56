"""Where the control-plane binaries and tools are: the Python side of `hack/assets.sh`.

`hack/assets.sh` builds or fetches them into the cache (`$OPTRUN_CACHE`, by default
`~/.cache/optrun`) and writes `assets.env` there; `load()` reads that file and runs the script
when the file, or a binary it names, is missing. The script is idempotent and returns in well
under a second when everything is cached.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
ASSETS_SCRIPT = REPO_ROOT / "hack" / "assets.sh"


def cache_dir() -> Path:
    """The cache root, by the same rule as hack/setup.sh and hack/assets.sh."""
    if "OPTRUN_CACHE" in os.environ:
        return Path(os.environ["OPTRUN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "optrun"


@dataclasses.dataclass(frozen=True)
class Assets:
    """Absolute paths of every binary the integration and e2e tests run."""

    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    etcd: Path
    kubectl: Path
    helm: Path
    prometheus: Path
    promtool: Path

    def missing(self) -> list[Path]:
        return [p for p in dataclasses.astuple(self) if not os.access(p, os.X_OK)]


class AssetsUnavailable(RuntimeError):
    """hack/assets.sh could not provide the binaries; the message says why and what to set."""


def _read_env_file(path: Path) -> Assets | None:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return None
    values = dict(line.split("=", 1) for line in lines if "=" in line)
    try:
        assets = Assets(**{f.name: Path(values[f.name.upper()]) for f in dataclasses.fields(Assets)})
    except KeyError:
        return None
    # An escape-hatch directory named now must win over what an earlier run recorded.
    for var, binary in (("OPTRUN_KUBE_ASSETS", assets.kube_apiserver), ("OPTRUN_TOOLS", assets.kubectl)):
        wanted = os.environ.get(var)
        if wanted and binary.parent != Path(wanted).resolve():
            return None
    return None if assets.missing() else assets


def load(*, provide: bool = True) -> Assets:
    """Return the cached assets, running hack/assets.sh first if any are missing.

    With provide=False a missing asset raises AssetsUnavailable instead of building.
    """
    env_file = cache_dir() / "assets.env"
    assets = _read_env_file(env_file)
    if assets is not None:
        return assets
    if not provide:
        raise AssetsUnavailable(f"control-plane assets are missing; run `bash {ASSETS_SCRIPT}`")
    result = subprocess.run(["bash", str(ASSETS_SCRIPT)], capture_output=True, text=True)
    if result.returncode != 0:
        raise AssetsUnavailable(f"hack/assets.sh failed:\n{result.stderr[-4000:]}")
    assets = _read_env_file(env_file)
    if assets is None:
        raise AssetsUnavailable(f"hack/assets.sh succeeded but {env_file} names missing binaries")
    return assets
