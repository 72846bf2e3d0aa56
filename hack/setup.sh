#!/usr/bin/env bash
# Provides the Python environment for optrun, in two layers:
#
#   $cache/venv-<key>   every dependency (torch, triton, kopf, pytest, ...), exactly the lock
#                       requirements/dev.txt (hack/lock.sh writes it from pyproject.toml), built
#                       once per lock and interpreter (the key), shared by every checkout;
#   <checkout>/.venv    a small venv of this checkout alone: it sees the cached dependencies
#                       through a .pth file and holds this checkout installed editable, with
#                       the console scripts (optrun, pytest, ruff, ...) bound to it.
#
# Two checkouts (a work tree and a CI clone) never point each other's `optrun` at the wrong
# code, and a changed lock builds a fresh cache entry (old ones stay). Prints the .venv path.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${OPTRUN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/optrun}
py=${PYTHON:-python3}
command -v "$py" >/dev/null || { echo "setup: $py not found; set PYTHON to a Python >= 3.11" >&2; exit 1; }
lock=$root/requirements/dev.txt
[ -f "$lock" ] || { echo "setup: $lock is missing; run hack/lock.sh" >&2; exit 1; }
# The key covers what pip installs (the lock) and the interpreter; a lock older than the
# dependency lines of pyproject.toml is used as it is, with a warning (the unit tests fail on it).
if ! grep -qx "# pyproject-dependencies-sha256: $("$py" "$root/hack/deps_digest.py" "$root/pyproject.toml")" "$lock"; then
  echo "setup: warning: requirements/*.txt are older than pyproject.toml's dependency lines; run hack/lock.sh" >&2
fi
key=$("$py" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read() + sys.version.encode()).hexdigest()[:16])' "$lock")
deps=$cache/venv-$key
log=$cache/setup-$key.log
mkdir -p "$cache"
if [ ! -f "$deps/.complete" ]; then
  echo "setup: installing the dependencies into $deps (once per dependency set; log in $log)" >&2
  rm -rf "$deps"
  "$py" -m venv "$deps"
  # The lock, copied beside the venv it made; the project itself is not installed here.
  cp "$lock" "$deps/requirements.txt"
  # torch==2.13.0 in the lock: on this machine pip takes the CPU build (2.13.0+cpu) from disk.
  # The lock is the whole set, so pip adds nothing to it; `pip check` proves it is consistent.
  if ! { "$deps/bin/pip" install --upgrade "pip>=24" &&
    "$deps/bin/pip" install -r "$deps/requirements.txt" && "$deps/bin/pip" check; } >"$log" 2>&1; then
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
