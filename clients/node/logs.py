"""Status lines on stderr: readable text, or one JSON object a line with --log-json.

Callers pass identifiers and counts only, never plaintext or keys.
"""

from __future__ import annotations

import logging
import sys

from coalition.logfmt import StructuredFormatter

log = logging.getLogger("coalition.node")


def setup_logging(*, as_json: bool, level: str = "info") -> None:
    """Send the node's log lines to stderr; quiet the libraries below it."""
    handler = logging.StreamHandler(sys.stderr)
    # Status lines are sentences already; their extra fields show only in JSON.
    handler.setFormatter(StructuredFormatter(as_json, show_extra=False))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    log.setLevel(level.upper())
