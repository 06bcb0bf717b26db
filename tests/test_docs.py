"""The documentation says what the programs do: docs/admin.md's session is real output, and
no document or benchmark output refers to an issue tracker."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ISSUE = re.compile(r"\bissue\s*#\s*\d+|\b(?:the|an|this|that) issues?\b(?! (?:a|an|the) )", re.I)


def test_admin_md_session_is_real_output() -> None:
    """Runs every command of the documented session against a fresh broker and compares."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "admin_examples.py"), "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_admin_md_documents_the_shared_exit_statuses() -> None:
    text = (REPO / "docs" / "admin.md").read_text()
    for line in ("| 3 | the broker refused", "| 4 | the broker is unreachable", "| 5 | `audit"):
        assert line in text, line


def test_nothing_names_an_issue() -> None:
    files = [REPO / "README.md", REPO / "keys" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    files += sorted((REPO / "bench").glob("*.py"))
    found = [
        f"{f.relative_to(REPO)}:{n}: {line.strip()}"
        for f in files
        for n, line in enumerate(f.read_text().splitlines(), 1)
        if ISSUE.search(line)
    ]
    assert found == [], "\n".join(found)
