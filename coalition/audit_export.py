"""Verify an exported audit log offline: no broker, only the coalition CA certificate.

The export (``coalition-admin audit export``) is JSON lines, one record each:

- ``{"record": "entry", "seq": ..., "time_ms": ..., "kind": ..., "actor": ..., "partner": ...,
  "message_id": ..., "decision": ..., "detail_json": ..., "prev_hash": HEX, "hash": HEX}``
- ``{"record": "checkpoint", "seq": ..., "hash": HEX, "time_ms": ..., "signature": HEX}``
- ``{"record": "audit_certificate", "certificate_pem": PEM}``: the broker's audit
  certificate, written once after the last entry by brokers that send it (older exports
  lack it; pass the certificate separately, ``pki/broker/audit.crt``). A chain written by
  several brokers (a cluster) carries one such record per broker whose key signed
  checkpoints; a checkpoint verifies under any of them.

Other keys (``time_utc``, ...) are ignored. Trust: each audit certificate must be issued
by the CA, name a broker identity and hold an Ed25519 key; it must be valid when the
newest checkpoint that verifies under its key was signed (the current time if none does),
so an export still verifies after the certificate has expired. Pure: no I/O, no clock.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, replace

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from coalition import ed25519
from coalition.audit_chain import ChainVerifier, VerifyResult, checkpoint_body
from coalition.identity import IdentityError, IdentityKind, identity_from_cert, verify_audit_cert
from coalition.v1 import audit_pb2

__all__ = ["ExportError", "ExportVerdict", "verify_export"]

Record = audit_pb2.AuditEntry | audit_pb2.AuditCheckpoint


class ExportError(ValueError):
    """The export carries no audit certificate and none was given, or it is not usable."""


@dataclass(frozen=True)
class ExportVerdict:
    """The chain verdict, who signed it (brokers' names, comma-separated when several),
    and how many entries no checkpoint covers."""

    result: VerifyResult
    broker: str = ""
    # Entries after the newest signed checkpoint: chained, but not yet signed.
    unsigned_tail: int = 0


def _bytes(obj: dict[str, object], key: str) -> bytes:
    value = obj.get(key, "")
    if not isinstance(value, str):
        raise ValueError(f"{key} is not a hex string")
    return bytes.fromhex(value)


def _int(obj: dict[str, object], key: str) -> int:
    value = obj.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{key} is not a non-negative integer")
    return value


def _str(obj: dict[str, object], key: str) -> str:
    value = obj.get(key, "")
    if not isinstance(value, str):
        raise ValueError(f"{key} is not a string")
    return value


def _record(obj: dict[str, object]) -> Record:
    if obj.get("record") == "entry":
        return audit_pb2.AuditEntry(
            seq=_int(obj, "seq"),
            time_ms=_int(obj, "time_ms"),
            kind=_str(obj, "kind"),
            actor=_str(obj, "actor"),
            partner=_str(obj, "partner"),
            message_id=_str(obj, "message_id"),
            decision=_str(obj, "decision"),
            detail_json=_str(obj, "detail_json"),
            prev_hash=_bytes(obj, "prev_hash"),
            hash=_bytes(obj, "hash"),
        )
    return audit_pb2.AuditCheckpoint(
        seq=_int(obj, "seq"),
        hash=_bytes(obj, "hash"),
        time_ms=_int(obj, "time_ms"),
        signature=_bytes(obj, "signature"),
    )


def _parse(
    lines: Iterable[str],
) -> tuple[list[Record], list[str], tuple[int, str] | None]:
    """Records, certificate PEMs, and the first unreadable line (number, why) if any."""
    records: list[Record] = []
    certs: list[str] = []
    unreadable: tuple[int, str] | None = None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
            kind = obj.get("record")
            if kind == "audit_certificate":
                certs.append(_str(obj, "certificate_pem"))
            elif unreadable is not None:
                continue  # past a bad line only the certificate is still looked for
            elif kind in ("entry", "checkpoint"):
                records.append(_record(obj))
            else:
                raise ValueError(f"unknown record {kind!r}")
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            if unreadable is None:
                unreadable = (n, str(exc))
    return records, certs, unreadable


def _audit_key(pem: str) -> tuple[x509.Certificate, Ed25519PublicKey, str]:
    try:
        cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
        identity = identity_from_cert(cert)
    except (ValueError, IdentityError) as exc:
        raise ExportError(f"the audit certificate is not usable: {exc}") from None
    if identity.kind is not IdentityKind.BROKER:
        raise ExportError(f"the audit certificate names {identity.uri}, not a broker")
    key = cert.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise ExportError("the audit certificate does not hold an Ed25519 key")
    return cert, key, identity.name


def _signed_times(records: list[Record], key: Ed25519PublicKey) -> list[tuple[int, int]]:
    """(seq, time_ms) of each checkpoint whose signature verifies under key."""
    out = []
    for r in records:
        if isinstance(r, audit_pb2.AuditCheckpoint):
            try:
                ed25519.verify(key, r.signature, checkpoint_body(r.seq, r.hash, r.time_ms))
            except InvalidSignature:
                continue
            out.append((r.seq, r.time_ms))
    return out


def verify_export(
    lines: Iterable[str],
    ca: x509.Certificate,
    now_ms: int,
    audit_cert_pem: str | None = None,
) -> ExportVerdict:
    """Verify an export's hash chain and signed checkpoints under the CA-certified audit key.

    ``audit_cert_pem`` is used when the export carries no certificate (older exports).
    Raises ExportError when no trustworthy audit key can be found; a broken or unreadable
    log is a verdict (``result.ok`` false, ``first_broken_seq`` naming the first bad entry).
    """
    records, certs, unreadable = _parse(lines)
    pems = list(dict.fromkeys(certs)) or ([audit_cert_pem] if audit_cert_pem is not None else [])
    if not pems:
        raise ExportError(
            "the export carries no audit certificate: pass the broker's audit.crt as well"
        )
    keys, names = [], []
    signed: list[tuple[int, int]] = []
    for pem in pems:
        cert, key, broker = _audit_key(pem)
        signed_by = _signed_times(records, key)
        at_ms = max((t for _, t in signed_by), default=now_ms)
        der = cert.public_bytes(serialization.Encoding.DER)
        try:
            verify_audit_cert(der, ca, broker, at_ms)
        except IdentityError as exc:
            raise ExportError(f"the audit certificate is not trusted: {exc}") from None
        keys.append(key)
        names.append(broker)
        signed += signed_by
    broker = ", ".join(dict.fromkeys(names))
    verifier = ChainVerifier(keys)
    verifier.feed(records)
    result = verifier.result()
    last_seq = max((r.seq for r in records if isinstance(r, audit_pb2.AuditEntry)), default=0)
    if result.ok and unreadable is not None:
        n, why = unreadable
        result = replace(
            result,
            ok=False,
            first_broken_seq=last_seq + 1,
            problem=f"line {n}: not an audit record ({why}); nothing after it was checked",
        )
    signed_to = max((s for s, _ in signed), default=0)
    return ExportVerdict(result, broker, max(0, last_seq - signed_to))
