"""Structured logging: key=value lines, or one JSON object a line with --log-json.

Callers pass identifiers and counts only; never plaintext, keys or tokens.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None)))


class _Formatter(logging.Formatter):
    def __init__(self, as_json: bool) -> None:
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        extra = {k: v for k, v in vars(record).items() if k not in _RESERVED}
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        ts += f".{int(record.msecs):03d}Z"
        if self.as_json:
            doc = {"ts": ts, "level": record.levelname.lower(), "logger": record.name}
            doc["msg"] = record.getMessage()
            doc.update({k: _plain(v) for k, v in extra.items()})
            return json.dumps(doc, sort_keys=False)
        kv = " ".join(f"{k}={_plain(v)}" for k, v in extra.items())
        return f"{ts} {record.levelname.lower():5} {record.getMessage()}" + (f" {kv}" if kv else "")


def _plain(v: Any) -> Any:
    return v if isinstance(v, int | float | bool | str) or v is None else str(v)


def setup_logging(*, as_json: bool, level: str = "info") -> None:
    """Configure the root logger once, to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(as_json))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
