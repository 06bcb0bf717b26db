"""Running a NATS JetStream cluster on one machine: for the demo, the tests and the
benchmarks (production clusters run one nats-server per host, see docs/cluster.md)."""

from clients.cluster.natsd import NatsCluster, NatsNode, nats_server_binary

__all__ = ["NatsCluster", "NatsNode", "nats_server_binary"]
