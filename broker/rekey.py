"""Replacing an admitted partner's signing certificate in place (a rekey), e.g. to move a
v1 partner to envelope v2 with a certificate that certifies an ML-DSA-65 key too.

A rekey is a proposal of the admin core's (``AdminCore``), made and decided through the
same registry calls, audit trail and two-person rule as a privilege-raising policy
change: one operator proposes the new certificate, another approves it. The proposal
carries the certificate (``Proposal.signing_cert``) and the partner's policy unchanged;
approving it records the next policy version (its diff names both serials) and, in the
same commit, makes the certificate current, keeps the one it replaces as an earlier
certificate (``PartnerRecord.previous_certs``: directory entries carry them so nodes
still open what is stored under them) and drops the key bundle signed under the old key.
"""

from __future__ import annotations

from collections.abc import Collection

from cryptography import x509

from broker.admin import AdminCore
from broker.admin_types import PolicyChange
from broker.audit import AuditItem
from broker.errors import InvalidInput, Precondition
from coalition.identity import IdentityError, certified_hybrid_key, verify_signing_cert
from coalition.policy import PartnerStatus


async def propose_rekey(
    core: AdminCore,
    operator: str,
    partner: str,
    signing_cert: bytes,
    reason: str,
    *,
    revoked: Collection[int] = (),
) -> PolicyChange:
    """Propose signing_cert as partner's signing certificate; a second operator approves.

    Refused: NotFound ``unknown_partner``; Precondition ``not_admitted`` (a partner not
    yet admitted is admitted again instead); InvalidInput ``bad_signing_cert`` (not
    issued by the CA to partner, not valid now, revoked, the current or an earlier
    certificate of partner, or one without the ML-DSA-65 key the current one certifies:
    a rekey never moves a partner back to v1).
    """
    rec = core.record(partner)
    if rec.policy.status is PartnerStatus.PENDING:
        raise Precondition(
            "not_admitted",
            f"{partner} is not admitted yet; admit it with its current signing certificate",
        )
    now = core.clock()
    try:
        verify_signing_cert(signing_cert, core.ca_cert, partner, now)
        new = x509.load_der_x509_certificate(signing_cert)
    except (IdentityError, ValueError) as exc:
        raise InvalidInput("bad_signing_cert", f"signing certificate refused: {exc}") from exc
    old = x509.load_der_x509_certificate(rec.signing_cert)
    if new.serial_number in revoked:
        raise InvalidInput(
            "bad_signing_cert",
            f"signing certificate refused: serial {new.serial_number:x} is revoked",
        )
    if signing_cert == rec.signing_cert or signing_cert in rec.previous_certs:
        raise InvalidInput(
            "bad_signing_cert",
            f"signing certificate refused: it is {partner}'s current or an earlier one; "
            "a rekey takes a newly issued certificate",
        )
    hybrid = certified_hybrid_key(new) is not None
    if certified_hybrid_key(old) is not None and not hybrid:
        raise InvalidInput(
            "bad_signing_cert",
            f"signing certificate refused: {partner}'s current certificate certifies an "
            "ML-DSA-65 key and this one does not; a rekey never moves a partner back to v1",
        )
    change = f"signing certificate {old.serial_number:x} -> {new.serial_number:x}"
    diff = [change + (" (with an ML-DSA-65 key: envelope v2)" if hybrid else "")]
    reason = reason or "replace the signing certificate"
    prop = await core.registry.propose(
        rec.policy,
        base_version=rec.version,
        proposed_by=operator,
        reason=reason,
        diff=diff,
        now_ms=now,
        signing_cert=signing_cert,
        audit=lambda pid: AuditItem(
            "partner.rekey_proposed",
            operator,
            partner,
            "",
            "allow",
            {"proposal": pid, "diff": diff, "reason": reason},
        ),
    )
    await core.registry_audit.registry_changed()
    return PolicyChange(proposal=prop)
