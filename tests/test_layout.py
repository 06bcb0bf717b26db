"""The broker's layout holds: only its gRPC edge knows gRPC, status codes and response
shapes; every domain error has one status; no module is too long to hold one job.

Read from the source (no broker runs): these are rules about where code lives.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import grpc

from broker import errors
from broker.grpc.status import STATUS, status_of

REPO = Path(__file__).resolve().parent.parent
BROKER = REPO / "broker"
MAX_LINES = 450

# The edge: the only modules that may import grpc, build response protobufs and import
# broker.grpc.
EDGE = ("broker/grpc/", "broker/server.py")

# Files other work is still splitting. THESE LISTS MUST BE EMPTY: each entry goes when its
# file is split (an entry naming a file that no longer exists fails the test).
TOO_LONG_FOR_NOW: set[str] = set()
BUILDS_RESPONSES_FOR_NOW: set[str] = set()
IMPORTS_EDGE_FOR_NOW: set[str] = set()


def _modules() -> Iterator[tuple[str, ast.Module, str]]:
    for path in sorted(BROKER.rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        text = path.read_text()
        yield rel, ast.parse(text, rel), text


def _on_edge(rel: str) -> bool:
    return rel.startswith(EDGE)


def _imports(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """Every module imported anywhere in tree (deferred imports too), with its line."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
            for alias in node.names:  # from coalition.v1 import admin_pb2_grpc
                yield node.lineno, f"{node.module}.{alias.name}"


def _is_grpc(module: str) -> bool:
    root, _, _ = module.partition(".")
    return root == "grpc" or root.startswith("grpc_") or module.endswith("_pb2_grpc")


def test_only_the_grpc_edge_imports_grpc() -> None:
    found = [
        f"{rel}:{line}: imports {module}"
        for rel, tree, _ in _modules()
        if not _on_edge(rel)
        for line, module in _imports(tree)
        if _is_grpc(module)
    ]
    assert found == [], "\n".join(found)


def test_nothing_below_the_edge_imports_it() -> None:
    found = sorted(
        {
            rel
            for rel, tree, _ in _modules()
            if not _on_edge(rel)
            for _, module in _imports(tree)
            if module == "broker.grpc" or module.startswith("broker.grpc.")
        }
    )
    assert found == sorted(IMPORTS_EDGE_FOR_NOW), found


def _responses_built(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """Calls such as ``admin_pb2.StatsResponse(...)``."""
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id.endswith("_pb2")
            and node.func.attr.endswith("Response")
        ):
            yield node.lineno, f"{node.func.value.id}.{node.func.attr}"


def test_only_the_grpc_edge_builds_responses() -> None:
    found: dict[str, list[str]] = {}
    for rel, tree, _ in _modules():
        if not _on_edge(rel):
            for line, call in _responses_built(tree):
                found.setdefault(rel, []).append(f"{line}: {call}")
    assert sorted(found) == sorted(BUILDS_RESPONSES_FOR_NOW), found


def test_no_broker_module_is_too_long() -> None:
    lengths = {rel: len(text.splitlines()) for rel, _, text in _modules()}
    too_long = sorted(rel for rel, n in lengths.items() if n > MAX_LINES)
    assert [r for r in too_long if r not in TOO_LONG_FOR_NOW] == [], {
        r: lengths[r] for r in too_long
    }
    assert sorted(TOO_LONG_FOR_NOW - set(lengths)) == [], "split: remove from TOO_LONG_FOR_NOW"


def test_every_domain_error_has_one_status() -> None:
    kinds = {
        obj
        for obj in vars(errors).values()
        if isinstance(obj, type) and issubclass(obj, errors.BrokerError)
    }
    # Each class the domain defines directly under BrokerError has its own row.
    assert {k for k in kinds if k.__bases__ == (errors.BrokerError,)} <= set(STATUS)
    assert status_of(errors.Forbidden("x", "y")) == grpc.StatusCode.PERMISSION_DENIED
    assert status_of(errors.NotAuthenticated("x", "y")) == grpc.StatusCode.UNAUTHENTICATED
    assert status_of(errors.Exhausted("x", "y")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    # A subclass takes its parent's row.
    malformed = errors.MalformedRequest("M", 2, ValueError("bad"))
    assert status_of(malformed) == grpc.StatusCode.INVALID_ARGUMENT
    # The domain errors carry no status of their own: the table is the one place.
    assert not any("status" in vars(k) for k in kinds)
