"""The multi-nation scenario as an integration test: the real `coalition-demo` command
(broker and five node daemons as processes), checked through its JSON and HTML reports."""

from __future__ import annotations

import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Run the demo once, writing both reports; the directory and the printed output."""
    d = tmp_path_factory.mktemp("demo")
    # A generous delivery deadline: CI machines are shared; the demo's default is 1 s.
    reports = ("--report", str(d / "report.json"), "--report", str(d / "report.html"))
    proc = subprocess.run(
        [sys.executable, "-m", "clients.demo", "--deadline-ms", "10s", *reports],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    return d, proc.stdout


@pytest.fixture(scope="module")
def report(demo: tuple[Path, str]) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((demo[0] / "report.json").read_text())
    return doc


def test_every_expectation_held(report: dict[str, Any]) -> None:
    assert report["ok"] is True
    assert len(report["checks"]) >= 20
    assert all(c["ok"] for c in report["checks"])


def test_every_message_was_envelope_v2(report: dict[str, Any]) -> None:
    """The development PKI certifies hybrid keys, so every node seals v2."""
    sent = [p for p in report["published"] if p["message_id"]]
    assert sent and {p["envelope"] for p in sent} == {"v2"}


def test_who_received_what(report: dict[str, Any]) -> None:
    m = report["matrix"]
    # KOR was not admitted yet; afterwards it receives at once.
    assert m["pre-admission"]["KOR"] == "not_admitted"
    assert m["welcome"]["KOR"] == "received"
    # KOR's summary reaches every partner the label releases to.
    assert {m["kor-summary"][c] for c in ("USA", "GBR", "UKR", "NATO")} == {"received"}
    # The SIGINT compartment: only GBR holds it; the others are refused with the reason.
    assert m["usa-sigint"]["GBR"] == "received"
    assert {m["usa-sigint"][c] for c in ("KOR", "UKR", "NATO")} == {"missing_category"}
    # The suspended partner receives nothing after suspension.
    assert m["after-suspension"]["GBR"] == "suspended"
    assert m["after-suspension"]["USA"] == "(sender)"
    # Every cell says received, sender, or a reason; never a vague "not sealed for".
    cells = {c for row in m.values() for c in row.values()}
    assert "not sealed for" not in cells and "not_received" not in cells, cells


def test_printed_table_gives_reasons(demo: tuple[Path, str]) -> None:
    table = demo[1].split("Who received what (or why not):", 1)[1]
    pre = next(line for line in table.splitlines() if line.strip().startswith("pre-admission"))
    assert "not admitted" in pre and "not sealed for" not in table
    assert "missing category" in table and "suspended" in table


class _Page(HTMLParser):
    """The matrix cells (row, column) -> (class, reason, text), the audit verdict, and
    every URL-bearing attribute (there must be none: the page is self-contained)."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[tuple[str, str], tuple[str, str, str]] = {}
        self.audit: tuple[str, str] = ("", "")
        self.external: list[str] = []
        self.styles = 0
        self._table = ""
        self._heads: list[str] = []
        self._row: list[str] = []
        self._rows = 0
        self._cell: dict[str, str] | None = None
        self._text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.external += [v for k, v in a.items() if k in ("src", "href") or "url(" in v]
        if tag in ("link", "script", "img", "iframe"):
            self.external.append(tag)
        if tag == "style":
            self.styles += 1
        if tag == "table":
            self._table, self._heads, self._rows = a.get("id", ""), [], 0
        if tag == "tr":
            self._row = []
            self._rows += 1
        if tag in ("td", "th") or (tag == "span" and a.get("id") == "audit"):
            self._cell, self._text = a, ""

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._text += data
        if "url(" in data or "@import" in data:
            self.external.append(data)

    def handle_endtag(self, tag: str) -> None:
        if self._cell is None or tag not in ("td", "th", "span"):
            return
        a, text, self._cell = self._cell, self._text.strip(), None
        if tag == "span":
            self.audit = (a.get("class", ""), text)
        elif self._table == "matrix" and self._rows == 1:
            self._heads.append(text)
        elif self._table == "matrix":
            self._row.append(text)
            if tag == "td" and "data-reason" in a:
                col = self._heads[len(self._row) - 1]
                self.cells[(self._row[0], col)] = (a.get("class", ""), a["data-reason"], text)


def test_html_report(demo: tuple[Path, str], report: dict[str, Any]) -> None:
    page = _Page()
    page.feed((demo[0] / "report.html").read_text(encoding="utf-8"))
    assert page.styles == 1 and page.external == [], page.external
    # The matrix in the page is the report's, cell by cell, coloured by outcome.
    for key, row in report["matrix"].items():
        for code, cell in row.items():
            assert page.cells[(key, code)][1] == cell, (key, code)
    assert page.cells[("kor-summary", "USA")] == ("received", "received", "received")
    assert page.cells[("kor-summary", "KOR")][0] == "sender"
    assert page.cells[("pre-admission", "KOR")] == ("refused", "not_admitted", "not admitted")
    assert page.cells[("usa-sigint", "UKR")] == ("refused", "missing_category", "missing category")
    assert page.cells[("after-suspension", "GBR")] == ("refused", "suspended", "suspended")
    assert page.audit == ("verdict ok", "VERIFIED")


def test_rogue_was_refused(report: dict[str, Any]) -> None:
    codes = {r["attack"]: (r["accepted"], r["reason_code"]) for r in report["rogue"]}
    assert codes["impersonation"] == (False, "sender_mismatch")
    assert codes["label downgrade"] == (False, "bad_signature")
    assert codes["replay"] == (False, "replay")


def test_audit_verified(report: dict[str, Any]) -> None:
    assert report["audit"]["ok"] is True
    assert report["audit"]["checkpoints"] >= 1
