"""Structured logging for the broker: key=value lines, or JSON lines with --log-json."""

from __future__ import annotations

import logging
import sys

from coalition.logfmt import StructuredFormatter


def setup_logging(*, as_json: bool, level: str = "info") -> None:
    """Configure the root logger once, to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(StructuredFormatter(as_json))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
