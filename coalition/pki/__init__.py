"""The coalition PKI: building the CA, certificates and key bundles, and the directory
``coalition-keys`` writes them to.

One module per question: ``build`` (pure: the CA, certificates, key bundles; no file
system, no clock), ``credentials`` (what each party loads), ``layout`` (the directory's
names, permissions and file primitives), ``issue`` (writing identities into it) and
``load`` (reading them back, checked). The public names are re-exported here, so
``from coalition.pki import load_partner`` works as it always has.
"""

from coalition.pki.build import (
    BACKDATE_MS,
    DAY_MS,
    DEFAULT_CA_DAYS,
    DEFAULT_CERT_DAYS,
    DEFAULT_HPKE_DAYS,
    LOOPBACK_HOSTS,
    LOOPBACK_IPS,
    CertificateAuthority,
    PkiError,
    broker_host_names,
    create_ca,
    issue_signing_cert,
    issue_tls_cert,
    make_key_bundle,
)
from coalition.pki.credentials import (
    BrokerCredentials,
    GatewayCredentials,
    OperatorCredentials,
    PartnerCredentials,
)
from coalition.pki.issue import (
    init_ca,
    issue_broker,
    issue_gateway,
    issue_operator,
    issue_partner,
    make_dev_pki,
    reissue_signing,
    rotate_hpke,
)
from coalition.pki.layout import (
    BROKER_DIR,
    BUNDLE_FILE,
    CA_DIR,
    GATEWAYS_DIR,
    HPKE_PREFIX,
    HPKE_SUFFIX,
    OPERATORS_DIR,
    PARTNERS_DIR,
    gateway_dir,
    operator_dir,
    partner_dir,
)
from coalition.pki.load import load_broker, load_ca, load_gateway, load_operator, load_partner

__all__ = [
    "BACKDATE_MS",
    "BROKER_DIR",
    "BUNDLE_FILE",
    "CA_DIR",
    "DAY_MS",
    "DEFAULT_CA_DAYS",
    "DEFAULT_CERT_DAYS",
    "DEFAULT_HPKE_DAYS",
    "GATEWAYS_DIR",
    "HPKE_PREFIX",
    "HPKE_SUFFIX",
    "LOOPBACK_HOSTS",
    "LOOPBACK_IPS",
    "OPERATORS_DIR",
    "PARTNERS_DIR",
    "BrokerCredentials",
    "CertificateAuthority",
    "GatewayCredentials",
    "OperatorCredentials",
    "PartnerCredentials",
    "PkiError",
    "broker_host_names",
    "create_ca",
    "gateway_dir",
    "init_ca",
    "issue_broker",
    "issue_gateway",
    "issue_operator",
    "issue_partner",
    "issue_signing_cert",
    "issue_tls_cert",
    "load_broker",
    "load_ca",
    "load_gateway",
    "load_operator",
    "load_partner",
    "make_dev_pki",
    "make_key_bundle",
    "operator_dir",
    "partner_dir",
    "reissue_signing",
    "rotate_hpke",
]
