"""The broker across real hosts: one broker per port and per data directory, listen
addresses, the broker certificate's names, and what clients say when TLS fails.

Real broker processes (`python -m broker.cli serve`), real CLIs as subprocesses, real
mutual TLS on loopback. Waits are bounded so a failure ends; nothing is timed.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from broker.server import Broker
from clients.sdk import BrokerTlsError, ClientError, OperatorClient, call
from coalition.cli_common import EXIT_UNREACHABLE
from coalition.pki import issue_broker, load_operator, make_dev_pki
from coalition.v1 import admin_pb2, admin_pb2_grpc
from tests.helpers import admit, broker_argv, now_ms, operator, policy, running_broker
from tests.node_helpers import free_port, node, write_config
from tests.test_admin_cli import Run, cli
from tests.test_broker_faults import ROOT, BrokerProcess

pytestmark = pytest.mark.slow

# gRPC Core's own log lines look like "E1130 23:58:31.671771    2667 file.cc:83] ...".
GRPC_LOG_LINE = re.compile(r"^[DIWEF]\d{4} \d\d:\d\d:\d\d", re.MULTILINE)


def assert_one_line(err: str) -> str:
    """stderr is one sentence: no traceback, no gRPC Core log line."""
    assert "Traceback" not in err, err
    assert not GRPC_LOG_LINE.search(err), err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def procs(pki: Path, tmp_path: Path) -> Iterator[list[BrokerProcess]]:
    """Broker processes made by a test; any still running at the end are killed."""
    made: list[BrokerProcess] = []
    try:
        yield made
    finally:
        for b in made:
            b.cleanup()


def broker_proc(procs: list[BrokerProcess], pki: Path, data: Path, port: int) -> BrokerProcess:
    data.parent.mkdir(parents=True, exist_ok=True)
    b = BrokerProcess(pki, data, port=port)
    procs.append(b)
    return b


def run_broker(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """`coalition-broker serve ARGS` expected to refuse to start: it must exit in time
    (before the fixes some of these started and served; killed, the test fails)."""
    argv = [sys.executable, "-m", "broker.cli", "serve", *args]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the broker started instead of refusing: {err.decode()}") from None
    return subprocess.CompletedProcess(argv, proc.returncode, out.decode(), err.decode())


async def list_partners_fresh(pki: Path, target: str) -> list[str]:
    """ListPartners on a new connection (a new TCP connection each time)."""
    async with OperatorClient(load_operator(pki / "operators" / "op1"), target) as op:
        return [p.partner for p in await op.partners()]


async def admin_list(target: str, pki: Path) -> Run:
    """`coalition-admin partners list` as op1 of ``pki``, in a subprocess."""
    identity = str(pki / "operators" / "op1")
    return await cli("--broker", target, "--identity", identity, "partners", "list")


# -- one broker per port and per data directory ---------------------------------------------


async def test_second_broker_on_the_same_port_is_refused(
    pki: Path, tmp_path: Path, procs: list[BrokerProcess]
) -> None:
    first = broker_proc(procs, pki, tmp_path / "a" / "data", free_port())
    await first.start()
    await admit(pki, first.port, policy("KOR"))
    second = run_broker(
        *broker_argv(pki, tmp_path / "b" / "data", first.port, tmp_path / "b" / "port")[4:]
    )
    assert second.returncode == 1, second
    line = assert_one_line(second.stderr)
    assert f"address in use: 127.0.0.1:{first.port}" in line, line
    assert not (tmp_path / "b" / "data" / "audit.db").exists()  # nothing written
    # Every new connection reaches the first broker, the one holding KOR.
    seen = [await list_partners_fresh(pki, f"127.0.0.1:{first.port}") for _ in range(6)]
    assert seen == [["KOR"]] * 6


async def test_second_broker_on_the_same_data_is_refused_until_the_first_dies(
    pki: Path, tmp_path: Path, procs: list[BrokerProcess]
) -> None:
    data = tmp_path / "data"
    first = broker_proc(procs, pki, data, free_port())
    await first.start()
    assert first.proc is not None
    await admit(pki, first.port, policy("KOR"))
    audit_before = (data / "audit.db").stat().st_size
    other_port = free_port()
    second = run_broker(*broker_argv(pki, data, other_port, tmp_path / "port2")[4:])
    assert second.returncode == 1, second
    line = assert_one_line(second.stderr)
    assert f"data directory {data} in use by pid {first.proc.pid}" in line, line
    assert (data / "audit.db").stat().st_size == audit_before
    assert await list_partners_fresh(pki, f"127.0.0.1:{first.port}") == ["KOR"]

    # kill -9: the kernel drops the lock with the process; a new broker starts at once.
    first.signal(signal.SIGKILL)
    assert await first.wait_exit() == -signal.SIGKILL
    again = broker_proc(procs, pki, data, other_port)
    again.starts = first.starts  # its own port and log files beside the first's
    await again.start()
    assert await list_partners_fresh(pki, f"127.0.0.1:{other_port}") == ["KOR"]
    assert again.proc is not None
    assert (data / "broker.lock").read_text().strip() == str(again.proc.pid)


# -- listen addresses -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "says"),
    [
        ("localhost", "'localhost' has no port"),
        ("127.0.0.1:70000", "port must be a number from 0 to 65535"),
        ("::1", "put an IPv6 address in brackets"),
    ],
)
def test_listen_needs_a_port_in_range(pki: Path, tmp_path: Path, listen: str, says: str) -> None:
    r = run_broker("--pki", str(pki), "--data", str(tmp_path / "d"), "--listen", listen)
    assert r.returncode == 1, r
    line = assert_one_line(r.stderr)
    assert line.startswith("coalition-broker: cannot start: listen address"), line
    assert says in line, line


def test_listen_from_the_config_file_needs_a_port(pki: Path, tmp_path: Path) -> None:
    conf = tmp_path / "broker.toml"
    conf.write_text(f'[broker]\nlisten = "localhost"\ndata_dir = "d"\n[pki]\ndir = "{pki}"\n')
    r = run_broker("--config", str(conf))
    assert r.returncode == 1, r
    assert "listen address 'localhost' has no port" in assert_one_line(r.stderr)


async def test_ipv6_listen_with_brackets_serves(pki: Path, tmp_path: Path) -> None:
    b = await running_broker(pki, tmp_path / "data", listen="[::1]:0")
    try:
        assert await list_partners_fresh(pki, f"[::1]:{b.port}") == []
    finally:
        await b.stop(grace=1)


def test_missing_pki_directory_is_one_sentence(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    r = run_broker("--pki", str(missing), "--data", str(tmp_path / "d"), "--listen", "127.0.0.1:0")
    assert r.returncode == 1, r
    line = assert_one_line(r.stderr)
    assert f"no PKI directory {missing}" in line, line
    assert f"coalition-keys dev-pki {missing}" in line and "make pki" in line, line


# -- the broker certificate's names ---------------------------------------------------------


def keys(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clients.keys.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def named_pki(pki: Path, tmp_path: Path) -> Path:
    """The session PKI with its broker re-issued, by the real CLI, for 127.0.0.2 and
    broker.kor.example (besides the loopback names)."""
    d = tmp_path / "pki"
    shutil.copytree(pki, d)
    r = keys("issue-broker", str(d), "--force", "--ip", "127.0.0.2", "--host", "broker.kor.example")
    assert r.returncode == 0, r.stderr
    assert "127.0.0.2" in r.stdout and "broker.kor.example" in r.stdout
    return d


@pytest.fixture
async def on_127_0_0_2(named_pki: Path, tmp_path: Path) -> AsyncIterator[Broker]:
    b = await running_broker(named_pki, tmp_path / "data", listen="127.0.0.2:0")
    try:
        yield b
    finally:
        await b.stop(grace=1)


async def admin_by_name(pki: Path, port: int, name: str) -> list[str]:
    """ListPartners from 127.0.0.1:port, verifying the broker's certificate as ``name``.

    No resolver entry for ``name`` exists here, so the TLS target name is set with
    grpc's ``grpc.ssl_target_name_override``: the client connects to 127.0.0.1 and checks
    the certificate against ``name`` exactly as it would after resolving ``name`` (the
    host name check is the same; only the address lookup is skipped)."""
    creds = load_operator(pki / "operators" / "op1")
    channel = grpc.aio.secure_channel(
        f"127.0.0.1:{port}",
        grpc.ssl_channel_credentials(creds.ca_pem, creds.tls_key_pem, creds.tls_cert_pem),
        options=[("grpc.ssl_target_name_override", name)],
    )
    try:
        stub = admin_pb2_grpc.AdminStub(channel)
        resp = await call(stub.ListPartners(admin_pb2.ListPartnersRequest()))
        return [p.partner for p in resp.partners]
    finally:
        await channel.close(None)


async def test_broker_reached_by_a_second_loopback_address(
    named_pki: Path, on_127_0_0_2: Broker
) -> None:
    # Hostname verification is on (grpc's default): 127.0.0.2 must be in the certificate.
    assert await list_partners_fresh(named_pki, f"127.0.0.2:{on_127_0_0_2.port}") == []


async def test_broker_reached_by_a_dns_name(named_pki: Path, tmp_path: Path) -> None:
    b = await running_broker(named_pki, tmp_path / "data")
    try:
        assert await admin_by_name(named_pki, b.port, "broker.kor.example") == []
        with pytest.raises(BrokerTlsError, match="name mismatch"):
            await admin_by_name(named_pki, b.port, "broker.usa.example")
    finally:
        await b.stop(grace=1)


async def test_certificate_without_the_address_is_refused_by_name(
    pki: Path, tmp_path: Path
) -> None:
    # The default certificate names loopback only: 127.0.0.2 fails hostname verification.
    b = await running_broker(pki, tmp_path / "data", listen="127.0.0.2:0")
    try:
        with pytest.raises(BrokerTlsError, match="name mismatch") as info:
            await list_partners_fresh(pki, f"127.0.0.2:{b.port}")
        assert "issue-broker --host NAME --ip ADDR" in str(info.value)
        r = await admin_list(f"127.0.0.2:{b.port}", pki)
        assert r.code == EXIT_UNREACHABLE, r
        assert "name mismatch" in assert_one_line(r.err)
    finally:
        await b.stop(grace=1)


def test_issue_broker_validates_names(pki: Path, tmp_path: Path) -> None:
    d = tmp_path / "pki"
    shutil.copytree(pki, d)
    for args, says in [
        (["--host", "bad_name.example"], "invalid broker host name 'bad_name.example'"),
        (["--host=-x.example"], "invalid broker host name"),
        (["--host", "10.0.0.5"], "an IP address goes in --ip"),
        (["--ip", "10.0.0.256"], "invalid broker IP address '10.0.0.256'"),
        (["--ip", "broker.example"], "a name goes in --host"),
    ]:
        r = keys("issue-broker", str(d), "--force", *args)
        assert r.returncode == 1, (args, r)
        assert says in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    assert (d / "broker" / "tls.crt").read_bytes() == (pki / "broker" / "tls.crt").read_bytes()
    r = keys("dev-pki", str(tmp_path / "dev"), "--partners", "KOR", "--operators", "op1",
             "--broker-host", "broker.kor.example", "--broker-ip", "fd00::5")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "localhost, broker.kor.example, 127.0.0.1, ::1, fd00::5" in r.stdout


# -- what clients say when the broker's certificate does not verify -----------------------


@pytest.fixture
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PKI from another CA: its operator and partner do not trust the session broker."""
    d = tmp_path_factory.mktemp("other-pki")
    make_dev_pki(d, ["KOR"], ["op1"], now_ms(), force=True)
    return d


@pytest.fixture
async def broker(pki: Path, tmp_path: Path) -> AsyncIterator[Broker]:
    b = await running_broker(pki, tmp_path / "data")
    try:
        yield b
    finally:
        await b.stop(grace=1)


async def test_admin_cli_names_a_broker_from_another_ca(broker: Broker, other_pki: Path) -> None:
    r = await admin_list(f"127.0.0.1:{broker.port}", other_pki)
    assert r.code == EXIT_UNREACHABLE, r
    line = assert_one_line(r.err)
    assert line == (
        f"coalition-admin: broker at 127.0.0.1:{broker.port}: the broker's certificate is "
        "not signed by this coalition's CA (pki/ca.crt); this identity and the broker come "
        "from different PKIs: use the ca.crt the broker's certificate was issued by, or "
        "re-issue the broker from this CA"
    ), line


async def test_node_cli_names_a_broker_from_another_ca(
    broker: Broker, other_pki: Path, tmp_path: Path
) -> None:
    conf = write_config(tmp_path / "kor" / "node.toml", other_pki, "KOR", broker.port)
    r = await node(
        "publish", "--config", str(conf), "--topic", "intel.ground",
        "--label", "NATO SECRET // REL TO KOR", "-", stdin=b"Armour moving north\n",
    )  # fmt: skip
    assert r.code == EXIT_UNREACHABLE, r
    line = assert_one_line(r.err)
    assert line.startswith(f"coalition-node: broker 127.0.0.1:{broker.port}: "), line
    assert "the broker's certificate is not signed by this coalition's CA (pki/ca.crt)" in line


async def test_a_lagging_clock_is_named(pki: Path, tmp_path: Path) -> None:
    """A client whose clock is three days behind the broker's certificate: simulated by
    issuing the certificate (same CA) three days ahead of this computer's clock."""
    d = tmp_path / "pki"
    shutil.copytree(pki, d)
    issue_broker(d, now_ms() + 3 * 86_400_000, force=True)
    b = await running_broker(d, tmp_path / "data")
    try:
        r = await admin_list(f"127.0.0.1:{b.port}", d)
        assert r.code == EXIT_UNREACHABLE, r
        line = assert_one_line(r.err)
        assert (
            "not yet valid by this computer's clock" in line and "clock is probably behind" in line
        )
    finally:
        await b.stop(grace=1)


async def test_an_unreachable_broker_stays_unreachable(pki: Path) -> None:
    """Not every UNAVAILABLE is a TLS failure: a closed port is still 'unreachable'."""
    port = free_port()
    with pytest.raises(ClientError) as info:
        async with operator(pki, "op1", port) as op:
            await op.partners()
    assert not isinstance(info.value, BrokerTlsError)
    r = await admin_list(f"127.0.0.1:{port}", pki)
    assert r.code == EXIT_UNREACHABLE and "unreachable" in assert_one_line(r.err), r
