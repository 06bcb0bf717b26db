"""Coalition clients: the SDK, the partner node daemon and the operator CLI."""

import os

# gRPC Core writes its own log lines to stderr (a failed TLS handshake, a failed
# connection) where the command lines already say what went wrong in one sentence. It
# reads this once, when grpc is first imported, so it is set here, before any client
# module imports grpc. An explicit GRPC_VERBOSITY (e.g. debug) still wins.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
