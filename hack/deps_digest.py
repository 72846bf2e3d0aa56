"""Prints the digest of pyproject.toml's dependency lines (the core and every extra).

hack/lock.sh writes it into the header of each lock (requirements/*.txt); hack/setup.sh and the
unit tests compare it with pyproject.toml's, so a lock older than a dependency change shows.
Standard library only: it runs before any environment exists."""

import hashlib
import json
import sys
import tomllib
from pathlib import Path


def digest(pyproject: Path) -> str:
    project = tomllib.loads(pyproject.read_text())["project"]
    declared = {"dependencies": project["dependencies"], "extras": project["optional-dependencies"]}
    return hashlib.sha256(json.dumps(declared, sort_keys=True).encode()).hexdigest()[:16]


if __name__ == "__main__":
    print(digest(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parents[1] / "pyproject.toml")))
