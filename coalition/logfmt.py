"""One log line format for every Coalition process: readable text, or one JSON object a
line. Callers pass identifiers and counts as ``extra``; never plaintext, keys or tokens.

Values often come from the network (message ids, topics, reasons quoting a header), so
every one is escaped: a record is always exactly one line, and no control character
(newline, carriage return, ANSI escape, ...) reaches the log raw, so nobody can forge a
line or rewrite a terminal through what they send.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}

# C0 controls, DEL, C1 controls, and the Unicode line and paragraph separators (some
# viewers break lines there too).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# What makes a text-mode value need quotes: it could be read as two fields or as empty.
_NEEDS_QUOTES = re.compile(r'[\s="]')


def plain(v: Any) -> Any:
    """A JSON-safe scalar for v (str() for anything else)."""
    return v if isinstance(v, int | float | bool | str) or v is None else str(v)


def _escape_char(m: re.Match[str]) -> str:
    c = m.group()
    named = _NAMED.get(c)
    if named is not None:
        return named
    return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"


def escape(s: str) -> str:
    """s with backslashes doubled and every control character written as an escape."""
    return _UNSAFE.sub(_escape_char, s.replace("\\", "\\\\"))


def text_value(v: Any) -> str:
    """v as one key=value field value: escaped, and quoted when it holds a space,
    ``=`` or ``"`` or is empty."""
    s = escape(str(plain(v)))
    if not s or _NEEDS_QUOTES.search(s):
        return '"' + s.replace('"', '\\"') + '"'
    return s


class StructuredFormatter(logging.Formatter):
    """``2026-11-27T10:00:00.000Z info  msg key=value`` or ``{"ts":..., "msg":...}``."""

    def __init__(self, as_json: bool, *, show_extra: bool = True) -> None:
        super().__init__()
        self.as_json = as_json
        self.show_extra = show_extra

    def format(self, record: logging.LogRecord) -> str:
        extra = {k: v for k, v in vars(record).items() if k not in _RESERVED}
        if record.exc_info:
            # A traceback is many lines and quotes exception messages: one escaped field.
            extra["exc"] = self.formatException(record.exc_info)
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        ts += f".{int(record.msecs):03d}Z"
        if self.as_json:
            doc: dict[str, Any] = {"ts": ts, "level": record.levelname.lower()}
            doc["logger"] = record.name
            doc["msg"] = record.getMessage()
            doc.update({k: plain(v) for k, v in extra.items()})
            # json.dumps escapes C0 controls and (ensure_ascii) everything above ASCII;
            # DEL is the one control it leaves raw.
            return json.dumps(doc).replace("\x7f", "\\u007f")
        line = f"{ts} {record.levelname.lower():7} {escape(record.getMessage())}"
        if self.show_extra and extra:
            line += " " + " ".join(f"{escape(k)}={text_value(v)}" for k, v in extra.items())
        return line
