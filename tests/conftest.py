"""Root-level hooks for the whole test suite. Keep this file minimal: add each new hook in a
block of its own, with a comment that says which part of the project needs it and why."""

import sys
from pathlib import Path

# --- control-plane fixtures (tests/support) ----------------------------------------------------
# `tests.support` must import however pytest is started (`.venv/bin/pytest` does not put the
# repository root on sys.path). The fixtures (cluster, kube, kubectl, node_agent, namespace,
# assets) are registered here, once, so integration and e2e tests in one session share one
# control plane; none of them starts anything until a test asks for it.
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

pytest_plugins = ["tests.support.fixtures"]
