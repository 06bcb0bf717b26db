"""Regenerate the wire code from proto/ (or, with --check, fail if it is stale)."""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_PKG = Path("coalition") / "v1"


def generate(out_root: Path) -> None:
    """Run protoc with the Python, gRPC and mypy-protobuf plugins into out_root."""
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / OUT_PKG).glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    (out_root / OUT_PKG).mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *protos,
    ]
    # The mypy-protobuf plugins live next to this interpreter.
    bindir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", *args[1:]],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"protoc failed:\n{proc.stderr}")
    (out_root / OUT_PKG / "__init__.py").write_text('"""Generated wire code (make proto)."""\n')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed code is stale")
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / OUT_PKG
        committed = ROOT / OUT_PKG
        if ns.check:
            names = {p.name for p in fresh.iterdir()} | {
                p.name for p in committed.glob("*") if p.suffix in {".py", ".pyi"}
            }
            stale = [
                n
                for n in sorted(names)
                if not (committed / n).exists()
                or not (fresh / n).exists()
                or not filecmp.cmp(fresh / n, committed / n, shallow=False)
            ]
            if stale:
                print("generated wire code is stale; run `make proto`:", ", ".join(stale))
                return 1
            print("wire code is up to date")
            return 0
        committed.mkdir(parents=True, exist_ok=True)
        for old in committed.glob("*_pb2*"):
            old.unlink()
        for new in fresh.iterdir():
            shutil.copy2(new, committed / new.name)
        print(f"regenerated {len(list(fresh.iterdir()))} files in {OUT_PKG}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
