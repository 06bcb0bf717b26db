"""Coalition clients: the SDK, the partner node daemon and the operator CLI."""
