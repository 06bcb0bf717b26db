"""Status lines on stderr: readable text, or one JSON object a line with --log-json.

Callers pass identifiers and counts only, never plaintext or keys.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

log = logging.getLogger("coalition.node")

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}


class _Formatter(logging.Formatter):
    def __init__(self, as_json: bool) -> None:
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        extra = {k: v for k, v in vars(record).items() if k not in _RESERVED}
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        ts += f".{int(record.msecs):03d}Z"
        if self.as_json:
            doc: dict[str, Any] = {"ts": ts, "level": record.levelname.lower()}
            doc["msg"] = record.getMessage()
            doc.update({k: _plain(v) for k, v in extra.items()})
            return json.dumps(doc)
        return f"{ts} {record.levelname.lower():7} {record.getMessage()}"


def _plain(v: Any) -> Any:
    return v if isinstance(v, int | float | bool | str) or v is None else str(v)


def setup_logging(*, as_json: bool, level: str = "info") -> None:
    """Send the node's log lines to stderr; quiet the libraries below it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(as_json))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    log.setLevel(level.upper())
