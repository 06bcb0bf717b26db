"""Which certificate admits an entry to the registry, with federation in mind.

A partner is admitted with its signing certificate, issued by this nation's CA. A peer
nation's gateway is admitted as the registry entry named by its nation code, with that
nation's CA certificate in place of a signing certificate: it must be byte for byte the
one the trust file names, so the two-person admission pins the CA. No local partner may
speak for a peer nation, and no peer may be admitted while a local partner speaks for it.
"""

from __future__ import annotations

from cryptography import x509

from broker.errors import Forbidden, InvalidInput
from broker.registry_types import PartnerRegistry
from coalition.federation import TrustFile, speaks_for
from coalition.identity import IdentityError, verify_signing_cert


def check_admission(
    ca_cert: x509.Certificate,
    trust: TrustFile | None,
    registry: PartnerRegistry,
    code: str,
    cert_der: bytes,
    now_ms: int,
) -> None:
    """Refuse (InvalidInput ``bad_signing_cert``, Forbidden ``federated_nation``) an
    admission the certificate or the federation does not allow."""
    peer = trust.peer_for(code) if trust is not None else None
    if peer is not None and code != peer.nation:
        raise Forbidden(
            "federated_nation",
            f"{code} speaks for the federated nation {peer.nation}, whose partners are served "
            "by its own broker",
        )
    if peer is not None:
        if cert_der != peer.ca_der:
            raise InvalidInput(
                "bad_signing_cert",
                f"the gateway of nation {code} is admitted with that nation's CA certificate "
                "as the federation trust file names it",
            )
        local = [r.code for r in registry.all() if speaks_for(r.code, code) and r.code != code]
        if local:
            raise Forbidden(
                "federated_nation",
                f"local partners {', '.join(local)} speak for nation {code}; a nation is "
                "either served here or federated",
            )
        return
    try:
        verify_signing_cert(cert_der, ca_cert, code, now_ms)
    except IdentityError as exc:
        raise InvalidInput("bad_signing_cert", f"signing certificate refused: {exc}") from exc
