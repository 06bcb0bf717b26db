"""The SQLite registry's tables and the queries whose rows become protobuf values."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from coalition.v1 import policy_pb2

SCHEMA = """
CREATE TABLE IF NOT EXISTS partners (
  code TEXT PRIMARY KEY, signing_cert BLOB NOT NULL, registered_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS policy_versions (
  partner TEXT NOT NULL, version INTEGER NOT NULL, policy BLOB NOT NULL,
  changed_by TEXT NOT NULL, approved_by TEXT NOT NULL, changed_ms INTEGER NOT NULL,
  reason TEXT NOT NULL, diff TEXT NOT NULL, PRIMARY KEY (partner, version));
CREATE TABLE IF NOT EXISTS proposals (
  id TEXT PRIMARY KEY, partner TEXT NOT NULL, policy BLOB NOT NULL, base_version INTEGER NOT NULL,
  proposed_by TEXT NOT NULL, proposed_ms INTEGER NOT NULL, reason TEXT NOT NULL,
  state INTEGER NOT NULL, decided_by TEXT NOT NULL DEFAULT '', diff TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS key_bundles (
  partner TEXT NOT NULL, key_id TEXT NOT NULL, signed BLOB NOT NULL, registered_ms INTEGER NOT NULL,
  PRIMARY KEY (partner, key_id));
-- A rekey proposal's new signing certificate (proposals.id).
CREATE TABLE IF NOT EXISTS proposal_certs (proposal TEXT PRIMARY KEY, signing_cert BLOB NOT NULL);
-- Signing certificates operators replaced (a rekey proposal approved), oldest first.
CREATE TABLE IF NOT EXISTS previous_signing_certs (
  partner TEXT NOT NULL, signing_cert BLOB NOT NULL, replaced_ms INTEGER NOT NULL);
-- The audit entry of each change, written in the change's own transaction; the audit
-- drainer (broker.audit.drainer) appends it to the log and then deletes it.
CREATE TABLE IF NOT EXISTS audit_outbox (
  id INTEGER PRIMARY KEY AUTOINCREMENT, item TEXT NOT NULL, time_ms INTEGER NOT NULL);
"""

VERSIONS = (
    "SELECT version, policy, changed_by, approved_by, changed_ms, reason, diff "
    "FROM policy_versions WHERE partner=? ORDER BY version"
)
PROPOSALS = (
    "SELECT id, policy, base_version, proposed_by, proposed_ms, reason, state, decided_by, "
    "diff, (SELECT signing_cert FROM proposal_certs WHERE proposal=proposals.id) "
    "FROM proposals "
)


def versions(rows: list[Any]) -> list[policy_pb2.PolicyVersion]:
    """VERSIONS rows as PolicyVersion values."""
    return [
        policy_pb2.PolicyVersion(
            version=v,
            policy=policy_pb2.PartnerPolicy.FromString(p),
            changed_by=b,
            approved_by=a,
            changed_ms=t,
            reason=r,
            diff=json.loads(d),
        )
        for v, p, b, a, t, r, d in rows
    ]


def proposals(rows: list[Any]) -> list[tuple[policy_pb2.Proposal, int]]:
    """PROPOSALS rows as (Proposal, the version it was made against)."""
    return [
        (
            policy_pb2.Proposal(
                proposal_id=i,
                policy=policy_pb2.PartnerPolicy.FromString(p),
                proposed_by=by,
                proposed_ms=t,
                reason=r,
                state=policy_pb2.ProposalState.ValueType(s),
                decided_by=d,
                diff=json.loads(df),
                signing_cert=cert or b"",
            ),
            base,
        )
        for i, p, base, by, t, r, s, d, df, cert in rows
    ]


def previous_certs(db: sqlite3.Connection, code: str) -> list[bytes]:
    """partner code's replaced signing certificates, oldest first."""
    rows = db.execute(
        "SELECT signing_cert FROM previous_signing_certs WHERE partner=? ORDER BY rowid", (code,)
    )
    return [bytes(c) for (c,) in rows]


def replace_cert(db: sqlite3.Connection, code: str, old: bytes, new: bytes, now_ms: int) -> None:
    """A rekey, inside the approval's transaction: the old certificate is kept as an earlier
    one and the key bundles signed under it are dropped (deny by default: nobody seals to
    the partner until it registers a bundle signed under the new key)."""
    db.execute("INSERT INTO previous_signing_certs VALUES (?,?,?)", (code, old, now_ms))
    db.execute("UPDATE partners SET signing_cert=? WHERE code=?", (new, code))
    db.execute("DELETE FROM key_bundles WHERE partner=?", (code,))
