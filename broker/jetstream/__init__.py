"""The cluster backend: the message store, the registry and the audit log on a NATS
JetStream cluster (R3, ``sync_interval: always``), so any broker serves any partner."""
