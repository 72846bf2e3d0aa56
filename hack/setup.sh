#!/usr/bin/env bash
# Provides the Python environment for optrun: a virtualenv cached outside the repository,
# keyed by the dependency set (pyproject.toml) and the Python version, so a warm machine
# reuses it and a changed dependency builds a fresh one. The checkout itself is installed
# editable on every call (cheap), so a new clone of the repo points the venv at itself.
# `.venv` in the repo root becomes a symlink to the cached venv.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${OPTRUN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/optrun}
py=${PYTHON:-python3}
command -v "$py" >/dev/null || { echo "setup: $py not found; set PYTHON to a Python >= 3.11" >&2; exit 1; }
# The key covers what pip installs (dependencies and extras) and the interpreter, not tool settings.
key=$("$py" - "$root/pyproject.toml" <<'PY'
import hashlib, json, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
deps = {"dependencies": project.get("dependencies", []), "extras": project.get("optional-dependencies", {})}
print(hashlib.sha256((json.dumps(deps, sort_keys=True) + sys.version).encode()).hexdigest()[:16])
PY
)
venv=$cache/venv-$key
mkdir -p "$cache"
if [ ! -f "$venv/.complete" ]; then
  echo "setup: building the Python environment in $venv (once per dependency set)" >&2
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade "pip>=24" "setuptools>=68" wheel
  # torch==2.13.0 is pinned in pyproject: on this machine pip takes the CPU build from disk.
  "$venv/bin/pip" install -q -e "$root[runtime,operator,dev]"
  touch "$venv/.complete"
fi
# Point the cached venv at this checkout (a clone elsewhere re-points it).
"$venv/bin/pip" install -q --no-deps --no-build-isolation -e "$root" >/dev/null
ln -sfn "$venv" "$root/.venv"
echo "$venv"
