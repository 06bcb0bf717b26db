"""The broker's gRPC edge: the only part of the broker that knows gRPC status codes and
the shapes of the response protobufs.

``status.py`` holds the one table from domain error to gRPC status; ``interceptor.py``
authenticates every call (with the decisions of ``broker.auth``) and parses its
requests; ``admin.py`` is the Admin service over ``broker.admin.AdminCore``.
"""
