"""The SQLite registry's tables and the queries whose rows become protobuf values."""

from __future__ import annotations

import json
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
    "diff FROM proposals "
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
            ),
            base,
        )
        for i, p, base, by, t, r, s, d, df in rows
    ]
