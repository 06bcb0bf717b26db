"""Coalition shared kernel: labels, policy decisions, envelopes, identity. No network I/O."""
