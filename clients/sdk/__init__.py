"""The client SDK: the one path to the broker for the node daemon, the CLIs, tests and benchmarks.

``PartnerClient`` connects over mutual TLS, verifies the directory against the
coalition CA (it does not trust the broker for keys), chooses recipients, seals and
publishes with per-envelope results, and subscribes with acknowledgement.
``OperatorClient`` wraps the Admin service. gRPC errors are mapped at this edge to
``ClientError``.

One module per responsibility: errors (``ClientError``; ``BrokerTlsError``, why a TLS
handshake failed, as one sentence and a ``TlsReason``), channel (credentials, channel
options, keepalive), sequences (sequence allocation), publish (the Publish stream and its
merging), sealing (envelope v2: ``BatchSealer`` coalesces concurrent seals into one
signed batch and owns the client's epoch keys), opening (``Opener``, ``Opened``: v1 or v2
deliveries opened into one result), subscription (``SubscribeStream``), partner
(``PartnerClient``) and operator (``OperatorClient``). Callers import from here.
"""

from clients.sdk.channel import KEEPALIVE_ENV, KEEPALIVE_MS, keepalive_ms, secure_channel
from clients.sdk.errors import (
    BrokerTlsError,
    ClientError,
    NoRecipients,
    TlsReason,
    call,
    client_error,
    mapped_errors,
    tls_failure,
)
from clients.sdk.opening import OPEN_ERRORS, Opened, Opener, OpenError, claimed_header
from clients.sdk.operator import OperatorClient
from clients.sdk.partner import (
    KEYS_UNVERIFIED,
    NO_KEY_BUNDLE,
    NOT_ELIGIBLE,
    NOT_LISTED,
    PartnerClient,
)
from clients.sdk.publish import (
    PUBLISH_MAX_INFLIGHT,
    PUBLISH_MERGE_MAX_BYTES,
    PUBLISH_MERGE_MAX_ENVELOPES,
    merge_count,
)
from clients.sdk.sealing import BatchSealer, Draft, Sealed
from clients.sdk.sequences import Allocation, Sequencer, SequenceSource
from clients.sdk.subscription import ACK_LINGER_S, ExpiredHandler, SubscribeStream, Subscription
from coalition.directory import Directory, Peer

__all__ = [
    "ACK_LINGER_S",
    "KEEPALIVE_ENV",
    "KEEPALIVE_MS",
    "KEYS_UNVERIFIED",
    "NOT_ELIGIBLE",
    "NOT_LISTED",
    "NO_KEY_BUNDLE",
    "OPEN_ERRORS",
    "PUBLISH_MAX_INFLIGHT",
    "PUBLISH_MERGE_MAX_BYTES",
    "PUBLISH_MERGE_MAX_ENVELOPES",
    "Allocation",
    "BatchSealer",
    "BrokerTlsError",
    "ClientError",
    "Directory",
    "Draft",
    "ExpiredHandler",
    "NoRecipients",
    "OpenError",
    "Opened",
    "Opener",
    "OperatorClient",
    "PartnerClient",
    "Peer",
    "Sealed",
    "SequenceSource",
    "Sequencer",
    "SubscribeStream",
    "Subscription",
    "TlsReason",
    "call",
    "claimed_header",
    "client_error",
    "keepalive_ms",
    "mapped_errors",
    "merge_count",
    "secure_channel",
    "tls_failure",
]
