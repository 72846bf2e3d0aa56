#!/usr/bin/env bash
# Provides the Python environment for optrun, in two layers:
#
#   $cache/venv-<key>   every dependency (torch, triton, kopf, pytest, ...), built once per
#                       dependency set and interpreter (the key), shared by every checkout;
#   <checkout>/.venv    a small venv of this checkout alone: it sees the cached dependencies
#                       through a .pth file and holds this checkout installed editable, with
#                       the console scripts (optrun, pytest, ruff, ...) bound to it.
#
# Two checkouts (a work tree and a CI clone) never point each other's `optrun` at the wrong
# code, and a changed dependency list builds a fresh cache entry. Prints the .venv path.
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
deps=$cache/venv-$key
log=$cache/setup-$key.log
mkdir -p "$cache"
if [ ! -f "$deps/.complete" ]; then
  echo "setup: installing the dependencies into $deps (once per dependency set; log in $log)" >&2
  rm -rf "$deps"
  "$py" -m venv "$deps"
  # The requirement list comes from pyproject.toml; the project itself is not installed here.
  "$py" - "$root/pyproject.toml" >"$deps/requirements.txt" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
reqs = list(project.get("dependencies", []))
for extra in ("runtime", "operator", "dev"):
    reqs += project.get("optional-dependencies", {}).get(extra, [])
print("\n".join(dict.fromkeys(reqs)))
PY
  # torch==2.13.0 is pinned in pyproject: on this machine pip takes the CPU build from disk.
  if ! { "$deps/bin/pip" install --upgrade "pip>=24" "setuptools>=68" wheel &&
    "$deps/bin/pip" install -r "$deps/requirements.txt"; } >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "setup: pip failed; the whole log is $log" >&2
    exit 1
  fi
  touch "$deps/.complete"
fi

venv=$root/.venv
site=$venv/lib/python$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')/site-packages
if [ -L "$venv" ] || [ "$(cat "$venv/.deps" 2>/dev/null)" != "$deps" ]; then
  rm -rf "$venv"
  "$py" -m venv --without-pip "$venv"
  # addsitedir (not a bare path) also runs the .pth files of the dependency venv.
  echo "import site; site.addsitedir('$deps/lib/python$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')/site-packages')" \
    >"$site/_optrun_deps.pth"
  # The dependency venv's console scripts, bound to this venv's interpreter.
  for tool in "$deps"/bin/*; do
    name=$(basename "$tool")
    case $name in activate* | Activate* | python* | pip* | optrun) continue ;; esac
    if head -c 2 "$tool" | grep -q '#!'; then
      sed "1s|^#!.*python.*$|#!$venv/bin/python|" "$tool" >"$venv/bin/$name"
      chmod +x "$venv/bin/$name"
    else
      ln -s "$tool" "$venv/bin/$name"
    fi
  done
  echo "$deps" >"$venv/.deps"
fi
# This checkout, editable, with its `optrun` script (the dependency venv's pip does the work).
if ! "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$root" >"$cache/setup-editable.log" 2>&1; then
  cat "$cache/setup-editable.log" >&2
  exit 1
fi
echo "$venv"
