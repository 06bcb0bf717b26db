"""Every metric's name and help text, in one place (docs/metrics.md describes each; the
Grafana dashboard and tests/test_metrics.py use these names)."""

from __future__ import annotations

PREFIX = "coalition_"

# Counted on the publish and delivery paths (broker.metrics.instruments).
ENVELOPES_PUBLISHED = "coalition_envelopes_published"  # _total added by the client library
POLICY_DECISIONS = "coalition_policy_decisions"
AUTH_REFUSALS = "coalition_auth_refusals"
STORE_COMMIT_SECONDS = "coalition_store_commit_duration_seconds"
VERIFY_SECONDS = "coalition_verify_duration_seconds"

# Read from the broker's state at scrape time (broker.metrics.collector).
DELIVERIES = "coalition_deliveries_total"
PARTNER_LAG = "coalition_partner_lag_messages"
PARTNER_INFLIGHT = "coalition_partner_inflight_messages"
PARTNER_WINDOW = "coalition_partner_window_messages"
PARTNER_LIVE_STREAMS = "coalition_partner_live_streams"
PARTNER_POLICY_VERSION = "coalition_partner_policy_version"
PARTNER_STATUS = "coalition_partner_status"
PARTNER_STORE_BYTES = "coalition_partner_store_bytes"
LIVE_STREAMS = "coalition_live_streams"
STORE_MESSAGES = "coalition_store_messages"
STORE_BYTES = "coalition_store_bytes"
STORE_FILE_BYTES = "coalition_store_file_bytes"
STORE_HEAD = "coalition_store_head_offset"
AUDIT_ENTRIES = "coalition_audit_entries"
AUDIT_LAST_CHECKPOINT = "coalition_audit_last_checkpoint_timestamp_seconds"
AUDIT_WRITABLE = "coalition_audit_writable"
VERIFY_QUEUE = "coalition_verify_queue_requests"
ROOT_CHECKS = "coalition_batch_root_checks_total"
ROOT_CACHE_HITS = "coalition_batch_root_cache_hits_total"

# Histogram buckets, seconds: an fsync'd group commit takes ~1-20 ms on an SSD; one
# request's signature checks ~0.1 ms per envelope.
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
VERIFY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
