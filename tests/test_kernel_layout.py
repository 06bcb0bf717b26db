"""Where things live: the kernel runs no program and opens no connection, the PKI's
building is pure, and each command line sits beside what it drives."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KERNEL = REPO / "coalition"
MAX_LINES = 450


def _kernel_modules() -> list[Path]:
    return sorted(p for p in KERNEL.rglob("*.py") if "v1" not in p.relative_to(KERNEL).parts)


def _imports(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_kernel_holds_no_command_line_program() -> None:
    programs = []
    for path in _kernel_modules():
        text = path.read_text()
        if "def main(" in text or "__main__" in text or "ArgumentParser(" in text:
            programs.append(str(path.relative_to(REPO)))
    # Before: coalition/keys_cli.py (coalition-keys) was in the kernel.
    assert programs == []


def test_the_kernel_opens_no_connection() -> None:
    network = {"grpc", "socket", "ssl", "asyncio", "http", "urllib", "broker", "clients"}
    found = {
        str(p.relative_to(REPO)): sorted(_imports(p) & network)
        for p in _kernel_modules()
        if _imports(p) & network
    }
    assert found == {}


def test_building_the_pki_touches_no_file() -> None:
    build = KERNEL / "pki" / "build.py"
    assert build.is_file()  # before: coalition/pki.py mixed building and the directory
    assert _imports(build) & {"os", "pathlib", "shutil", "tempfile", "io"} == set()
    calls = {
        n.func.id
        for n in ast.walk(ast.parse(build.read_text()))
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
    }
    assert "open" not in calls


def test_each_command_line_sits_beside_what_it_drives() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert {k: v for k, v in scripts.items() if k != "coalition-broker"} == {
        "coalition-keys": "clients.keys.cli:main",
        "coalition-node": "clients.node.cli:main",
        "coalition-admin": "clients.admin.cli:main",
        "coalition-demo": "clients.demo:main",
    }
    assert sorted(p.name for p in (REPO / "clients").glob("*_cli.py")) == []
    for name in ("keys", "node", "admin"):
        lines = len((REPO / "clients" / name / "cli.py").read_text().splitlines())
        assert lines <= MAX_LINES, (name, lines)


def test_the_node_explains_a_failed_handshake_only_through_the_sdk() -> None:
    # Before: the daemon opened its own unverified TLS connection to fetch the broker's
    # certificate and wrote a second explanation beside the SDK's.
    assert _imports(REPO / "clients" / "node" / "daemon.py") & {"ssl", "socket"} == set()
