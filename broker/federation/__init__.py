"""Federation between national brokers (docs/federation.md): the shared state, the
ingress of a peer's forwarded envelopes and the egress link to each peer. No gRPC:
the Federation servicer, the Forward client and their wiring are broker.grpc.federation.
"""
