"""`coalition-demo`: a five-nation exchange on real processes; see clients/demo/scenario.py."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from coalition.cli_common import (
    EXIT_EPILOG,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    add_version,
    duration_ms,
)

EPILOG = (
    """examples:
  coalition-demo                      run the scenario in a temporary directory
  coalition-demo --report demo.json   also write the results as JSON
  coalition-demo --report demo.html   ... or as a self-contained HTML page
  coalition-demo --keep demo-run      keep PKI, stores, inboxes and logs in demo-run/
  coalition-demo --cluster            two brokers over three nats-server, then failures
  coalition-demo --federation --json  three national brokers; the result as JSON on stdout

The demo creates a development PKI (KOR, USA, GBR, UKR, NATO HQ and operators op1,
op2), starts the broker and one node daemon per partner as real processes, and plays
eight steps: admission by two operators, a first summary from KOR, a RESTRICTIVE
compartment, an offline partner catching up FLASH first, a suspension mid-stream, a
rogue process, and audit verification. With --cluster, three nats-server (JetStream,
R3, fsync on every write) hold the data and two brokers serve it, the nations spread
over both; a ninth step kills one nats-server and one broker in the middle of a burst
and checks that nothing acknowledged is lost or duplicated and the audit chain
verifies. With --federation, NATO, KOR and USA each run their own broker with their own
CA, operators and partner nodes; the brokers forward what each nation's release policy
allows to the others (see docs/federation.md). Exit status 0 means every expectation
held, 1 that one did not.

"""
    + EXIT_EPILOG
    + "\n"
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="coalition-demo",
        description="Play a multi-nation intelligence exchange end to end and check it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version(p, "coalition-demo")
    p.add_argument(
        "--report",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="write the results to FILE: HTML if it ends in .html, else JSON (repeatable)",
    )
    p.add_argument("--keep", type=Path, help="work in this directory and keep it")
    p.add_argument(
        "--deadline-ms",
        type=duration_ms(),
        default=1000,
        metavar="DURATION",
        help="how soon eligible partners must receive: 1s, 500ms; ms if no unit (default 1s)",
    )
    p.add_argument(
        "--cluster",
        action="store_true",
        help="two brokers over a three-node NATS JetStream cluster, then a nats-server "
        "and a broker killed mid-exchange",
    )
    p.add_argument(
        "--federation",
        action="store_true",
        help="three national brokers (NATO, KOR, USA), each with its own CA, operators and "
        "nodes, exchanging what their release policies allow",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the results as JSON on stdout (the steps go to stderr)",
    )
    ns = p.parse_args(argv)
    if ns.cluster and ns.federation:
        p.error("--cluster and --federation are separate scenarios; choose one")

    from clients.demo.scenario import Demo, default_out

    out = default_out if not ns.json else _to_stderr

    work = ns.keep or Path(tempfile.mkdtemp(prefix="coalition-demo-"))
    if ns.keep and work.exists() and any(work.iterdir()):
        print(f"coalition-demo: {work} is not empty; choose a new directory", file=sys.stderr)
        return EXIT_USAGE
    work.mkdir(parents=True, exist_ok=True)
    if ns.cluster:
        from clients.demo.cluster import ClusterDemo

        demo: Demo = ClusterDemo(work, out=out, deadline_ms=ns.deadline_ms)
    elif ns.federation:
        from clients.demo.federation import FederationDemo

        demo = FederationDemo(work, out=out, deadline_ms=ns.deadline_ms)
    else:
        demo = Demo(work, out=out, deadline_ms=ns.deadline_ms)
    started = time.monotonic()
    error = ""
    try:
        asyncio.run(demo.run())
    except Exception as exc:  # a crashed step is a failed expectation with its reason
        error = f"{type(exc).__name__}: {exc}"
        demo.expect("-", "the scenario ran to the end", False, error)
    finally:
        demo.shutdown()
    demo.print_summary()
    report = demo.report(time.monotonic() - started)
    for path in ns.report:
        if path.suffix.lower() in (".html", ".htm"):
            from clients.demo.html_report import render

            path.write_text(render(report), encoding="utf-8")
        else:
            path.write_text(json.dumps(report, indent=2))
        out(f"report written to {path}")
    if ns.keep:
        out(f"work directory kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    out(f"finished in {report['elapsed_s']:.1f} s: {'OK' if report['ok'] else 'FAILED'}")
    if ns.json:
        print(json.dumps(report, indent=2), flush=True)
    return EXIT_OK if report["ok"] else EXIT_ERROR


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
