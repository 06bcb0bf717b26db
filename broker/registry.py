"""Durable partner registry: signing certificates, versioned policies, proposals, key bundles.

Writes are rare (operator actions, key registration), so this uses one SQLite
connection guarded by a lock and run in a thread. The current policy of each
partner is cached in memory because every delivery decision reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from broker import registry_sql as sql
from broker.audit.items import AuditItem, encode, with_detail
from broker.errors import Exhausted
from broker.registry_types import ChangeCallback, ChangeKind, RegistryChange, new_proposal, tell
from broker.registry_types import PartnerRecord as PartnerRecord
from broker.registry_types import PartnerRegistry as PartnerRegistry
from broker.registry_types import StaleVersion as StaleVersion
from broker.store.base import OutboxRow
from broker.store.writer import is_disk_full
from coalition.policy import PartnerPolicy, PartnerStatus, policy_from_proto, policy_to_proto
from coalition.v1 import directory_pb2, policy_pb2


class Registry:
    """Partners, their policy history and pending proposals, in SQLite."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(sql.SCHEMA)
        self._lock = threading.Lock()
        self._cache: dict[str, PartnerRecord] = {}
        self._callbacks: list[ChangeCallback] = []
        self._load()

    def _load(self) -> None:
        for code, cert in self._db.execute("SELECT code, signing_cert FROM partners"):
            row = self._db.execute(
                "SELECT version, policy FROM policy_versions WHERE partner=? "
                "ORDER BY version DESC LIMIT 1",
                (code,),
            ).fetchone()
            pol = policy_pb2.PartnerPolicy.FromString(row[1])
            rec = PartnerRecord(code, cert, policy_from_proto(pol), row[0])
            b = self._db.execute(
                "SELECT key_id, signed FROM key_bundles WHERE partner=? "
                "ORDER BY registered_ms DESC, rowid DESC LIMIT 1",
                (code,),
            ).fetchone()
            if b:
                rec.key_id = b[0]
                rec.bundle = directory_pb2.SignedKeyBundle.FromString(b[1])
            rec.previous_certs = sql.previous_certs(self._db, code)
            self._cache[code] = rec

    # -- reads (memory) -------------------------------------------------------------------
    def get(self, code: str) -> PartnerRecord | None:
        """The cached record of a partner, or None if it was never registered."""
        return self._cache.get(code)

    def all(self) -> list[PartnerRecord]:
        return sorted(self._cache.values(), key=lambda r: r.code)

    def on_change(self, callback: ChangeCallback) -> None:
        """Call callback after each committed change (all made through this object)."""
        self._callbacks.append(callback)

    def _changed(self, kind: ChangeKind, code: str) -> None:
        tell(self._callbacks, RegistryChange(kind, code, self._cache.get(code), True))

    # -- writes ---------------------------------------------------------------------------
    async def register(
        self,
        code: str,
        signing_cert: bytes,
        policy: PartnerPolicy,
        *,
        actor: str,
        reason: str,
        now_ms: int,
        audit: AuditItem | None = None,
    ) -> policy_pb2.PolicyVersion:
        """Register a new partner with its first (unprivileged) policy version.

        Every write takes the change's audit entry (if any) into its own transaction, in
        the audit outbox (see read_outbox).
        """
        pv = await asyncio.to_thread(
            self._register, code, signing_cert, policy, actor, reason, now_ms, audit
        )
        self._changed("policy", code)
        return pv

    @contextmanager
    def _transaction(
        self, audit: AuditItem | list[AuditItem] | None, now_ms: int
    ) -> Iterator[None]:
        """One transaction holding the change and its audit entries (the caller holds the
        lock)."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            yield
            for item in [audit] if isinstance(audit, AuditItem) else audit or []:
                self._db.execute(
                    "INSERT INTO audit_outbox (item, time_ms) VALUES (?, ?)",
                    (encode(item), now_ms),
                )
            self._db.execute("COMMIT")
        except BaseException as exc:
            # SQLite rolls a transaction back by itself on some errors (SQLITE_FULL among
            # them, also when COMMIT fails): a second ROLLBACK would fail with "no
            # transaction is active" and hide the cause.
            if self._db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            if is_disk_full(exc):
                raise _disk_full(exc) from exc
            raise

    def _register(
        self,
        code: str,
        cert: bytes,
        policy: PartnerPolicy,
        actor: str,
        reason: str,
        now_ms: int,
        audit: AuditItem | None,
    ) -> policy_pb2.PolicyVersion:
        with self._lock:
            with self._transaction(audit, now_ms):
                self._db.execute(
                    "INSERT INTO partners(code, signing_cert, registered_ms) VALUES (?,?,?)",
                    (code, cert, now_ms),
                )
                pv = self._insert_version(policy, 1, actor, "", reason, ["registered"], now_ms)
            self._cache[code] = PartnerRecord(code, cert, policy, 1)
            return pv

    def _insert_version(
        self,
        policy: PartnerPolicy,
        version: int,
        by: str,
        approved: str,
        reason: str,
        diff: list[str],
        now_ms: int,
    ) -> policy_pb2.PolicyVersion:
        pb = policy_to_proto(policy)
        self._db.execute(
            "INSERT INTO policy_versions VALUES (?,?,?,?,?,?,?,?)",
            (
                policy.partner,
                version,
                pb.SerializeToString(),
                by,
                approved,
                now_ms,
                reason,
                json.dumps(diff),
            ),
        )
        return policy_pb2.PolicyVersion(
            version=version,
            policy=pb,
            changed_by=by,
            approved_by=approved,
            changed_ms=now_ms,
            reason=reason,
            diff=diff,
        )

    async def apply(
        self,
        policy: PartnerPolicy,
        *,
        changed_by: str,
        approved_by: str,
        reason: str,
        diff: list[str],
        now_ms: int,
        expected_version: int = 0,
        audit: Callable[[int], AuditItem] | None = None,
    ) -> policy_pb2.PolicyVersion:
        """Record a new policy version; raises StaleVersion if expected_version is not current.

        audit makes the change's audit entry from the new version number.
        """

        def run() -> policy_pb2.PolicyVersion:
            with self._lock:
                rec = self._cache[policy.partner]
                if expected_version and expected_version != rec.version:
                    raise StaleVersion(rec.version)
                version = rec.version + 1
                with self._transaction(audit(version) if audit else None, now_ms):
                    pv = self._insert_version(
                        policy, version, changed_by, approved_by, reason, diff, now_ms
                    )
                rec.policy = policy
                rec.version = version
                return pv

        pv = await asyncio.to_thread(run)
        self._changed("policy", policy.partner)
        return pv

    async def history(self, code: str) -> list[policy_pb2.PolicyVersion]:
        def run() -> list[policy_pb2.PolicyVersion]:
            with self._lock:
                return sql.versions(self._db.execute(sql.VERSIONS, (code,)).fetchall())

        return await asyncio.to_thread(run)

    async def propose(
        self,
        policy: PartnerPolicy,
        *,
        base_version: int,
        proposed_by: str,
        reason: str,
        diff: list[str],
        now_ms: int,
        audit: Callable[[str], AuditItem] | None = None,
        signing_cert: bytes = b"",
    ) -> policy_pb2.Proposal:
        """Record a pending proposal for a privilege-raising change (audit: the entry,
        made from the new proposal's id; signing_cert: a rekey's new certificate)."""
        prop = new_proposal(
            policy,
            proposed_by=proposed_by,
            reason=reason,
            diff=diff,
            now_ms=now_ms,
            signing_cert=signing_cert,
        )
        pid = prop.proposal_id

        def run() -> None:
            with self._lock, self._transaction(audit(pid) if audit else None, now_ms):
                self._db.execute(
                    "INSERT INTO proposals VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (
                        pid,
                        policy.partner,
                        prop.policy.SerializeToString(),
                        base_version,
                        proposed_by,
                        now_ms,
                        reason,
                        policy_pb2.PROPOSAL_PENDING,
                        "",
                        json.dumps(diff),
                    ),
                )
                if signing_cert:
                    self._db.execute("INSERT INTO proposal_certs VALUES (?,?)", (pid, signing_cert))

        await asyncio.to_thread(run)
        self._changed("proposal", policy.partner)
        return prop

    async def proposal(self, pid: str) -> tuple[policy_pb2.Proposal, int] | None:
        """A proposal and the policy version it was made against, or None."""
        rows = await self._proposals("WHERE id=?", (pid,))
        return rows[0] if rows else None

    async def proposals(self, *, include_decided: bool) -> list[policy_pb2.Proposal]:
        where = "" if include_decided else f"WHERE state={policy_pb2.PROPOSAL_PENDING}"
        return [p for p, _ in await self._proposals(where + " ORDER BY proposed_ms", ())]

    async def _proposals(
        self, where: str, args: tuple[object, ...]
    ) -> list[tuple[policy_pb2.Proposal, int]]:
        def run() -> list[tuple[policy_pb2.Proposal, int]]:
            with self._lock:
                return sql.proposals(self._db.execute(sql.PROPOSALS + where, args).fetchall())

        return await asyncio.to_thread(run)

    async def decide_proposal(
        self,
        pid: str,
        *,
        state: int,
        decided_by: str,
        now_ms: int = 0,
        audit: AuditItem | None = None,
    ) -> bool:
        """Move a pending proposal to approved/rejected; False if it was no longer pending
        (and then nothing is written, audit entry included)."""

        def run() -> str:
            with self._lock, self._transaction(audit, now_ms):
                rows = self._db.execute(
                    "UPDATE proposals SET state=?, decided_by=? WHERE id=? AND state=? "
                    "RETURNING partner",
                    (state, decided_by, pid, policy_pb2.PROPOSAL_PENDING),
                ).fetchall()
                if len(rows) != 1:
                    raise _NothingToDo
            return str(rows[0][0])

        try:
            self._changed("proposal", await asyncio.to_thread(run))
        except _NothingToDo:
            return False
        return True

    async def approve(
        self,
        pid: str,
        *,
        decided_by: str,
        now_ms: int,
        audit: Callable[[int], list[AuditItem]] | None = None,
    ) -> policy_pb2.PolicyVersion | None:
        """Approve a pending proposal and apply its policy as the next version, in one
        transaction with the entries audit makes from the new version number. None if
        the proposal is unknown or no longer pending; StaleVersion if the policy is no
        longer at the version it was made against. Either way nothing is written."""

        def run() -> tuple[str, policy_pb2.PolicyVersion] | None:
            with self._lock:
                rows = sql.proposals(
                    self._db.execute(sql.PROPOSALS + "WHERE id=?", (pid,)).fetchall()
                )
                if not rows or rows[0][0].state != policy_pb2.PROPOSAL_PENDING:
                    return None
                prop, base = rows[0]
                policy = policy_from_proto(prop.policy)
                rec = self._cache[policy.partner]
                if rec.version != base:
                    raise StaleVersion(rec.version)
                v = base + 1
                with self._transaction(audit(v) if audit else None, now_ms):
                    self._db.execute(
                        "UPDATE proposals SET state=?, decided_by=? WHERE id=?",
                        (policy_pb2.PROPOSAL_APPROVED, decided_by, pid),
                    )
                    pv = self._insert_version(
                        policy, v, prop.proposed_by, decided_by, prop.reason, [*prop.diff], now_ms
                    )
                    if prop.signing_cert:
                        sql.replace_cert(
                            self._db, rec.code, rec.signing_cert, prop.signing_cert, now_ms
                        )
                if prop.signing_cert:
                    rec.previous_certs.append(rec.signing_cert)
                    rec.signing_cert, rec.bundle, rec.key_id = prop.signing_cert, None, ""
                rec.policy, rec.version = policy, v
                return policy.partner, pv

        done = await asyncio.to_thread(run)
        if done is None:
            return None
        self._changed("proposal", done[0])
        self._changed("policy", done[0])
        return done[1]

    async def set_bundle(
        self,
        code: str,
        key_id: str,
        signed: directory_pb2.SignedKeyBundle,
        now_ms: int,
        audit: AuditItem | None = None,
    ) -> None:
        """Make signed the partner's current key bundle (older ones stay on record)."""

        def run() -> None:
            with self._lock:
                with self._transaction(audit, now_ms):
                    self._db.execute(
                        "INSERT OR REPLACE INTO key_bundles VALUES (?,?,?,?)",
                        (code, key_id, signed.SerializeToString(), now_ms),
                    )
                rec = self._cache[code]
                rec.bundle = signed
                rec.key_id = key_id

        await asyncio.to_thread(run)
        self._changed("keys", code)

    # -- the audit outbox (an OutboxSource of broker.audit.drainer) ------------------------
    async def read_outbox(self, after: int, limit: int) -> list[OutboxRow]:
        """Audit records of committed changes with outbox id above after, oldest first;
        each entry's detail carries ``ref`` (``registry:<outbox id>``)."""

        def run() -> list[tuple[int, str, int]]:
            with self._lock:
                return self._db.execute(
                    "SELECT id, item, time_ms FROM audit_outbox WHERE id > ? ORDER BY id LIMIT ?",
                    (after, limit),
                ).fetchall()

        out = []
        for i, text, t in await asyncio.to_thread(run):
            out.append(OutboxRow(int(i), int(t), with_detail(text, ref=f"registry:{i}")))
        return out

    async def forget_outbox(self, through: int) -> None:
        """The audit log holds every record up to through: forget them."""

        def run() -> None:
            with self._lock:
                try:
                    self._db.execute("DELETE FROM audit_outbox WHERE id <= ?", (through,))
                except sqlite3.Error as exc:
                    if is_disk_full(exc):
                        raise _disk_full(exc) from exc
                    raise

        await asyncio.to_thread(run)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _disk_full(exc: BaseException) -> Exhausted:
    """A registry write that failed because the broker's disk (or the file) is full."""
    return Exhausted(
        "disk_full",
        "the broker's disk is full; registry changes (key bundles, policies, admissions) "
        f"cannot be recorded until an operator frees space ({exc})",
    )


class _NothingToDo(Exception):
    """Roll the transaction back: the update matched nothing."""


def pending_policy(code: str) -> PartnerPolicy:
    """The policy of a registered but not yet admitted partner: no privileges at all."""
    return PartnerPolicy(partner=code, status=PartnerStatus.PENDING)
