"""The demo's report as one self-contained HTML page: inline CSS, no scripts, no external assets."""

from __future__ import annotations

from html import escape
from typing import Any

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #1b1f24; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; }
th, td { border: 1px solid #c9ced6; padding: 0.3em 0.6em; text-align: left; }
th { background: #eef1f5; }
td.received { background: #d3f2d8; color: #0b5d1e; }
td.sender { background: #e8eaee; color: #555d68; font-style: italic; }
td.refused { background: #fbd9d6; color: #8a1c12; }
td.missing { background: #fff0c2; color: #6b4d00; }
.verdict { display: inline-block; padding: 0.3em 0.8em; border-radius: 4px; font-weight: 600; }
.verdict.ok { background: #d3f2d8; color: #0b5d1e; }
.verdict.broken { background: #fbd9d6; color: #8a1c12; }
.ok { color: #0b5d1e; }
.fail { color: #8a1c12; font-weight: 600; }
code { font-family: ui-monospace, monospace; }
"""


def cell_class(cell: str) -> str:
    """The colour of a matrix cell: received, the sender itself, not received, or refused."""
    if cell == "received":
        return "received"
    if cell == "(sender)":
        return "sender"
    if cell == "not_received":
        return "missing"
    return "refused"


def _td(cell: str) -> str:
    words = escape(cell.replace("_", " "))
    return f'<td class="{cell_class(cell)}" data-reason="{escape(cell)}">{words}</td>'


def render(report: dict[str, Any]) -> str:
    """The whole page for a report made by ``Demo.report()``."""
    matrix: dict[str, dict[str, str]] = report["matrix"]
    partners = list(next(iter(matrix.values()))) if matrix else []
    labels = {p["key"]: p["label"] for p in report["published"]}
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>Coalition demo report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Coalition demo report</h1>",
    ]
    checks = report["checks"]
    met = sum(c["ok"] for c in checks)
    overall = "ok" if report["ok"] else "fail"
    out.append(
        f'<p id="outcome" class="{overall}">{met}/{len(checks)} expectations met, '
        f"{'OK' if report['ok'] else 'FAILED'} in {report['elapsed_s']:.1f} s</p>"
    )

    out.append("<h2>Who received what, and why not</h2>")
    out.append('<table id="matrix"><tr><th>message</th><th>label</th>')
    out.extend(f"<th>{escape(p)}</th>" for p in partners)
    out.append("</tr>")
    for key, row in matrix.items():
        out.append(f"<tr><th>{escape(key)}</th><td>{escape(labels.get(key, ''))}</td>")
        out.extend(_td(row[p]) for p in partners)
        out.append("</tr>")
    out.append("</table>")

    out.append("<h2>Refusals</h2>")
    out.append(
        '<table id="refusals"><tr><th>who</th><th>what</th><th>status</th><th>reason</th></tr>'
    )
    for p in report["published"]:
        if p["refused"]:
            out.append(
                f"<tr><td>{escape(p['sender'])}</td><td>publish {escape(p['key'])}</td>"
                f"<td>refused</td><td>{escape(p['refused'])}</td></tr>"
            )
    for r in report["rogue"]:
        status = "ACCEPTED" if r["accepted"] else f"{r['status']} {r['reason_code']}"
        out.append(
            f"<tr><td>rogue</td><td>{escape(r['attack'])}</td><td>{escape(status)}</td>"
            f"<td>{escape(str(r['reason']))}</td></tr>"
        )
    out.append("</table>")

    audit = report["audit"]
    out.append("<h2>Audit</h2>")
    if audit:
        verdict = "ok" if audit["ok"] else "broken"
        text = "VERIFIED" if audit["ok"] else "BROKEN"
        problem = f": {escape(audit['problem'])}" if audit.get("problem") else ""
        out.append(
            f'<p><span id="audit" class="verdict {verdict}">{text}</span> '
            f"{audit['entries']} entries hash-chained, {audit['checkpoints']} signed "
            f"checkpoints{problem}</p>"
        )
    else:
        out.append('<p><span id="audit" class="verdict broken">NOT CHECKED</span></p>')

    out.append('<h2>Expectations</h2><table id="checks"><tr><th>step</th><th>expectation</th>')
    out.append("<th>result</th><th>detail</th></tr>")
    for c in checks:
        mark = '<td class="ok">ok</td>' if c["ok"] else '<td class="fail">FAIL</td>'
        out.append(
            f"<tr><td>{escape(c['step'])}</td><td>{escape(c['expectation'])}</td>{mark}"
            f"<td>{escape(c['detail'])}</td></tr>"
        )
    out.append("</table></body></html>")
    return "\n".join(out) + "\n"
