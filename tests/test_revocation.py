"""Revocation: serials in any spelling tools print, reloaded on SIGHUP, and live calls of a
newly revoked certificate ended at once. A real broker process over mTLS."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from cryptography import x509

from broker.config import ConfigError, load_config
from broker.revocation import parse_serial, serial_hex
from clients.sdk import ClientError, PartnerClient, secure_channel
from coalition.labels import parse_label
from coalition.pki import load_operator
from coalition.v1 import exchange_pb2, exchange_pb2_grpc
from tests.broker_process import ConfiguredBroker
from tests.helpers import admit, eventually, now_ms, operator, partner, policy, running_broker
from tests.test_broker_ops import kor_with_cert, new_kor_tls, pem

LABEL = parse_label("NATO SECRET // REL TO KOR, USA")
T = TypeVar("T")


def openssl_serial(cert: x509.Certificate) -> str:
    """The serial as `openssl x509 -noout -serial` prints it: whole bytes, uppercase."""
    digits = f"{cert.serial_number:X}"
    return "serial=" + ("0" * (len(digits) % 2)) + digits


def colon_serial(cert: x509.Certificate) -> str:
    """The serial as other tools print it: lowercase bytes joined by colons."""
    digits = f"{cert.serial_number:x}"
    digits = "0" * (len(digits) % 2) + digits
    return ":".join(digits[i : i + 2] for i in range(0, len(digits), 2))


# -- spellings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "11d49af",
        "011D49AF",
        "serial=011D49AF",
        "0x11d49af",
        "0X011D49AF",
        "01:1d:49:af",
        "01:1D:49:AF",
        " 01 1d 49 af ",
        "0000011d49af",
    ],
)
def test_every_spelling_names_the_same_serial(text: str) -> None:
    assert parse_serial(text) == 0x11D49AF


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("", "holds no hexadecimal digits"),
        ("0x", "holds no hexadecimal digits"),
        ("serial=", "holds no hexadecimal digits"),
        ("11d49ag", "is not hexadecimal"),
        ("11-d4-9a", "is not hexadecimal"),
        ("1" * 41, "longer than a certificate serial"),
    ],
)
def test_unparsable_serial_is_a_config_error(entry: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(f'[broker]\nrevoked_serials = ["011D49AF", {json.dumps(entry)}]\n')
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert "revoked_serials" in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize(
    "spell",
    [
        openssl_serial,
        colon_serial,
        lambda c: f"0x{c.serial_number:X}",
        lambda c: f"{c.serial_number:x}",
    ],
    ids=["openssl", "colons", "0x", "plain"],
)
async def test_a_revoked_serial_is_refused_however_it_is_spelled(
    spell: object, pki: Path, tmp_path: Path
) -> None:
    assert callable(spell)
    cert, key_pem = kor_cert_with_leading_zero(pki)
    b = await running_broker(pki, tmp_path / "broker", revoked_serials=(spell(cert),))
    try:
        await admit(pki, b.port, policy("KOR"))
        async with PartnerClient(
            kor_with_cert(pki, pem(cert), key_pem), f"127.0.0.1:{b.port}"
        ) as c:
            with pytest.raises(ClientError) as info:
                await c.directory()
        assert info.value.status == grpc.StatusCode.UNAUTHENTICATED
        assert "revoked" in info.value.message
        [entry] = await b.audit.query(kind="auth.refused")
        assert entry.decision == "cert_revoked"
    finally:
        await b.stop(grace=1)


# -- a real broker process ------------------------------------------------------------------


def kor_cert_with_leading_zero(pki: Path) -> tuple[x509.Certificate, bytes]:
    """A new KOR TLS certificate whose serial openssl prints with a leading zero (the
    spelling that used to revoke nothing); about one certificate in eight has one."""
    for _ in range(200):
        cert, key_pem = new_kor_tls(pki, now_ms())
        if openssl_serial(cert).startswith("serial=0"):
            return cert, key_pem
    raise AssertionError("no serial with a leading zero in 200 certificates")


def printed_serial(cert: x509.Certificate, path: Path) -> str:
    """What an operator pastes: the real openssl's output when it is installed (checked to
    match openssl_serial), else the same spelling made here."""
    expected = openssl_serial(cert)
    exe = shutil.which("openssl")
    if exe is None:
        return expected
    path.write_bytes(pem(cert))
    out = subprocess.run(
        [exe, "x509", "-noout", "-serial", "-in", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.strip()
    assert out == expected
    return out


class Feed(AsyncIterator[T]):
    """Request side of a raw streaming call, fed by put()."""

    def __init__(self) -> None:
        self.q: asyncio.Queue[T | None] = asyncio.Queue()

    def put(self, item: T) -> None:
        self.q.put_nowait(item)

    def __aiter__(self) -> Feed[T]:
        return self

    async def __anext__(self) -> T:
        item = await self.q.get()
        if item is None:
            raise StopAsyncIteration
        return item


async def final_status(call: grpc.aio.Call, timeout: float = 10) -> tuple[grpc.StatusCode, str]:
    """The status a streaming call ended with (bounded: a call that never ends fails)."""
    code = await asyncio.wait_for(call.code(), timeout)
    return code, await call.details() or ""


@pytest.fixture
def broker_proc(pki: Path, tmp_path: Path) -> Iterator[ConfiguredBroker]:
    config = tmp_path / "broker.toml"
    config.write_text("[broker]\nrevoked_serials = []\n")
    b = ConfiguredBroker(pki, tmp_path / "data", extra_args=["--config", str(config)])
    try:
        yield b
    finally:
        b.cleanup()


async def test_sighup_revocation_ends_live_streams_and_refuses_new_calls(
    pki: Path, tmp_path: Path, broker_proc: ConfiguredBroker
) -> None:
    cert, key_pem = kor_cert_with_leading_zero(pki)
    op1_cert = x509.load_pem_x509_certificate(load_operator(pki / "operators" / "op1").tls_cert_pem)
    await broker_proc.start()
    port = broker_proc.port
    target = f"127.0.0.1:{port}"
    for code in ("KOR", "USA"):
        await admit(pki, port, policy(code))
    kor_creds = kor_with_cert(pki, pem(cert), key_pem)
    async with (
        partner(pki, "USA", port) as usa,
        PartnerClient(kor_creds, target) as kor,
        secure_channel(target, kor_creds.ca_pem, pem(cert), key_pem) as kor_raw,
    ):
        await usa.register_keys()
        stub = exchange_pb2_grpc.ExchangeStub(kor_raw)
        # KOR's live streams: a Subscribe caught up and waiting, a Publish stream in use.
        sub_req: Feed[exchange_pb2.SubscribeRequest] = Feed()
        sub_req.put(
            exchange_pb2.SubscribeRequest(open=exchange_pb2.SubscribeOpen(topics=["intel.>"]))
        )
        sub = stub.Subscribe(sub_req)
        first = await asyncio.wait_for(sub.read(), 10)
        assert isinstance(first, exchange_pb2.SubscribeResponse) and first.status.caught_up
        pub_req: Feed[exchange_pb2.PublishRequest] = Feed()
        pub = stub.Publish(pub_req)
        sealed = await kor.seal(b"before revocation", topic="intel.a", label=LABEL)
        pub_req.put(exchange_pb2.PublishRequest(batch_id=1, envelopes=[sealed.envelope]))
        answer = await asyncio.wait_for(pub.read(), 10)
        assert isinstance(answer, exchange_pb2.PublishResponse)
        [ok] = answer.results
        assert ok.outcome == exchange_pb2.ACCEPTED
        # USA's stream must outlive KOR's revocation.
        usa_sub = usa.subscribe(["intel.>"])
        usa_got: list[str] = []

        async def usa_reads() -> None:
            async for d in usa_sub:
                usa_got.append((await usa.open(d)).header.message_id)
                await usa_sub.ack([d.offset])

        usa_task = asyncio.create_task(usa_reads())
        await eventually(lambda: usa_got == [sealed.message_id], timeout=10)

        kor_serial = printed_serial(cert, tmp_path / "kor.crt")
        assert kor_serial.startswith("serial=0")  # the spelling that used to revoke nothing
        broker_proc_config = tmp_path / "broker.toml"
        broker_proc_config.write_text(
            "[broker]\n"
            f"revoked_serials = [{json.dumps(kor_serial)}, {json.dumps(colon_serial(op1_cert))}]\n"
        )
        broker_proc.signal(signal.SIGHUP)

        assert await final_status(sub) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "the client certificate has been revoked",
        )
        assert (await final_status(pub))[0] == grpc.StatusCode.UNAUTHENTICATED
        # New calls with the revoked certificates are refused; everyone else is served.
        with pytest.raises(ClientError) as info:
            await kor.directory(refresh=True)
        assert info.value.status == grpc.StatusCode.UNAUTHENTICATED
        assert "revoked" in info.value.message
        async with operator(pki, "op1", port) as op1:
            with pytest.raises(ClientError) as info:
                await op1.partners()
            assert info.value.status == grpc.StatusCode.UNAUTHENTICATED
        assert not usa_task.done()
        assert "KOR" in (await usa.directory(refresh=True)).peers

        # A file that does not parse changes nothing: the revocations stay in force.
        broker_proc_config.write_text('[broker]\nrevoked_serials = ["not-a-serial"]\n')
        broker_proc.signal(signal.SIGHUP)
        await eventually(lambda: "reload failed" in broker_proc.log(), timeout=10)
        with pytest.raises(ClientError) as info:
            await kor.directory(refresh=True)
        assert info.value.status == grpc.StatusCode.UNAUTHENTICATED
        assert broker_proc.proc is not None and broker_proc.proc.poll() is None

        async with operator(pki, "op2", port) as op2:
            [reload_entry] = await op2.audit(kind="revocation.reloaded")
            ended = [
                e
                for e in await op2.audit(kind="auth.refused")
                if "in progress was ended" in json.loads(e.detail_json)["reason"]
            ]
        assert sorted(json.loads(reload_entry.detail_json)["added"]) == sorted(
            [serial_hex(cert.serial_number), serial_hex(op1_cert.serial_number)]
        )
        assert sorted(json.loads(e.detail_json)["method"] for e in ended) == [
            "/coalition.v1.Exchange/Publish",
            "/coalition.v1.Exchange/Subscribe",
        ]
        assert {(e.actor, e.partner, e.decision) for e in ended} == {
            ("urn:coalition:partner:KOR", "KOR", "cert_revoked")
        }
        usa_task.cancel()
        await asyncio.gather(usa_task, return_exceptions=True)
        await usa_sub.aclose()
    broker_proc.signal(signal.SIGTERM)
    assert await broker_proc.wait_exit() == 0
