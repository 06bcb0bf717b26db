"""Coalition side by side with its peers: ``python -m bench.run [--quick | --smoke]``.

Rows, run one after another on this machine with the same sealed workload
(bench.workload): ``coalition`` (our broker, its own process), ``nats-core``,
``jetstream-sync`` (fsync on every write), ``grpc-relay`` (a no-op grpc.aio relay),
``jetstream-r3`` (three clustered nats-server, the stream at R3) and
``coalition-cluster`` (two brokers on the JetStream backend over such a cluster;
``coalition-cluster-1``, one broker, when named). Per row: delivered messages/s at
saturation, latency p50/p99/p99.9 at 500 and 2000 messages/s offered (open loop),
server CPU seconds per delivered message, server peak RSS. Writes
bench/results/latest.json (the previous one is kept under bench/results/history/) and
prints a table with ratios.
Progress goes to stderr, one line per phase. See docs/bench.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import multiprocessing
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

import cryptography
import grpc

from bench import report, worker
from bench.procstat import cpu_seconds, peak_rss_mb
from bench.report import PhaseRecord, RowResult
from bench.rows import SYSTEMS, RowSpec
from bench.servers import Server
from bench.workload import (
    ENVELOPE_VERSIONS,
    LABEL_TEXT,
    OPERATORS,
    PARTNERS,
    PAYLOAD_BYTES,
    PUBLISHERS,
    RECEIVERS,
    SEAL_BATCH,
    Plan,
    load_workload,
    plan_for,
    seal_workload,
)
from coalition.pki import make_dev_pki

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "latest.json"
SMOKE_ROWS = ("coalition", "grpc-relay", "nats-core")
IDLE_TIMEOUT_S = 10.0  # a phase that makes no delivery progress this long is over


def progress(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Workers:
    """The client processes: one per receiver, one for both publishers."""

    def __init__(self, workload: Path) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.counters: list[Synchronized[int]] = [ctx.Value("q", 0) for _ in RECEIVERS]
        self.receivers: list[tuple[SpawnProcess, Connection]] = []
        for code, counter in zip(RECEIVERS, self.counters, strict=True):
            mine, theirs = ctx.Pipe()
            p = ctx.Process(
                target=worker.receiver_main, args=(theirs, code, counter), name=f"recv-{code}"
            )
            p.start()
            self.receivers.append((p, mine))
        mine, theirs = ctx.Pipe()
        p = ctx.Process(
            target=worker.publisher_main, args=(theirs, workload, self.counters), name="publish"
        )
        p.start()
        self.publisher = (p, mine)

    @property
    def pids(self) -> list[int]:
        return [p.pid or 0 for p, _ in (*self.receivers, self.publisher)]

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids)

    def opened(self) -> list[int]:
        return [c.value for c in self.counters]

    def close(self) -> None:
        for p, conn in (*self.receivers, self.publisher):
            try:
                conn.send(("exit",))
            except OSError:
                pass
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()


async def ask(conn: Connection, timeout: float) -> Any:
    """The next message from a worker; raises on a worker error or timeout."""
    loop = asyncio.get_running_loop()
    if not await loop.run_in_executor(None, conn.poll, timeout):
        raise TimeoutError(f"worker did not answer within {timeout} s")
    msg = conn.recv()
    if isinstance(msg, tuple) and msg and msg[0] == "error":
        raise RuntimeError(f"worker failed:\n{msg[1]}")
    return msg


async def start_server(system: str, pki: Path, workdir: Path) -> Server:
    if system == "coalition":
        from bench.rows import coalition

        return await coalition.start_server(pki, workdir)
    if system in ("nats-core", "jetstream-sync"):
        from bench.rows import nats

        return await nats.start_server(workdir, jetstream=system == "jetstream-sync")
    if system == "grpc-relay":
        from bench.rows import relay

        return await relay.start_server(pki, workdir)
    if system == "jetstream-r3":
        from bench.rows import nats

        return await nats.start_cluster(workdir)
    if system in ("coalition-cluster", "coalition-cluster-1"):
        from bench.rows import coalition

        return await coalition.start_cluster(pki, workdir, 1 if system.endswith("-1") else 2)
    raise ValueError(system)


@dataclass(frozen=True)
class Profiling:
    """py-spy on the server and the first receiver during one phase of each row."""

    outdir: Path
    phase: str = "saturation"
    gil: bool = False  # only samples holding the GIL (Python work, not C threads or I/O)
    native: bool = False  # C frames too (pauses the process at each sample: slower)


def _start_profilers(
    system: str, pids: dict[str, int], prof: Profiling
) -> list[subprocess.Popen[bytes]]:
    """py-spy on each named process: collapsed stacks to <outdir>/<system>-<name>.txt."""
    prof.outdir.mkdir(parents=True, exist_ok=True)
    procs = []
    for name, pid in pids.items():
        out = prof.outdir / f"{system}-{name}.txt"
        argv = ["py-spy", "record", "--pid", str(pid), "--format", "raw", "--rate", "250"]
        argv += ["--output", str(out), *(["--gil"] if prof.gil else [])]
        # py-spy reads native stacks only from a paused process (which slows it down).
        argv += ["--native"] if prof.native else ["--nonblocking"]
        py_spy = Path(sys.executable).parent / "py-spy"
        if py_spy.exists():
            argv[0] = str(py_spy)
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


def _stop_profilers(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.send_signal(signal.SIGINT)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


async def run_row(
    system: str,
    plan: Plan,
    pki: Path,
    workdir: Path,
    workers: Workers,
    ids: list[str],
    profile: Profiling | None = None,
    rnd: int = 1,
) -> RowResult:
    """Round ``rnd`` (from 1) of one row, on a fresh server, with that round's messages."""
    result = RowResult(system, message_ids=ids)
    began = time.monotonic()
    rowdir = workdir / f"{system}-{rnd}"
    rowdir.mkdir()
    server = await start_server(system, pki, rowdir)
    try:
        spec = RowSpec(system, server.target, str(pki))
        for c in workers.counters:
            c.value = 0
        for _, conn in workers.receivers:
            conn.send(("row", spec))
        for _, conn in workers.receivers:
            await ask(conn, 60)
        pub = workers.publisher[1]
        pub.send(("row", spec))
        await ask(pub, 60)
        offset = (rnd - 1) * plan.per_round
        accepted_before = 0
        for phase in plan.phases:
            start, stop = offset, offset + phase.count
            offset = stop
            cpu0, ccpu0, t0 = _cpu(server), workers.cpu(), time.monotonic()
            parts0 = _cpu_by_kind(server)
            before = sum(workers.opened())
            profilers = []
            if profile is not None and phase.name == profile.phase and rnd == 1:
                pids = {"server": server.pid, "receiver": workers.receivers[0][0].pid or 0}
                profilers = _start_profilers(system, pids, profile)
                await asyncio.sleep(0.5)  # py-spy attaches
            pub.send(("phase", phase, start, stop))
            _, accepted, refused = await ask(pub, plan.row_timeout_s)
            result.refused = refused
            await _drain(workers, accepted, plan.row_timeout_s)
            _stop_profilers(profilers)
            cpu1, ccpu1, t1 = _cpu(server), workers.cpu(), time.monotonic()
            parts = {k: v - parts0.get(k, 0.0) for k, v in _cpu_by_kind(server).items()}
            result.phases.append(
                PhaseRecord(
                    phase.name,
                    phase.kind,
                    phase.rate,
                    start,
                    stop,
                    cpu1 - cpu0,
                    ccpu1 - ccpu0,
                    t1 - t0,
                    rnd,
                    parts,
                )
            )
            done = sum(workers.opened()) - before
            sent = accepted - accepted_before
            accepted_before = accepted
            progress(
                f"{system:14} {phase.name:10} {rnd}/{plan.rounds} "
                f"{sent:5}/{phase.count:<5} msgs sent -> "
                f"{done:6} deliveries ({3 * sent} expected) "
                f"in {t1 - t0:5.1f} s, server cpu {cpu1 - cpu0:5.2f} s"
            )
            await asyncio.sleep(0.2)  # let acks and group commits settle between phases
        result.peak_rss_mb = sum(peak_rss_mb(pid) for pid in server.pids)
        pub.send(("end",))
        _, result.sent_at, _ = await ask(pub, 60)
        for code, (_, conn) in zip(RECEIVERS, workers.receivers, strict=True):
            conn.send(("end",))
            _, result.opened[code] = await ask(conn, 60)
    finally:
        rc = server.stop()
        if rc not in (0, -15, None) and result.error is None:
            progress(f"{system}: server exited with {rc} (see its log)")
    result.seconds = time.monotonic() - began
    return result


def _cpu(server: Server) -> float:
    """CPU seconds of a row's server so far: every process of a cluster row."""
    return sum(cpu_seconds(pid) for pid in server.pids)


def _cpu_by_kind(server: Server) -> dict[str, float]:
    """CPU seconds so far of a cluster row's processes by kind (brokers, nats-server)."""
    out: dict[str, float] = {}
    for pid, kind in zip(server.pids, getattr(server, "kinds", None) or [], strict=False):
        out[kind] = out.get(kind, 0.0) + cpu_seconds(pid)
    return out


async def _drain(workers: Workers, accepted: int, timeout: float) -> None:
    """Wait until every receiver opened ``accepted`` messages, or progress stops."""
    deadline = time.monotonic() + timeout
    last, last_change = workers.opened(), time.monotonic()
    while min(workers.opened()) < accepted:
        now = time.monotonic()
        seen = workers.opened()
        if seen != last:
            last, last_change = seen, now
        if now - last_change > IDLE_TIMEOUT_S or now > deadline:
            progress(f"giving up waiting: opened {seen}, expected {accepted} each")
            return
        await asyncio.sleep(0.002)


def _git_commit() -> str:
    try:
        git = ["git", "-C", str(ROOT)]
        out = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        code = ["broker", "clients", "coalition", "bench"]
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", *code], capture_output=True, text=True, check=True
        ).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _nats_version() -> str:
    from bench.rows.nats import nats_server_binary

    binary = nats_server_binary()
    if binary is None:
        return "absent"
    try:
        return subprocess.run(
            [binary, "--version"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": model,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "cryptography": cryptography.__version__,
        "grpcio": grpc.__version__,
        "nats_server": _nats_version(),
    }


async def run(
    mode: str,
    systems: Sequence[str],
    out: Path,
    profile: Profiling | None = None,
    envelope: str = "v2",
    dump: Path | None = None,
    rounds: int | None = None,
) -> dict[str, Any]:
    plan = plan_for(mode)
    if rounds:
        plan = dataclasses.replace(plan, rounds=rounds)
    began = time.monotonic()
    durations: dict[str, float] = {}
    results: dict[str, RowResult] = {}
    with tempfile.TemporaryDirectory(prefix="coalition-bench-") as tmp:
        workdir = Path(tmp)
        pki = workdir / "pki"
        t = time.monotonic()
        # v2 needs hybrid signing keys; v1 needs Ed25519-only ones (the broker takes v1
        # only from partners whose certificate holds no ML-DSA-65 key).
        make_dev_pki(pki, PARTNERS, OPERATORS, time.time_ns() // 1_000_000, ml_dsa=envelope == "v2")
        durations["pki_s"] = round(time.monotonic() - t, 2)
        progress(f"dev PKI for {', '.join(PARTNERS)} in {durations['pki_s']} s")
        t = time.monotonic()
        workload = workdir / "workload.pkl"
        seal_workload(pki, plan.total, workload, envelope)
        ids = [m.message_id for m in load_workload(workload)]
        durations["seal_s"] = round(time.monotonic() - t, 2)
        progress(
            f"sealed {plan.total} {envelope} envelopes ({PAYLOAD_BYTES} B, 3 recipients"
            + (f", batches of {SEAL_BATCH}" if envelope == "v2" else "")
            + ") "
            f"in {durations['seal_s']} s"
        )
        workers = Workers(workload)
        try:
            for rnd in range(1, plan.rounds + 1):
                for system in systems:
                    try:
                        got = await run_row(system, plan, pki, workdir, workers, ids, profile, rnd)
                    except Exception as exc:
                        progress(f"{system}: FAILED: {exc!r}")
                        got = RowResult(system, message_ids=ids, error=traceback.format_exc())
                        workers.close()  # their state is unknown: start afresh
                        workers = Workers(workload)
                    if system in results:
                        results[system].merge(got)
                    else:
                        results[system] = got
                    durations[f"{system}_s"] = round(results[system].seconds, 1)
        finally:
            workers.close()
    if dump is not None:
        report.dump_deliveries(dump, results.values(), PUBLISHERS)
    rows, details = [], {}
    for r in results.values():
        row, d = report.row_metrics(r)
        rows.append(row)
        details[r.system] = d
    durations["total_s"] = round(time.monotonic() - began, 1)
    return {
        "benchmark": "coalition vs peers (bench.run)",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "mode": mode,
        "quick": mode != "full",
        "git_commit": _git_commit(),
        "machine": _machine(),
        "durations": durations,
        "workload": {
            "partners": list(PARTNERS),
            "publishers": list(PUBLISHERS),
            "receivers": list(RECEIVERS),
            "label": LABEL_TEXT,
            "payload_bytes": PAYLOAD_BYTES,
            "envelope": envelope,
            "seal_batch": SEAL_BATCH if envelope == "v2" else 1,
            "phases": [asdict(p) for p in plan.phases],
            "rounds": plan.rounds,
            "latency_from": "scheduled send time (open loop) to opened at recipient, time.time_ns",
            "cpu_counted": "server process only (user+sys from /proc/PID/stat), saturation phases",
        },
        "rows": rows,
        "details": details,
        "ratios": report.ratios(rows, details),
        "targets": report.targets(rows, details),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Coalition vs NATS, JetStream and a no-op gRPC relay.")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="about 1 minute (make bench-quick)")
    size.add_argument("--smoke", action="store_true", help="tiny run for tests; not for numbers")
    p.add_argument(
        "--rows",
        help=f"comma-separated rows (default: all of {','.join(SYSTEMS)}; "
        f"--smoke: {','.join(SMOKE_ROWS)})",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    p.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record py-spy (collapsed stacks) of each row's server and first receiver "
        "during one phase into DIR (read them with python -m bench.flame); CPU numbers "
        "of a profiled run are inflated",
    )
    p.add_argument(
        "--profile-phase",
        default="saturation",
        choices=("saturation", "load-500", "load-2000"),
        help="the phase --profile records (default saturation)",
    )
    p.add_argument(
        "--profile-gil",
        action="store_true",
        help="--profile counts only samples holding the GIL (the Python work)",
    )
    p.add_argument(
        "--profile-native",
        action="store_true",
        help="--profile records C frames too (py-spy then pauses the process at each "
        "sample, which inflates latency)",
    )
    p.add_argument(
        "--dump-deliveries",
        type=Path,
        metavar="CSV",
        help="also write every delivery of the open-loop phases to CSV (row, round, phase, "
        "message index, sender, recipient, scheduled send and opened-at time in ns, "
        "latency in ms) for bench.tail to read",
    )
    p.add_argument(
        "--rounds",
        type=report.at_least_one,
        help="rounds per row, at least 1 (default: the mode's, 2 for a full run)",
    )
    p.add_argument(
        "--envelope",
        choices=ENVELOPE_VERSIONS,
        default="v2",
        help=f"envelope version every row sends (default v2: batches of {SEAL_BATCH} under "
        "one hybrid-signed root, one epoch key per recipient; v1: one signature and one "
        "HPKE encapsulation per recipient per message)",
    )
    args = p.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    default = tuple(s for s in SYSTEMS if s != "coalition-cluster-1")
    systems = tuple(args.rows.split(",")) if args.rows else SMOKE_ROWS if args.smoke else default
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        p.error(f"unknown rows: {', '.join(unknown)}")
    profile = (
        Profiling(args.profile, args.profile_phase, args.profile_gil, args.profile_native)
        if args.profile
        else None
    )
    doc = asyncio.run(
        run(mode, systems, args.out, profile, args.envelope, args.dump_deliveries, args.rounds)
    )
    kept = report.write(args.out, doc)
    print(
        f"\nCoalition bench ({mode}, envelope {args.envelope}), {doc['date']}, "
        f"commit {doc['git_commit'][:12]}, "
        f"{doc['machine']['cpus']} CPUs, {doc['durations']['total_s']} s"
    )
    print(report.table(doc["rows"], doc["details"]))
    print(f"\nwrote {args.out}" + (f" (previous kept as {kept})" if kept else ""))
    return 1 if any("error" in d for d in doc["details"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
