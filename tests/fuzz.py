"""Wire fuzzer: mutated requests on every RPC of the Exchange and Admin services.

``python -m tests.fuzz --n 20000 --seed 1`` runs it against a fresh broker process
(its own PKI and data in a temporary directory) and prints a JSON report; ``make fuzz``
runs a long one, and tests/test_fuzz.py a short one. Every case is seeded, so a failure
names the case that shows it and replays with the same seed.

Each case takes a valid serialized request of one RPC (as a partner, an operator, a
pending partner, an unknown partner or an unknown operator) and mutates it: flipped
bytes, a cut, inserted bytes, a message of another type, random bytes, or a valid
Publish request whose envelope bytes are mutated. What must hold:

- no crash: the broker process is alive and its health check SERVING at the end;
- no hang: every call has a deadline, and none reaches it;
- no UNKNOWN or INTERNAL status;
- no silent drop: a Publish stream answers every request before the first malformed
  one, in order, one result per envelope, and ends with a status (OK only when it
  answered every request); every stream ends with a status;
- every refusal audited: each refused call maps to the audit kind that must record
  it (``auth.refused`` for a caller the service does not admit, ``request.malformed``
  for bytes that do not parse, else the service's own ``*.refused`` kind), each
  refused envelope to a ``publish.refused`` entry; the counts per kind must equal the
  entries the broker wrote during the run (an entry with ``count`` in its detail, a
  summary of several refusals, counts that many).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.sdk import PartnerClient, secure_channel
from coalition import envelope as env
from coalition.labels import label_to_proto, parse_label
from coalition.pki import load_operator, load_partner, make_dev_pki
from coalition.policy import policy_to_proto
from coalition.v1 import admin_pb2, envelope_pb2, exchange_pb2, label_pb2, policy_pb2
from tests.helpers import ALL_PARTNERS, OPERATORS, admit, now_ms, operator, policy
from tests.test_broker_faults import BrokerProcess

EX = "/coalition.v1.Exchange/"
AD = "/coalition.v1.Admin/"
# Who calls, and which service admits them (None: neither).
IDENTITIES = {"KOR": EX, "op1": AD, "GBR": None, "ROGUE": None, "op3": None}
SERVER_STREAMING = {"QueryAudit", "ExportAudit"}
REQUEST_TYPES: dict[str, type[Message]] = {
    "Publish": exchange_pb2.PublishRequest,
    "Subscribe": exchange_pb2.SubscribeRequest,
    "Directory": exchange_pb2.DirectoryRequest,
    "RegisterKeys": exchange_pb2.RegisterKeysRequest,
    "Recipients": exchange_pb2.RecipientsRequest,
    "AdmitPartner": admin_pb2.AdmitPartnerRequest,
    "ListPartners": admin_pb2.ListPartnersRequest,
    "ShowPartner": admin_pb2.ShowPartnerRequest,
    "GetPolicy": admin_pb2.GetPolicyRequest,
    "SetPolicy": admin_pb2.SetPolicyRequest,
    "ApproveProposal": admin_pb2.DecideProposalRequest,
    "RejectProposal": admin_pb2.DecideProposalRequest,
    "ListProposals": admin_pb2.ListProposalsRequest,
    "PolicyHistory": admin_pb2.PolicyHistoryRequest,
    "Suspend": admin_pb2.StatusChangeRequest,
    "Reinstate": admin_pb2.StatusChangeRequest,
    "QueryAudit": admin_pb2.QueryAuditRequest,
    "VerifyAudit": admin_pb2.VerifyAuditRequest,
    "ExportAudit": admin_pb2.ExportAuditRequest,
    "Stats": admin_pb2.StatsRequest,
    "WhoReceives": admin_pb2.WhoReceivesRequest,
}
RPCS = list(REQUEST_TYPES)
# Verifying or exporting the whole audit log costs the broker O(entries): fewer of those.
WEIGHTS = [0.2 if rpc in ("VerifyAudit", "ExportAudit") else 1.0 for rpc in RPCS]
# Records read from a server-streaming answer before the fuzzer cancels it.
STREAM_READ_MAX = 20
EXCHANGE_RPCS = ("Publish", "Subscribe", "Directory", "RegisterKeys", "Recipients")
SERVICE_KIND = {
    "Subscribe": "subscribe.refused",
    "RegisterKeys": "keys.refused",
    "Recipients": "recipients.refused",
    "Directory": "directory.refused",
    "Publish": "publish.refused",
}
REFUSAL_KINDS = (
    "auth.refused",
    "request.malformed",
    "publish.refused",
    "subscribe.refused",
    "keys.refused",
    "recipients.refused",
    "directory.refused",
    "admin.refused",
)
BAD = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED)
DEADLINE_S = 20.0
# How a call ended: its status code and details.
Ended = tuple[grpc.StatusCode, str]
OK: Ended = (grpc.StatusCode.OK, "")
CLIENT_INTERNAL = "Internal error from Core"


def service(rpc: str) -> str:
    return EX if rpc in EXCHANGE_RPCS else AD


def mutate(rng: random.Random, raw: bytes, others: list[bytes]) -> tuple[str, bytes]:
    """One mutation of raw: (its name, the bytes)."""
    kind = rng.choice(("flip", "flip", "cut", "insert", "other", "random", "repeat"))
    b = bytearray(raw)
    if kind == "flip" and b:
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == "cut" and b:
        del b[rng.randrange(len(b)) :]
    elif kind == "insert":
        at = rng.randint(0, len(b))
        b[at:at] = rng.randbytes(rng.randint(1, 8))
    elif kind == "other":
        return kind, rng.choice(others)
    elif kind == "random":
        return kind, rng.randbytes(rng.randint(0, 64))
    elif kind == "repeat":
        return kind, bytes(b) * 2
    return kind, bytes(b)


def parses(rpc: str, raw: bytes) -> bool:
    try:
        REQUEST_TYPES[rpc].FromString(raw)
    except (DecodeError, RuntimeError, ValueError):
        return False
    return True


@dataclass
class Seeds:
    """Valid serialized requests for each RPC, and envelopes for Publish."""

    requests: dict[str, list[bytes]]
    envelopes: list[envelope_pb2.Envelope]
    signed: list[envelope_pb2.Envelope]

    def all(self) -> list[bytes]:
        return [r for rs in self.requests.values() for r in rs]


@dataclass
class Report:
    cases: int = 0
    calls: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    expected_kinds: Counter[str] = field(default_factory=Counter)
    audited_kinds: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    problem_kinds: Counter[str] = field(default_factory=Counter)
    publish_requests: int = 0
    publish_answered: int = 0
    alive: bool = False
    serving: bool = False
    seconds: float = 0.0

    def problem(self, case: int, text: str, kind: str) -> None:
        self.problem_kinds[kind] += 1
        if len(self.problems) < 50:
            self.problems.append(f"case {case}: {text}")
        else:
            self.problems[-1] = f"... and more (last: case {case}: {text})"

    def ok(self) -> bool:
        return (
            not self.problems
            and self.alive
            and self.serving
            and self.expected_kinds == self.audited_kinds
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok(),
            "cases": self.cases,
            "calls": self.calls,
            "seconds": round(self.seconds, 1),
            "statuses": dict(sorted(self.statuses.items())),
            "expected_refusal_entries": dict(sorted(self.expected_kinds.items())),
            "audited_refusal_entries": dict(sorted(self.audited_kinds.items())),
            "publish_requests_sent": self.publish_requests,
            "publish_requests_answered": self.publish_answered,
            "broker_alive": self.alive,
            "health_serving": self.serving,
            "problem_kinds": dict(sorted(self.problem_kinds.items())),
            "problems": self.problems,
        }


async def make_seeds(pki: Path, port: int, with_signed: bool = False) -> Seeds:
    label = parse_label("NATO SECRET // REL TO KOR, USA")
    lab = label_to_proto(label)
    target = f"127.0.0.1:{port}"
    async with PartnerClient(load_partner(pki / "partners" / "USA"), target) as usa:
        await usa.register_keys()
    async with PartnerClient(load_partner(pki / "partners" / "KOR"), target) as kor:
        await kor.register_keys()
        envs = [
            (await kor.seal(f"seed {i}".encode(), topic="intel.a", label=label)).envelope
            for i in range(8)
        ]
        bundle = kor.creds.bundle
        usa_peer = (await kor.directory()).peers["USA"]
        assert usa_peer.hpke_public is not None
        to_usa = [env.Recipient("USA", usa_peer.key_id, usa_peer.hpke_public)]
        signed: list[envelope_pb2.Envelope] = []
        if with_signed:
            # Envelopes KOR really signed, with edge values in the signed header: the
            # checks after the signature see them (sequence, time, precedence, topic).
            creds = kor.creds
            edges: list[dict[str, Any]] = [
                {"sequence": q} for q in (0, 2**63 - 1, 2**63, 2**64 - 1)
            ] + [
                {"created_ms": 0},
                {"created_ms": 2**63 - 1},
                {"created_ms": -(2**63)},
                {"precedence": 0},
                {"precedence": 2**31 - 1},
                {"topic": ""},
                {"topic": "intel." + "a" * 5000},
                {"topic": "intel.\x00"},
            ]
            for i, edge in enumerate(edges):
                fields: dict[str, Any] = {
                    "sequence": 10_000 + i,
                    "topic": "intel.a",
                    "precedence": 1,
                    "created_ms": now_ms(),
                    **edge,
                }
                try:
                    signed.append(
                        env.seal(
                            plaintext=b"edge",
                            sender="KOR",
                            signing_key=creds.signing_key,
                            signing_key_id=creds.signing_key_id,
                            label=lab,
                            content_type=env.INTEL_SUMMARY,
                            recipients=to_usa,
                            **fields,
                        )
                    )
                except ValueError:
                    pass  # the sealing side refuses it already
    usa_cert = load_partner(pki / "partners" / "USA").signing_cert_der
    pol = policy_to_proto(policy("USA"))
    ex: dict[str, list[Message]] = {
        "Publish": [
            exchange_pb2.PublishRequest(batch_id=1, envelopes=envs[:1]),
            exchange_pb2.PublishRequest(batch_id=2, envelopes=envs[1:4]),
        ],
        "Subscribe": [
            exchange_pb2.SubscribeRequest(
                open=exchange_pb2.SubscribeOpen(topics=["intel.>"], window=8)
            ),
            exchange_pb2.SubscribeRequest(ack=exchange_pb2.Ack(offsets=[1, 2, 3])),
        ],
        "Directory": [exchange_pb2.DirectoryRequest()],
        "RegisterKeys": [exchange_pb2.RegisterKeysRequest(bundle=bundle)],
        "Recipients": [exchange_pb2.RecipientsRequest(label=lab, topic="intel.a")],
        "AdmitPartner": [
            admin_pb2.AdmitPartnerRequest(
                partner="USA", signing_cert=usa_cert, policy=pol, reason="fuzz"
            )
        ],
        "ListPartners": [admin_pb2.ListPartnersRequest()],
        "ShowPartner": [admin_pb2.ShowPartnerRequest(partner="KOR")],
        "GetPolicy": [admin_pb2.GetPolicyRequest(partner="KOR")],
        "SetPolicy": [admin_pb2.SetPolicyRequest(policy=pol, reason="fuzz", expected_version=2)],
        "ApproveProposal": [admin_pb2.DecideProposalRequest(proposal_id="abc", reason="f")],
        "RejectProposal": [admin_pb2.DecideProposalRequest(proposal_id="abc", reason="f")],
        "ListProposals": [admin_pb2.ListProposalsRequest(all=True)],
        "PolicyHistory": [admin_pb2.PolicyHistoryRequest(partner="KOR")],
        "Suspend": [admin_pb2.StatusChangeRequest(partner="USA", reason="fuzz")],
        "Reinstate": [admin_pb2.StatusChangeRequest(partner="USA", reason="fuzz")],
        "QueryAudit": [admin_pb2.QueryAuditRequest(kind="auth", limit=5, tail=True)],
        "VerifyAudit": [admin_pb2.VerifyAuditRequest()],
        "ExportAudit": [admin_pb2.ExportAuditRequest()],
        "Stats": [admin_pb2.StatsRequest()],
        "WhoReceives": [admin_pb2.WhoReceivesRequest(label=lab, topic="intel.a")],
    }
    _ = label_pb2, policy_pb2  # the request types above embed these
    return Seeds({k: [m.SerializeToString() for m in v] for k, v in ex.items()}, envs, signed)


class Fuzzer:
    def __init__(self, pki: Path, port: int, seeds: Seeds, seed: int) -> None:
        self.pki, self.port, self.seeds, self.seed = pki, port, seeds, seed
        self.report = Report()
        self.channels: dict[str, grpc.aio.Channel] = {}
        self.others = seeds.all()
        # One Subscribe stream per partner at a time: a second one would supersede the
        # first (FAILED_PRECONDITION), possibly after the first's junk was audited.
        self.subscribing: dict[str, asyncio.Lock] = {}

    def channel(self, who: str) -> grpc.aio.Channel:
        ch = self.channels.get(who)
        if ch is None:
            if who.startswith("op"):
                o = load_operator(self.pki / "operators" / who)
                ch = secure_channel(
                    f"127.0.0.1:{self.port}", o.ca_pem, o.tls_cert_pem, o.tls_key_pem
                )
            else:
                p = load_partner(self.pki / "partners" / who)
                ch = secure_channel(
                    f"127.0.0.1:{self.port}", p.ca_pem, p.tls_cert_pem, p.tls_key_pem
                )
            self.channels[who] = ch
        return ch

    def expect_refusal(
        self, case: int, who: str, rpc: str, code: grpc.StatusCode, text: str
    ) -> None:
        """Count the audit entry that must record this refused call."""
        if IDENTITIES[who] != service(rpc):
            kind = "auth.refused"
        elif "is not a valid" in text:
            kind = "request.malformed"
        elif rpc in SERVICE_KIND:
            kind = SERVICE_KIND[rpc]
        elif service(rpc) == AD:
            kind = "admin.refused"
        else:
            self.report.problem(
                case, f"{rpc} as {who} refused {code.name} ({text}): no audit kind", "no audit kind"
            )
            return
        self.report.expected_kinds[kind] += 1
        if os.environ.get("FUZZ_DEBUG") and kind == "request.malformed":  # per method
            self.report.expected_kinds[f"{kind} {service(rpc)}{rpc}"] += 1

    def status(self, case: int, who: str, rpc: str, end: Ended) -> None:
        code, details = end
        if (
            code == grpc.StatusCode.INTERNAL
            and details == CLIENT_INTERNAL
            and rpc in ("Publish", "Subscribe")
            and IDENTITIES[who] != service(rpc)
        ):
            # The broker refused the caller as the stream opened, while the request was
            # being written: grpcio's asyncio client then reports INTERNAL instead of
            # the broker's status (grpc/grpc#36066). The refusal is still counted
            # against the audit log, which must hold its auth.refused entry.
            self.report.statuses["INTERNAL (client side, refused caller)"] += 1
            self.report.expected_kinds["auth.refused"] += 1
            return
        self.report.statuses[code.name] += 1
        if code in BAD:
            self.report.problem(case, f"{rpc} as {who}: {code.name}: {details}", code.name)
        elif code != grpc.StatusCode.OK:
            self.expect_refusal(case, who, rpc, code, details)

    async def one(self, case: int) -> None:
        rng = random.Random(self.seed * 1_000_003 + case)
        rpc = rng.choices(RPCS, WEIGHTS)[0]
        who = rng.choice(list(IDENTITIES))
        # Mostly callers the service admits, so the mutations reach the parsers.
        if rng.random() < 0.7:
            who = "KOR" if service(rpc) == EX else "op1"
        ch = self.channel(who)
        method = service(rpc) + rpc
        self.report.cases += 1
        if rpc == "Publish":
            await self.publish(case, rng, ch, who, method)
            return
        if rpc == "Subscribe":
            await self.subscribe(case, rng, ch, who, method)
            return
        _, raw = mutate(rng, rng.choice(self.seeds.requests[rpc]), self.others)
        self.report.calls += 1
        try:
            if rpc in SERVER_STREAMING:
                stream = ch.unary_stream(method, None, None)(raw, timeout=DEADLINE_S)
                read = 0
                async for _ in stream:
                    read += 1
                    if read == STREAM_READ_MAX:
                        stream.cancel()  # enough: the rest costs the broker, not the check
                        break
            else:
                await ch.unary_unary(method, None, None)(raw, timeout=DEADLINE_S)
        except grpc.aio.AioRpcError as err:
            self.status(case, who, rpc, (err.code(), err.details() or ""))
        else:
            self.status(case, who, rpc, OK)

    def publish_requests(self, rng: random.Random) -> list[bytes]:
        """1-4 requests; the last one is mutated (the bytes, or an envelope inside)."""
        reqs = [rng.choice(self.seeds.requests["Publish"]) for _ in range(rng.randint(0, 3))]
        if self.seeds.signed and rng.random() < 0.2:
            e = rng.choice(self.seeds.signed)
            reqs.append(exchange_pb2.PublishRequest(batch_id=8, envelopes=[e]).SerializeToString())
        elif rng.random() < 0.35:
            e = envelope_pb2.Envelope()
            e.CopyFrom(rng.choice(self.seeds.envelopes))
            part = rng.choice(("header", "ciphertext", "signature"))
            _, junk = mutate(rng, getattr(e, part), self.others)
            setattr(e, part, junk)
            reqs.append(exchange_pb2.PublishRequest(batch_id=9, envelopes=[e]).SerializeToString())
        else:
            reqs.append(mutate(rng, rng.choice(self.seeds.requests["Publish"]), self.others)[1])
        return reqs

    async def stream(
        self, ch: grpc.aio.Channel, method: str, reqs: list[bytes], lockstep: int
    ) -> tuple[list[bytes], Ended]:
        """Write reqs on a bidirectional stream; the first `lockstep` each wait for one
        answer before the next is written, the rest go at once, then half-close; read
        to the end. Writing only while the broker has not ended the stream keeps clear
        of grpcio's client reporting a refused stream as INTERNAL (grpc/grpc#36066)."""
        multi: Any = ch.stream_stream(method, None, None)
        call: Any = multi(timeout=DEADLINE_S)
        got: list[bytes] = []
        try:
            try:
                for i, raw in enumerate(reqs):
                    await call.write(raw)
                    if i < lockstep:
                        resp = await call.read()
                        if resp is grpc.aio.EOF:  # type: ignore[attr-defined]
                            break
                        got.append(resp)
                else:
                    await call.done_writing()
            except asyncio.InvalidStateError:
                pass  # the broker ended the stream: its status says why
            while (resp := await call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
                got.append(resp)
        except grpc.aio.AioRpcError as exc:
            return got, (exc.code(), exc.details() or "")
        return got, (await call.code(), await call.details() or "")

    async def publish(
        self, case: int, rng: random.Random, ch: grpc.aio.Channel, who: str, method: str
    ) -> None:
        reqs = self.publish_requests(rng)
        self.report.calls += len(reqs)
        self.report.publish_requests += len(reqs)
        # What the broker must answer: every request up to the first that does not parse.
        answerable: list[exchange_pb2.PublishRequest] = []
        for raw in reqs:
            if not parses("Publish", raw):
                break
            answerable.append(exchange_pb2.PublishRequest.FromString(raw))
        # Pipelined or in lockstep, at random: both must answer everything before junk.
        lockstep = rng.choice((0, len(reqs) - 1))
        raws, end = await self.stream(ch, method, reqs, lockstep)
        got = [exchange_pb2.PublishResponse.FromString(r) for r in raws]
        self.status(case, who, "Publish", end)
        self.report.publish_answered += len(got)
        if end[0] == grpc.StatusCode.OK and len(got) != len(reqs):
            self.report.problem(
                case,
                f"Publish ended OK with {len(got)} of {len(reqs)} answered",
                "silent drop: Publish ended OK with requests unanswered",
            )
        admitted = IDENTITIES[who] == EX
        if admitted and end[0] == grpc.StatusCode.INVALID_ARGUMENT:
            if len(got) != len(answerable):
                self.report.problem(
                    case,
                    f"Publish answered {len(got)} requests before the malformed one, "
                    f"{len(answerable)} parsed",
                    "Publish: answers before the malformed request",
                )
        for sent, resp in zip(answerable, got, strict=False):
            if resp.batch_id != sent.batch_id or len(resp.results) != len(sent.envelopes):
                self.report.problem(
                    case,
                    f"Publish response {resp.batch_id} ({len(resp.results)} results) "
                    f"does not answer request {sent.batch_id} ({len(sent.envelopes)} envelopes)",
                    "Publish: response does not match its request",
                )
            for r in resp.results:
                if r.outcome == exchange_pb2.REFUSED:
                    self.report.expected_kinds["publish.refused"] += 1
                    if r.status in ("UNKNOWN", "INTERNAL"):
                        self.report.problem(
                            case, f"envelope refused {r.status}: {r.reason}", f"envelope {r.status}"
                        )

    async def subscribe(
        self, case: int, rng: random.Random, ch: grpc.aio.Channel, who: str, method: str
    ) -> None:
        opened, ack = self.seeds.requests["Subscribe"]
        reqs = [opened, ack]
        at = rng.randrange(len(reqs))
        reqs[at] = mutate(rng, reqs[at], self.others)[1]
        if at == 0:
            reqs = reqs[:1]
        self.report.calls += len(reqs)
        # The open is answered (a status or a batch) before the acknowledgement goes;
        # then half-close: the broker settles the acknowledgements and ends the stream OK.
        async with self.subscribing.setdefault(who, asyncio.Lock()):
            _, end = await self.stream(ch, method, reqs, lockstep=len(reqs) - 1)
        self.status(case, who, "Subscribe", end)

    async def run(self, n: int, concurrency: int) -> None:
        cases: Iterator[int] = iter(range(n))

        async def worker() -> None:
            for case in cases:
                try:
                    await self.one(case)
                except Exception as exc:  # a fuzzer bug must not pass as a broker success
                    self.report.problem(
                        case, f"fuzzer error {type(exc).__name__}: {exc}", "fuzzer error"
                    )

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    async def close(self) -> None:
        for ch in self.channels.values():
            await ch.close(None)


async def audited(pki: Path, port: int, since_seq: int) -> Counter[str]:
    """Refusal entries written after since_seq, per kind (a summary counts its count)."""
    out: Counter[str] = Counter()
    async with operator(pki, "op1", port) as op:
        async for rec in op.stub.ExportAudit(admin_pb2.ExportAuditRequest(), timeout=120):
            if rec.WhichOneof("kind") != "entry":
                continue
            e = rec.entry
            kind = e.kind.removesuffix(".summary")  # a summary counts its count
            if e.seq <= since_seq or kind not in REFUSAL_KINDS:
                continue
            detail = json.loads(e.detail_json or "{}")
            out[kind] += int(detail.get("count", 1)) if isinstance(detail, dict) else 1
            if os.environ.get("FUZZ_DEBUG") and e.kind == "request.malformed":
                out[f"{e.kind} {detail['method']}"] += 1
    return out


async def last_seq(pki: Path, port: int) -> int:
    async with operator(pki, "op1", port) as op:
        rows = [
            r async for r in op.stub.QueryAudit(admin_pb2.QueryAuditRequest(tail=True, limit=1))
        ]
    return rows[-1].seq if rows else 0


async def fuzz(
    n: int,
    seed: int,
    concurrency: int = 16,
    workdir: Path | None = None,
    signed: bool = False,
) -> Report:
    """Run n cases against a fresh broker process; the report says what held."""
    own = workdir is None
    root = Path(tempfile.mkdtemp(prefix="fuzz-")) if workdir is None else workdir
    pki = root / "pki"
    make_dev_pki(pki, ALL_PARTNERS, OPERATORS, now_ms(), force=True)
    proc = BrokerProcess(pki, root / "data")
    started = time.monotonic()
    try:
        await proc.start()
        for code in ("KOR", "USA"):
            await admit(pki, proc.port, policy(code))
        async with operator(pki, "op1", proc.port) as op1:  # GBR stays pending
            creds = load_partner(pki / "partners" / "GBR")
            await op1.admit("GBR", creds.signing_cert_der, policy_to_proto(policy("GBR")), "f")
        seeds = await make_seeds(pki, proc.port, signed)
        since = await last_seq(pki, proc.port)
        fz = Fuzzer(pki, proc.port, seeds, seed)
        try:
            await fz.run(n, concurrency)
            rep = fz.report
            assert proc.proc is not None
            rep.alive = proc.proc.poll() is None
            if rep.alive:
                async with operator(pki, "op1", proc.port) as op:
                    health = health_pb2_grpc.HealthStub(op.channel)
                    resp = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                    rep.serving = resp.status == health_pb2.HealthCheckResponse.SERVING
                # Refusals past the audit threshold are counted and written as summaries
                # when their interval closes or at shutdown: stop the broker (it writes
                # them), start it again on the same data, and read what it recorded.
                proc.signal(signal.SIGTERM)
                if await proc.wait_exit() != 0:
                    raise AssertionError(f"broker did not stop cleanly:\n{proc.log()}")
                await proc.start()
                rep.audited_kinds = await audited(pki, proc.port, since)
        finally:
            await fz.close()
        rep.seconds = time.monotonic() - started
        if not rep.alive:
            rep.problem(-1, "broker died:\n" + proc.log()[-3000:], "broker died")
        return rep
    finally:
        proc.cleanup()
        if own:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--n", type=int, default=int(os.environ.get("FUZZ_N", "20000")))
    ap.add_argument("--seed", type=int, default=int(os.environ.get("FUZZ_SEED", "1")))
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument(
        "--signed",
        action="store_true",
        default=bool(os.environ.get("FUZZ_SIGNED")),
        help="also publish envelopes KOR signed with edge values in their headers",
    )
    ns = ap.parse_args(argv)
    rep = asyncio.run(fuzz(ns.n, ns.seed, ns.concurrency, signed=ns.signed))
    print(json.dumps(rep.as_dict(), indent=2))
    return 0 if rep.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
