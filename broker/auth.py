"""Who is calling and what they may call: the authentication and service-level
authorization decisions, with no gRPC in them.

The TLS layer has already verified the client certificate against the coalition CA.
``Authorizer.authorize`` takes what the connection reports (the certificate, the TLS
version, the key exchange group) and the method called, and either returns the
caller's identity and certificate or raises ``AuthRefused`` carrying the domain error
to answer with: partners may call the Exchange service, operators the Admin service,
anyone authenticated the health and reflection services; everything else is refused
(deny by default). ``broker.grpc.interceptor`` applies these decisions to every call.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509

from broker.config import BrokerConfig
from broker.errors import BrokerError, Exhausted, Forbidden, NotAuthenticated
from broker.errors import MalformedRequest as MalformedRequest  # its old home, for servicers
from broker.registry import PartnerRegistry
from broker.revocation import parse_serials
from coalition.federation import TrustFile, issued_by
from coalition.identity import (
    Identity,
    IdentityError,
    IdentityKind,
    check_validity,
    datetime_to_ms,
    identity_from_cert,
)
from coalition.policy import PartnerStatus

EXCHANGE = "/coalition.v1.Exchange/"
ADMIN = "/coalition.v1.Admin/"
FEDERATION = "/coalition.v1.Federation/"
OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

TLS_VERSION = "TLSv1.3"
# Key exchange groups accepted: hybrid post-quantum only (ML-KEM-768 with X25519), so
# traffic recorded today cannot be decrypted later with a quantum computer.
HYBRID_GROUPS = frozenset({"X25519MLKEM768"})

_IDENTITY: contextvars.ContextVar[Identity] = contextvars.ContextVar("coalition_identity")


def current_identity() -> Identity:
    """The authenticated caller of the RPC being served (LookupError outside a call)."""
    return _IDENTITY.get()


def identity_or_none() -> Identity | None:
    """The authenticated caller of the RPC being served, or None before authentication."""
    return _IDENTITY.get(None)


def set_identity(ident: Identity) -> None:
    """Make ident the caller of the RPC being served (the interceptor, once authorized)."""
    _IDENTITY.set(ident)


class AuthRefused(Exception):
    """A call refused before it ran: ``error`` is what the caller is told (its class gives
    the status), ``actor`` the identity's URI when the certificate named one ("" if not).
    """

    def __init__(self, error: BrokerError, actor: str) -> None:
        super().__init__(error.message)
        self.error, self.actor = error, actor

    @property
    def code(self) -> str:
        return self.error.code

    @property
    def message(self) -> str:
        return self.error.message


@dataclass(frozen=True)
class Caller:
    """An authorized caller and the certificate it called with."""

    identity: Identity
    serial: int
    not_after_ms: int


def _unauthenticated(code: str, message: str, actor: str = "") -> AuthRefused:
    return AuthRefused(NotAuthenticated(code, message), actor)


def _forbidden(code: str, message: str, actor: str) -> AuthRefused:
    return AuthRefused(Forbidden(code, message), actor)


def check_tls(tls_version: str, key_exchange_group: str) -> None:
    """Refuse (UNAUTHENTICATED) a connection that is not TLS 1.3 with a hybrid
    post-quantum key exchange: grpc Python can neither set the minimum version nor
    restrict the server's groups, but it reports what was negotiated."""
    if tls_version != TLS_VERSION:
        raise _unauthenticated(
            "tls_version",
            f"the connection uses {tls_version or 'no TLS'}; {TLS_VERSION} is required",
        )
    if key_exchange_group not in HYBRID_GROUPS:
        raise _unauthenticated(
            "key_exchange",
            f"the connection's TLS key exchange is {key_exchange_group or 'unknown'}; the "
            f"hybrid post-quantum {', '.join(sorted(HYBRID_GROUPS))} is required (a current "
            "grpc client offers it by default)",
        )


def too_many_connections(ident: Identity, limit: int) -> AuthRefused:
    """The refusal (RESOURCE_EXHAUSTED) of a call on one connection too many."""
    return AuthRefused(
        Exhausted(
            "too_many_connections",
            f"{ident.uri} already has calls in progress on {limit} connections, the most "
            "allowed; make further calls on those (one connection carries many calls)",
        ),
        ident.uri,
    )


class Authorizer:
    """The decisions: identity from the certificate, validity and revocation, and which
    service the identity may call. Reads the registry and the configured operators."""

    def __init__(
        self, cfg: BrokerConfig, registry: PartnerRegistry, clock: Callable[[], int]
    ) -> None:
        self.cfg = cfg
        self.registry = registry
        self.clock = clock
        # Serials compared as numbers: "011D49", "01:1d:49" and "0x11d49" are one serial.
        self.revoked = parse_serials(cfg.revoked_serials)
        # Federation (broker.federation): the trust file, when the TLS server also
        # trusts peer nations' CAs, and this nation's own CA.
        self.trust: TrustFile | None = None
        self.own_ca: x509.Certificate | None = None

    def set_revoked(self, entries: Iterable[str]) -> tuple[list[int], list[int]]:
        """Make entries the revoked serials; return those newly revoked and those no
        longer revoked. Raises ValueError for an entry that is not a serial (nothing
        changes then)."""
        revoked = parse_serials(entries)
        added = sorted(revoked - self.revoked)
        removed = sorted(self.revoked - revoked)
        self.revoked = revoked
        return added, removed

    def authorize(
        self, pems: Sequence[bytes], tls_version: str, key_exchange_group: str, method: str
    ) -> Caller:
        """The caller of method, from the connection's client certificate (PEM, first
        one) and TLS parameters, or AuthRefused (UNAUTHENTICATED or PERMISSION_DENIED)."""
        if not pems:
            raise _unauthenticated("no_certificate", "a client certificate is required")
        check_tls(tls_version, key_exchange_group)
        try:
            cert = x509.load_pem_x509_certificate(pems[0])
            ident = identity_from_cert(cert)
        except (ValueError, IdentityError) as exc:
            raise _unauthenticated(
                "no_identity", f"the client certificate names no coalition identity: {exc}"
            ) from exc
        try:
            check_validity(cert, self.clock(), "the client certificate")
        except IdentityError as exc:
            raise _unauthenticated("cert_expired", str(exc), ident.uri) from exc
        if cert.serial_number in self.revoked:
            raise _unauthenticated(
                "cert_revoked", "the client certificate has been revoked", ident.uri
            )
        self._check_issuer(cert, ident)
        self.admit(ident, method)
        return Caller(ident, cert.serial_number, datetime_to_ms(cert.not_valid_after_utc))

    def _check_issuer(self, cert: x509.Certificate, ident: Identity) -> None:
        """With federation the TLS layer trusts peer nations' CAs too: a certificate from
        a peer's CA may only be that nation's gateway, and a gateway certificate must come
        from the CA the trust file names for its nation (never from this nation's)."""
        if self.trust is None or self.own_ca is None:
            return
        if issued_by(cert, self.own_ca):
            if ident.kind is IdentityKind.GATEWAY:
                raise _forbidden(
                    "own_gateway",
                    f"{ident.uri} is issued by this nation's CA; a peer nation's gateway "
                    "certificate comes from that nation's CA",
                    ident.uri,
                )
            return
        peer = next((p for p in self.trust.peers.values() if issued_by(cert, p.ca_cert)), None)
        if peer is None or ident != Identity.gateway(peer.nation):
            issuer = f"nation {peer.nation}'s CA" if peer else "an unknown CA"
            raise _unauthenticated(
                "foreign_identity",
                f"the client certificate naming {ident.uri} is issued by {issuer}, which "
                "may only speak for that nation's gateway",
                ident.uri,
            )

    def admit(self, ident: Identity, method: str) -> None:
        """Whether ident may call method: AuthRefused if not."""
        if method.startswith(OPEN_SERVICES):
            return
        if method.startswith(FEDERATION):
            self._admit_gateway(ident)
            return
        if method.startswith(EXCHANGE):
            self._admit_partner(ident)
            return
        if method.startswith(ADMIN):
            if ident.kind is not IdentityKind.OPERATOR:
                raise _forbidden(
                    "not_an_operator",
                    f"{ident.uri} is not an operator; the Admin service is for operators",
                    ident.uri,
                )
            if ident.name not in self.cfg.operators:
                raise _unauthenticated(
                    "unknown_operator",
                    f"operator {ident.name} is not authorized on this broker",
                    ident.uri,
                )
            return
        raise _forbidden("unknown_service", f"no such service for {ident.uri}", ident.uri)

    def _admit_partner(self, ident: Identity) -> None:
        if ident.kind is not IdentityKind.PARTNER:
            raise _forbidden(
                "not_a_partner",
                f"{ident.uri} is not a partner; the Exchange service is for partners",
                ident.uri,
            )
        if self.trust is not None and self.trust.peer_for(ident.name) is not None:
            raise _forbidden(
                "federated_nation",
                f"{ident.uri} speaks for a federated nation; that nation's partners are "
                "served by its own broker",
                ident.uri,
            )
        rec = self.registry.get(ident.name)
        if rec is None:
            raise _unauthenticated(
                "unknown_partner",
                f"partner {ident.name} is not registered with this broker; "
                "an operator must admit it",
                ident.uri,
            )
        if rec.policy.status is PartnerStatus.PENDING:
            # Deny by default: proposed by one operator is not admitted. Until a second
            # operator approves, only the health check answers.
            raise _forbidden(
                "not_admitted",
                f"partner {ident.name} is not admitted yet: its admission awaits a "
                "second operator's approval",
                ident.uri,
            )

    def _admit_gateway(self, ident: Identity) -> None:
        if ident.kind is not IdentityKind.GATEWAY:
            raise _forbidden(
                "not_a_gateway",
                f"{ident.uri} is not a gateway; the Federation service is for peer brokers",
                ident.uri,
            )
        rec = self.registry.get(ident.name)
        if self.trust is None or ident.name not in self.trust.peers or rec is None:
            raise _unauthenticated(
                "unknown_gateway",
                f"nation {ident.name} is not a federation peer of this broker (its trust "
                "file and its operators' admission name the peers)",
                ident.uri,
            )
        if rec.signing_cert != self.trust.peers[ident.name].ca_der:
            raise _unauthenticated(
                "ca_not_admitted",
                f"the trust file names another CA for nation {ident.name} than the one its "
                "operators admitted; the gateway is refused until they agree",
                ident.uri,
            )
        if rec.policy.status is not PartnerStatus.ACTIVE:
            state = "suspended" if rec.policy.status is PartnerStatus.SUSPENDED else "not_admitted"
            raise _forbidden(
                state, f"the gateway of nation {ident.name} is {state.replace('_', ' ')}", ident.uri
            )
