"""Revoked certificate serial numbers, as operators write them, compared as numbers.

Tools spell a serial differently: ``openssl x509 -serial`` prints ``serial=011D49…``
(uppercase, padded to whole bytes, so often a leading zero), others put colons or spaces
between the bytes or a ``0x`` in front, and the broker's own key ids are lowercase hex
without padding. All of these name the same number, and a revocation must not depend on
which spelling was pasted, so every entry is parsed to an integer once, at load.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# RFC 5280: a serial is at most 20 octets.
MAX_SERIAL_BITS = 160
_PREFIX = re.compile(r"^(serial\s*=\s*)?(0x)?", re.IGNORECASE)
_SEPARATORS = re.compile(r"[:\s]")
_HEX = re.compile(r"^[0-9a-fA-F]+$")


def parse_serial(text: str) -> int:
    """The certificate serial number text names. Raises ValueError saying what is wrong.

    Accepts hexadecimal in any case, with an optional ``serial=`` (as ``openssl x509
    -serial`` prints it) and ``0x``, leading zeros, and colons or spaces between digits.
    """
    body = _SEPARATORS.sub("", _PREFIX.sub("", text.strip(), count=1))
    if not body:
        raise ValueError(f"{text!r} holds no hexadecimal digits")
    if not _HEX.match(body):
        raise ValueError(
            f"{text!r} is not hexadecimal (expected e.g. 011D49AF, 01:1d:49:af or 0x11d49af)"
        )
    value = int(body, 16)
    if value.bit_length() > MAX_SERIAL_BITS:
        raise ValueError(f"{text!r} is longer than a certificate serial (20 bytes)")
    return value


def parse_serials(entries: Iterable[str]) -> frozenset[int]:
    """Every entry parsed (see parse_serial). Raises ValueError naming the first bad one."""
    return frozenset(parse_serial(e) for e in entries)


def serial_hex(serial: int) -> str:
    """How the broker shows a serial: lowercase hex, no padding (as signing key ids)."""
    return format(serial, "x")
