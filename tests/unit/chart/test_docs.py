"""The repository documents itself: no file refers to a design document kept outside it, and the
documents the others link to are there."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
# Spelt in parts so that this file does not match itself.
OUTSIDE = re.compile("|".join(re.escape(x) for x in ("DESIGN" + ".md", "STYLE" + ".md", "../" + "shared")))


def test_no_file_refers_to_a_design_document_outside_the_repository() -> None:
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    found = []
    for name in files:
        path = REPO / name
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue  # binary
        found += [f"{name}:{i}" for i, line in enumerate(text.splitlines(), 1) if OUTSIDE.search(line)]
    assert files and not found, f"references to documents outside the repository: {found}"


def test_the_architecture_document_links_only_to_files_that_exist() -> None:
    doc = REPO / "docs" / "architecture.md"
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", doc.read_text())
    assert links and all((doc.parent / link).exists() for link in links), links
