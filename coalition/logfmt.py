"""One log line format for every Coalition process: readable text, or one JSON object a
line. Callers pass identifiers and counts as ``extra``; never plaintext, keys or tokens."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}


def plain(v: Any) -> Any:
    """A JSON-safe scalar for v (str() for anything else)."""
    return v if isinstance(v, int | float | bool | str) or v is None else str(v)


class StructuredFormatter(logging.Formatter):
    """``2026-11-27T10:00:00.000Z info  msg key=value`` or ``{"ts":..., "msg":...}``."""

    def __init__(self, as_json: bool, *, show_extra: bool = True) -> None:
        super().__init__()
        self.as_json = as_json
        self.show_extra = show_extra

    def format(self, record: logging.LogRecord) -> str:
        extra = {k: v for k, v in vars(record).items() if k not in _RESERVED}
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        ts += f".{int(record.msecs):03d}Z"
        if self.as_json:
            doc: dict[str, Any] = {"ts": ts, "level": record.levelname.lower()}
            doc["logger"] = record.name
            doc["msg"] = record.getMessage()
            doc.update({k: plain(v) for k, v in extra.items()})
            return json.dumps(doc)
        line = f"{ts} {record.levelname.lower():7} {record.getMessage()}"
        if self.show_extra and extra:
            line += " " + " ".join(f"{k}={plain(v)}" for k, v in extra.items())
        return line
