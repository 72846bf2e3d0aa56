#!/usr/bin/env bash
# The whole test suite, from a fresh machine: the Python environment (hack/setup.sh), the
# control plane and tools (hack/assets.sh), then lint, types, the import contract and pytest.
# Everything is cached outside the repository by version; a warm run spends its time in tests.
# Extra arguments go to pytest (e.g. `bash hack/test.sh -m "not slow"`).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv=$(bash hack/setup.sh)
bash hack/assets.sh
step() { echo "== $*" >&2; }
step "ruff"
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
step "mypy (strict on optrun.api and optrun.judge)"
# The runtime is torch code whose stubs make strict typing mostly noise; the contract layers are strict.
"$venv/bin/mypy" optrun/api optrun/judge
step "import contracts"
"$venv/bin/lint-imports"
step "pytest"
set +e
"$venv/bin/pytest" "$@"
rc=$?
set -e
# 5 means pytest collected no test: a suite that tests nothing must not pass.
exit $rc
