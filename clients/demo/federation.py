"""`coalition-demo --federation`: three nations, each with its own broker, CA and
operators, exchanging what their release policies allow.

NATO, KOR and USA each get their own PKI directory (CA, broker, gateway certificate, two
operators, two partners), their own broker process with a federation trust file naming
the other two, and a `coalition-node` daemon per partner. Each nation's operators admit
the other two nations' gateways under the two-person rule, each with a release policy
(what this nation forwards to that one) and an origination policy (what that one may
bring in). Then:

1. the gateways are admitted (op1 proposes, op1 cannot approve, op2 approves);
2. a KOR summary released to NATO reaches the NATO partners and the USA partner in the
   NATO group, and nobody else (USA applies its own policy to what it receives);
3. a SIGINT item stays inside the nations whose release policies carry SIGINT, and
   reaches there only the partner that holds it;
4. a NATO report to every nation crosses each border once: delivered exactly once and
   never forwarded again (the three brokers are linked in a triangle);
5. a NATO maritime report released to USA is refused at USA's border: USA's
   origination policy for NATO takes ground reports only (a signed receipt says so);
6. KOR's operator suspends the KOR-NATO link: a summary sent afterwards does not cross to
   NATO (it still reaches USA), and a NATO report sealed for KOR's partners (NATO has
   not suspended KOR) is refused at KOR's border;
7. each nation's audit chain, exported, verifies offline with `coalition-admin audit
   verify --file EXPORT --ca CA`; then, from the exports alone, every custody receipt in
   one nation's chain verifies against the receiving nation's CA and names that nation's
   own record of the envelope.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clients.demo.procs import Proc, python_module, wait_for_file
from clients.demo.scenario import OPERATORS, TOPICS, Demo, Published
from clients.node.inbox import Entry, Inbox
from clients.sdk import OperatorClient
from coalition.clock import wall_clock_ms
from coalition.federation import load_trust_file, receipt_from_audit, verify_receipt
from coalition.labels import COMPARTMENT, Classification, parse_label
from coalition.pki import issue_gateway, load_ca, load_operator, load_partner, make_dev_pki
from coalition.policy import NO_KEY_BUNDLE, PartnerPolicy, PartnerStatus, policy_to_proto
from coalition.v1 import admin_pb2, audit_pb2, federation_pb2

# Each nation's partners: (code, groups, holds SIGINT). Partner codes speak for their
# nation ("KOR-JCS" for KOR); the groups are what REL TO names.
NATIONS: dict[str, tuple[tuple[str, frozenset[str], bool], ...]] = {
    "NATO": (
        ("NATO-HQ", frozenset({"NATO"}), False),
        ("NATO-MARCOM", frozenset({"NATO"}), False),
    ),
    "KOR": (
        ("KOR-JCS", frozenset({"PACIFIC"}), False),
        ("KOR-NIS", frozenset({"PACIFIC"}), True),
    ),
    "USA": (
        ("USA-EUCOM", frozenset({"NATO"}), False),
        ("USA-INDOPACOM", frozenset({"PACIFIC"}), True),
    ),
}
# Release policy of nation A for peer B: (groups released to, SIGINT released).
RELEASE: dict[tuple[str, str], tuple[frozenset[str], bool]] = {
    ("KOR", "NATO"): (frozenset({"NATO"}), False),
    ("KOR", "USA"): (frozenset({"NATO", "PACIFIC"}), True),
    ("NATO", "KOR"): (frozenset({"PACIFIC"}), False),
    ("NATO", "USA"): (frozenset({"NATO", "PACIFIC"}), False),
    ("USA", "NATO"): (frozenset({"NATO"}), False),
    ("USA", "KOR"): (frozenset({"PACIFIC"}), True),
}
PARTNERS = tuple(code for members in NATIONS.values() for code, _, _ in members)


def nation_of(code: str) -> str:
    return next(n for n, members in NATIONS.items() if any(c == code for c, _, _ in members))


# What a nation's gateway may bring in (its origination policy's topics), where not all:
# USA takes only ground reports from NATO.
ORIGINATION: dict[tuple[str, str], tuple[str, ...]] = {("USA", "NATO"): ("intel.ground",)}


def policy(
    code: str,
    groups: Iterable[str],
    sigint: bool,
    level: Classification = Classification.SECRET,
    publish: tuple[str, ...] = TOPICS,
) -> PartnerPolicy:
    """A partner's (or a gateway's) policy: cleared to NATO SECRET on intel topics."""
    return PartnerPolicy(
        partner=code,
        status=PartnerStatus.ACTIVE,
        clearances={"NATO": level},
        groups=frozenset(groups),
        categories={COMPARTMENT: frozenset({"SIGINT"})} if sigint else {},
        publish_topics=publish,
        subscribe_topics=TOPICS,
        origination_ceilings={"NATO": level},
    )


@dataclass
class Nation:
    """One nation's directory, broker process and address."""

    code: str
    dir: Path
    port: int
    broker: Proc | None = None

    @property
    def pki(self) -> Path:
        return self.dir / "pki"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def trust_file(self) -> Path:
        return self.dir / "federation.toml"

    @property
    def ca_cert(self) -> Path:
        return self.pki / "ca" / "ca.crt"

    def operator(self, name: str) -> OperatorClient:
        return OperatorClient(load_operator(self.pki / "operators" / name), self.address)

    def ca_der(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return load_ca(self.pki).cert.public_bytes(serialization.Encoding.DER)


class FederationDemo(Demo):
    """The federation scenario; ``run()`` plays the seven steps."""

    partners = PARTNERS
    cell_width = 18
    summary_title = "Who received what (or why not, by the partner's own broker):"

    def __init__(self, work: Path, *, out: Callable[[str], None], deadline_ms: int) -> None:
        super().__init__(work, out=out, deadline_ms=deadline_ms)
        self.nations: dict[str, Nation] = {}
        self.receipts: list[dict[str, Any]] = []
        self.chains: dict[str, dict[str, Any]] = {}
        # (nation, message id) -> why that nation's broker refused it at its border.
        self.border: dict[tuple[str, str], str] = {}

    # -- processes --------------------------------------------------------------------------
    def setup(self) -> None:
        """Each nation's PKI, trust file and broker config (ports chosen first: each trust
        file names the others' endpoints)."""
        now = wall_clock_ms()
        for code, members in NATIONS.items():
            n = Nation(code, self.work / code.lower(), _free_port())
            self.nations[code] = n
            make_dev_pki(n.pki, [c for c, _, _ in members], OPERATORS, now)
            issue_gateway(n.pki, code, now)
            self.say(
                "pki",
                f"{code}: own CA, broker, gateway {code}, operators op1 op2, partners "
                + ", ".join(c for c, _, _ in members),
            )
        for code, n in self.nations.items():
            lines = [f'nation = "{code}"']
            for peer, p in self.nations.items():
                if peer != code:
                    ca = n.dir / f"{peer.lower()}-ca.crt"
                    ca.write_bytes(p.ca_cert.read_bytes())
                    lines += ["", "[[peers]]", f'nation = "{peer}"', f'ca = "{ca.name}"']
                    lines.append(f'endpoint = "{p.address}"')
            n.trust_file.write_text("\n".join(lines) + "\n")
            (n.dir / "broker.toml").write_text(f'[federation]\nfile = "{n.trust_file.name}"\n')
        self.say("trust", "each trust file names the other two nations' CAs and brokers")

    def start_brokers(self) -> None:
        for code, n in self.nations.items():
            port_file = n.dir / "broker.port"
            n.broker = Proc(
                f"broker {code}",
                python_module(
                    "broker.cli",
                    "serve",
                    "--config",
                    str(n.dir / "broker.toml"),
                    "--pki",
                    str(n.pki),
                    "--data",
                    str(n.dir / "broker"),
                    "--listen",
                    n.address,
                    "--operators",
                    ",".join(OPERATORS),
                    "--audit-checkpoint-every",
                    "25",
                    "--port-file",
                    str(port_file),
                ),
                self.work / "logs" / f"broker-{code}.log",
            )
            n.broker.start()
        for code, n in self.nations.items():
            assert n.broker is not None
            wait_for_file(n.dir / "broker.port", n.broker, timeout=60)
            self.say("broker", f"{code} serving on {n.address} (pid {n.broker.pid})")

    def node_config(self, code: str) -> Path:
        n = self.nations[nation_of(code)]
        cfg = n.dir / "nodes" / code / "node.toml"
        if not cfg.exists():
            cfg.parent.mkdir(parents=True, exist_ok=True)
            cfg.write_text(
                f'broker = "{n.address}"\n'
                f'identity = "{n.pki / "partners" / code}"\n'
                f'inbox = "{cfg.parent / "inbox.db"}"\n'
                'topics = ["intel.>"]\n'
                f'\n[federation]\nfile = "{n.trust_file}"\n'
            )
        return cfg

    def inbox(self, code: str) -> list[Entry]:
        path = self.node_config(code).parent / "inbox.db"
        if not path.exists():
            return []
        box = Inbox(path)
        try:
            return box.entries()
        finally:
            box.close()

    def shutdown(self) -> None:
        """Every node, then every broker; each group signalled at once, then waited for
        (a federated broker waits out its grace period for its peers' open streams)."""
        _terminate(self.nodes.values())
        for proc in self.nodes.values():
            proc.stop()
        brokers = [n.broker for n in self.nations.values() if n.broker is not None]
        _terminate(brokers)
        for n in self.nations.values():
            if n.broker is not None:
                code = n.broker.stop()
                self.say("broker", f"{n.code} stopped (exit {code})")

    # -- helpers ----------------------------------------------------------------------------
    def operator(self, name: str) -> OperatorClient:  # the base class's: KOR's operators
        return self.nations["KOR"].operator(name)

    async def decisions(self, label: str, topic: str, sender: str = "") -> dict[str, str]:
        """Each partner's decision now: the sender's broker decides for its own partners
        and for each peer nation's gateway (its release policy); a partner abroad then
        gets its own broker's decision, if its nation's gateway is released to."""
        found: dict[str, dict[str, str]] = {}
        for code, n in self.nations.items():
            async with n.operator("op1") as op:
                resp = await op.who_receives(parse_label(label), topic)
            found[code] = {d.partner: d.reason for d in resp.decisions}
        home = nation_of(sender)
        out = {}
        for code in PARTNERS:
            there = nation_of(code)
            if there == home:
                out[code] = found[home].get(code, "not_admitted")
                continue
            # The sender's release to that nation (a gateway has no key bundle of its own:
            # who-receives says so when it allows), then that nation's standing for the
            # sender's gateway (suspended or not admitted there: nothing comes in).
            gateway = found[home].get(there, "not_admitted")
            inbound = found[there].get(home, "not_admitted")
            if gateway not in ("allow", NO_KEY_BUNDLE):
                out[code] = gateway
            elif inbound in ("suspended", "not_admitted"):
                out[code] = f"gateway_{inbound}"
            else:
                out[code] = found[there].get(code, "not_admitted")
        return out

    async def audit(self, nation: str, kind: str) -> list[audit_pb2.AuditEntry]:
        async with self.nations[nation].operator("op1") as op:
            return list(await op.audit(kind=kind))

    async def crossed(self, nation: str, message_id: str) -> int:
        """How many times nation's broker stored message_id from a peer."""
        entries = await self.audit(nation, "federation.received")
        return sum(e.message_id == message_id for e in entries)

    async def refusals(self, nation: str, message_id: str) -> dict[str, str]:
        """Partner (or peer) -> reason, for nation's decisions not to deliver message_id."""
        out: dict[str, str] = {}
        for e in await self.audit(nation, "deliver.denied"):
            ids = json.loads(e.detail_json or "{}").get("message_ids", [e.message_id])
            if message_id in ids:
                out[e.partner] = e.decision
        return out

    def expect_only(self, step: str, pub: Published, want: set[str]) -> None:
        """Exactly want (besides the sender) hold pub, each once."""
        for code in PARTNERS:
            if code == pub.sender:
                continue
            n = sum(e.message_id == pub.message_id for e in self.inbox(code))
            if code in want:
                self.expect(step, f"{code} holds it once", n == 1, f"{n} copies")
            else:
                self.expect(step, f"{code} does not hold it", n == 0, f"{n} copies" if n else "")

    # -- the scenario -----------------------------------------------------------------------
    async def run(self) -> None:
        self.setup()
        self.start_brokers()
        for code, members in NATIONS.items():
            for partner, groups, sigint in members:
                await self.admit_in(code, partner, policy(partner, groups, sigint))
        self.say("admit", "each nation's partners admitted by its own op1 and op2")
        for code in PARTNERS:
            self.start_node(code)
        self.say("nodes", f"node daemons started for {', '.join(PARTNERS)} (real processes)")
        for code in PARTNERS:
            if not await self.wait_connected_in(code):
                raise RuntimeError(f"node {code} did not connect; see {self.nodes[code].log}")
        await self.step1_gateways()
        await self.step2_kor_summary()
        await self.step3_sigint()
        await self.step4_triangle()
        await self.step5_origination()
        await self.step6_suspension()
        await self.step7_receipts_and_audit()

    async def admit_in(
        self, nation: str, code: str, pol: PartnerPolicy, cert: bytes | None = None
    ) -> None:
        n = self.nations[nation]
        if cert is None:
            cert = load_partner(n.pki / "partners" / code).signing_cert_der
        async with n.operator("op1") as op1, n.operator("op2") as op2:
            resp = await op1.admit(code, cert, policy_to_proto(pol), f"{code} joins {nation}")
            await op2.approve(resp.proposal.proposal_id, "second operator agrees")

    async def wait_connected_in(self, code: str, timeout: float = 20) -> bool:
        n = self.nations[nation_of(code)]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            async with n.operator("op1") as op:
                if any(p.partner == code and p.connected for p in await op.partners()):
                    return True
            await asyncio.sleep(0.1)
        return False

    async def step1_gateways(self) -> None:
        self.out("\n1. Each nation's operators admit the other two nations' gateways")
        await self.admit_by_cli("KOR", "NATO")
        for (a, b), (groups, sigint) in RELEASE.items():
            if (a, b) == ("KOR", "NATO"):
                continue
            n = self.nations[a]
            async with n.operator("op1") as op1, n.operator("op2") as op2:
                resp = await op1.admit(
                    b,
                    self.nations[b].ca_der(),
                    policy_to_proto(
                        policy(b, groups, sigint, publish=ORIGINATION.get((a, b), TOPICS))
                    ),
                    f"federation with {b}",
                )
                await op2.approve(resp.proposal.proposal_id, "second operator agrees")
            released = ", ".join(sorted(groups)) + (" + SIGINT" if sigint else "")
            takes = ", ".join(ORIGINATION.get((a, b), TOPICS))
            self.say(
                "admit",
                f"{a} admits gateway {b} with {b}'s CA; releases to it: {released}; "
                f"takes from it: {takes}",
            )
        links = await self.wait_links()
        for code, peers in links.items():
            self.say(
                "link",
                f"{code}: "
                + ", ".join(
                    f"{p.nation} {'up' if p.connected else 'DOWN'} "
                    f"({p.partners_learned} partners learned)"
                    for p in peers
                ),
            )
        self.expect(
            "1",
            "all six links are up and each learned its peer's partners",
            all(p.connected and p.partners_learned == 2 for ps in links.values() for p in ps),
        )

    async def admit_by_cli(self, a: str, b: str) -> None:
        """a's operators admit b's gateway with the real `coalition-admin` commands."""
        n = self.nations[a]
        groups, sigint = RELEASE[(a, b)]
        flags = ["--clearance", "NATO=SECRET", "--ceiling", "NATO=SECRET"]
        flags += [x for g in sorted(groups) for x in ("--group", g)]
        flags += ["--category", "SAC=SIGINT"] if sigint else []
        flags += ["--subscribe", "intel.>", "--publish", "intel.>"]
        ca = n.dir / f"{b.lower()}-ca.crt"  # the copy its trust file names
        add = ["federation", "add", b, "--ca", ca.name, *flags, "--reason", f"federation with {b}"]
        self.say("admin", f"{a} op1: coalition-admin {shlex.join(add)}")
        done = await self.admin(a, "op1", "--json", *add)
        proposal = ""
        if done.returncode == 0:
            proposal = json.loads(done.stdout).get("proposal", {}).get("proposal_id", "")
        if not proposal:
            raise RuntimeError(f"federation add {b} at {a} failed: {done.stderr.strip()}")
        own = await self.admin(a, "op1", "policy", "approve", proposal, "--reason", "mine")
        self.expect(
            "1",
            f"{a}'s op1 cannot approve its own proposal",
            own.returncode == 3 and "PERMISSION_DENIED" in own.stderr,
            own.stderr.strip().splitlines()[-1] if own.stderr.strip() else f"exit {own.returncode}",
        )
        self.say("admin", f"{a} op2: coalition-admin policy approve {proposal}")
        ok = await self.admin(a, "op2", "policy", "approve", proposal, "--reason", "agreed")
        if ok.returncode != 0:
            raise RuntimeError(f"approving {b} at {a} failed: {ok.stderr.strip()}")
        released = ", ".join(sorted(groups)) + (" + SIGINT" if sigint else "")
        self.say("admit", f"{a} admits gateway {b} with {b}'s CA; releases to it: {released}")

    async def admin(self, nation: str, op: str, *args: str) -> subprocess.CompletedProcess[str]:
        """`coalition-admin` as nation's operator op, run in that nation's directory."""
        n = self.nations[nation]
        conn = ["--broker", n.address, "--identity", str(n.pki / "operators" / op)]
        return await _run(python_module("clients.admin.cli", *conn, *args), cwd=n.dir)

    async def peers(self, nation: str) -> list[admin_pb2.FederationPeer]:
        async with self.nations[nation].operator("op1") as op:
            return list((await op.peers()).peers)

    async def wait_links(self, timeout: float = 20) -> dict[str, list[admin_pb2.FederationPeer]]:
        """Each nation's peers, once every link is up and learned its peer's partners."""
        deadline = time.monotonic() + timeout
        while True:
            links = {code: await self.peers(code) for code in self.nations}
            done = all(p.connected and p.partners_learned == 2 for ps in links.values() for p in ps)
            if done or time.monotonic() > deadline:
                return links
            await asyncio.sleep(0.1)

    async def step2_kor_summary(self) -> None:
        self.out("\n2. KOR-JCS shares a summary released to NATO: NATO SECRET // REL TO NATO")
        pub = await self.publish(
            "kor-summary",
            "KOR-JCS",
            "NATO SECRET // REL TO NATO",
            "Hostile armoured brigade redeploying north",
            "An armoured brigade (est. 90 tanks) is moving toward the northern crossing "
            "points; rail loading observed at two depots.",
            precedence="IMMEDIATE",
        )
        want = {"NATO-HQ", "NATO-MARCOM", "USA-EUCOM"}
        got = await self.wait_received(pub, sorted(want))
        for code in sorted(want):
            ms = got.get(code)
            self.expect(
                "2",
                f"{code} receives it across the border within {self.deadline_ms / 1000:g} s",
                ms is not None and ms <= self.deadline_ms,
                f"{ms} ms" if ms is not None else "not received",
            )
        await asyncio.sleep(0.5)
        self.expect_only("2", pub, want)
        usa = await self.refusals("USA", pub.message_id)
        self.expect(
            "2",
            "USA's broker applied its own policy: USA-INDOPACOM (PACIFIC) is not released to",
            usa.get("USA-INDOPACOM") == "not_releasable",
            f"USA decided: {usa}",
        )

    async def step3_sigint(self) -> None:
        self.out(
            "\n3. KOR-NIS publishes a SIGINT item: NATO SECRET // REL TO NATO, PACIFIC // SIGINT"
        )
        pub = await self.publish(
            "kor-sigint",
            "KOR-NIS",
            "NATO SECRET // REL TO NATO, PACIFIC // SIGINT",
            "Intercepted brigade net traffic",
            "Command net traffic indicates an H-hour within 72 hours.",
            precedence="PRIORITY",
        )
        await self.wait_received(pub, ["USA-INDOPACOM"])
        await asyncio.sleep(0.5)
        self.expect_only("3", pub, {"USA-INDOPACOM"})
        kor = await self.refusals("KOR", pub.message_id)
        self.expect(
            "3",
            "KOR did not release it to NATO (KOR's release policy for NATO has no SIGINT)",
            kor.get("NATO") == "missing_category",
            f"KOR decided: {kor}",
        )
        self.expect(
            "3", "NATO's broker never received it", await self.crossed("NATO", pub.message_id) == 0
        )

    async def step4_triangle(self) -> None:
        self.out("\n4. NATO-HQ reports to every nation; the three brokers form a triangle")
        pub = await self.publish(
            "nato-report",
            "NATO-HQ",
            "NATO SECRET // REL TO NATO, PACIFIC",
            "Missile launch preparations detected",
            "Launch preparations reported by HQ fusion cell.",
            precedence="FLASH",
        )
        want = {c for c in PARTNERS if c != "NATO-HQ"}
        await self.wait_received(pub, sorted(want))
        await asyncio.sleep(1.0)
        self.expect_only("4", pub, want)
        counts = {n: await self.crossed(n, pub.message_id) for n in self.nations}
        self.expect(
            "4",
            "stored once by KOR and once by USA, never back in NATO",
            counts == {"NATO": 0, "KOR": 1, "USA": 1},
            ", ".join(f"{n}: {c}" for n, c in counts.items()),
        )
        onward = {
            n: (await self.refusals(n, pub.message_id)).get(p)
            for n, p in (("KOR", "USA"), ("USA", "KOR"))
        }
        self.expect(
            "4",
            "KOR and USA did not forward NATO's message again (one hop)",
            set(onward.values()) == {"forwarded"},
            str(onward),
        )

    async def step5_origination(self) -> None:
        self.out("\n5. NATO-HQ reports on intel.maritime: USA takes only ground reports from NATO")
        pub = await self.publish(
            "nato-maritime",
            "NATO-HQ",
            "NATO SECRET // REL TO NATO",
            "Submarine sighted in the northern approaches",
            "A submarine was sighted at periscope depth.",
            topic="intel.maritime",
        )
        got = await self.wait_received(pub, ["NATO-MARCOM"])
        self.expect("5", "NATO-MARCOM receives it at home", "NATO-MARCOM" in got)
        refused: list[audit_pb2.AuditEntry] = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not refused:
            refused = [
                e
                for e in await self.audit("USA", "federation.refused")
                if e.message_id == pub.message_id
            ]
            await asyncio.sleep(0.1)
        self.expect(
            "5",
            "NATO released it to USA; USA's origination policy for NATO refused it at the border",
            "USA-EUCOM" in pub.recipients
            and [e.decision for e in refused] == ["topic_not_permitted"],
            f"USA decided: {refused[0].decision}" if refused else "no refusal recorded",
        )
        receipts = [
            e
            for e in await self.audit("NATO", "federation.receipt")
            if e.message_id == pub.message_id
        ]
        self.expect(
            "5",
            "NATO holds USA's signed receipt saying so",
            [e.decision for e in receipts] == ["refused"],
            ", ".join(e.decision for e in receipts),
        )
        self.expect(
            "5",
            "USA-EUCOM does not receive it",
            all(e.message_id != pub.message_id for e in self.inbox("USA-EUCOM")),
        )

    async def step6_suspension(self) -> None:
        self.out("\n6. KOR's operator suspends the KOR-NATO link: nothing crosses either way")
        async with self.nations["KOR"].operator("op1") as op1:
            await op1.suspend("NATO", "release to NATO paused by KOR's release authority")
        suspended = time.monotonic()
        self.say("admin", "KOR op1 suspended gateway NATO (lowering: one operator suffices)")
        link: admin_pb2.FederationPeer | None = None
        while time.monotonic() - suspended < 5:
            link = next(p for p in await self.peers("KOR") if p.nation == "NATO")
            if not link.connected:
                break
            await asyncio.sleep(0.02)
        closed_ms = int((time.monotonic() - suspended) * 1000)
        self.expect(
            "6",
            "KOR's link to NATO is closed at once",
            link is not None and not link.connected,
            f"closed {closed_ms} ms after the suspension" if link and not link.connected else "",
        )
        pub = await self.publish(
            "after-suspension",
            "KOR-JCS",
            "NATO SECRET // REL TO NATO",
            "Reserve division alerted",
            "A reserve division has been placed on alert.",
        )
        got = await self.wait_received(pub, ["USA-EUCOM"])
        self.expect("6", "USA-EUCOM still receives it (the KOR-USA link is up)", "USA-EUCOM" in got)
        await asyncio.sleep(1.0)
        for code in ("NATO-HQ", "NATO-MARCOM"):
            self.expect(
                "6",
                f"{code} does not receive it",
                all(e.message_id != pub.message_id for e in self.inbox(code)),
            )
        self.expect(
            "6",
            "nothing sent after the suspension crossed to NATO",
            await self.crossed("NATO", pub.message_id) == 0,
        )
        # The other way: NATO has not suspended KOR, so NATO-HQ still seals for KOR's
        # partners; KOR's broker refuses NATO's gateway, so it does not cross.
        pub = await self.publish(
            "nato-after-suspension",
            "NATO-HQ",
            "NATO SECRET // REL TO PACIFIC",
            "Naval group leaving port",
            "A surface action group left its home port at dawn.",
        )
        got = await self.wait_received(pub, ["USA-INDOPACOM"])
        self.expect("6", "USA-INDOPACOM receives NATO-HQ's report", "USA-INDOPACOM" in got)
        await asyncio.sleep(1.0)
        sealed_for = {"KOR-JCS", "KOR-NIS"} & set(pub.recipients)
        self.expect(
            "6",
            "sealed by NATO for KOR's partners, it does not cross: KOR refuses NATO's gateway",
            sealed_for == {"KOR-JCS", "KOR-NIS"}
            and await self.crossed("KOR", pub.message_id) == 0
            and all(e.message_id != pub.message_id for c in sealed_for for e in self.inbox(c)),
        )
        link = next(p for p in await self.peers("NATO") if p.nation == "KOR")
        self.expect(
            "6",
            "NATO's link to KOR is down, and says why",
            not link.connected and "suspended" in link.last_error,
            link.last_error,
        )

    async def step7_receipts_and_audit(self) -> None:
        self.out("\n7. The three audit chains and the custody receipts are verified offline")
        # The three nations at once: each exports its chain, then verifies it offline
        # (no broker: only the export and the nation's CA certificate).
        results = await asyncio.gather(*(self.export_and_verify(c) for c in self.nations))
        for code, (out, verify) in zip(self.nations, results, strict=True):
            doc: dict[str, Any] = {}
            try:
                doc = json.loads(verify.stdout)
            except ValueError:
                pass
            self.chains[code] = {"exit": verify.returncode, **doc}
            self.expect(
                "7",
                f"{code}'s audit chain, exported, verifies offline with only {code}'s CA",
                out.returncode == 0 and verify.returncode == 0,
                f"{doc.get('entries')} entries, {doc.get('checkpoints')} signed checkpoints"
                if verify.returncode == 0
                else (doc.get("problem") or verify.stderr.strip()[-200:] or out.stderr[-200:]),
            )
        # Each receipt in one nation's export, against the other nation's CA (from the
        # trust file) and the other nation's export: what crossed, proved by both chains.
        chains = {code: _entries(n.dir / "audit-export.jsonl") for code, n in self.nations.items()}
        for code, n in self.nations.items():
            trust = load_trust_file(n.trust_file)
            for e in chains[code]:
                if e["kind"] == "federation.refused":
                    self.border[(code, e["message_id"])] = e["decision"]
                if e["kind"] != "federation.receipt":
                    continue
                d = json.loads(e["detail_json"])
                row: dict[str, Any] = {"from": code, "to": d["peer"], "message_id": e["message_id"]}
                try:
                    r = verify_receipt(
                        receipt_from_audit(d), trust.peers[d["peer"]].ca_cert, wall_clock_ms()
                    )
                    row["outcome"] = federation_pb2.ReceiptOutcome.Name(r.outcome)
                    row["peer_audit_seq"] = r.audit_seq
                    theirs = next((x for x in chains[d["peer"]] if x["seq"] == r.audit_seq), {})
                    row["peer_record"] = theirs.get("kind", "")
                    row["ok"] = (
                        theirs.get("kind", "").startswith("federation.")
                        and theirs.get("message_id") == r.message_id == e["message_id"]
                        and r.envelope_sha256.hex() == d["sha256"]
                    )
                except ValueError as exc:
                    row["ok"], row["problem"] = False, str(exc)
                self.receipts.append(row)
        bad = [r for r in self.receipts if not r["ok"]]
        self.expect(
            "7",
            "every custody receipt verifies against the receiving nation's CA and names that "
            "nation's own record of the envelope in its exported chain",
            bool(self.receipts) and not bad,
            f"{len(self.receipts)} receipts" + (f"; {len(bad)} bad" if bad else ""),
        )

    async def export_and_verify(
        self, code: str
    ) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
        """`coalition-admin audit export`, then `audit verify --file EXPORT --ca CA`."""
        n = self.nations[code]
        export = n.dir / "audit-export.jsonl"
        out = await self.admin(code, "op2", "audit", "export", "--out", str(export))
        verify = await _run(
            python_module(
                "clients.admin.cli",
                "--json",
                "audit",
                "verify",
                "--file",
                str(export),
                "--ca",
                str(n.ca_cert),
            )
        )
        return out, verify

    # -- the summary ------------------------------------------------------------------------
    def withheld(self) -> dict[tuple[str, str], str]:
        """(partner, message id) -> the reason a partner's own broker refused it at its
        border, read from that nation's audit log ("border_<reason>")."""
        return {
            (code, message_id): "border_" + reason
            for (nation, message_id), reason in self.border.items()
            for code in PARTNERS
            if nation_of(code) == nation
        }

    def report(self, elapsed: float) -> dict[str, Any]:
        doc = super().report(elapsed)
        doc["nations"] = {
            code: {"partners": [c for c, _, _ in m], "broker": self.nations[code].address}
            for code, m in NATIONS.items()
            if code in self.nations
        }
        doc["receipts"] = self.receipts
        doc["audits"] = self.chains  # per nation: `coalition-admin audit verify --file`
        chains = list(self.chains.values())
        doc["audit"] = (
            {
                "ok": len(chains) == len(NATIONS) and all(c.get("ok") for c in chains),
                "entries": sum(int(c.get("entries", 0)) for c in chains),
                "checkpoints": sum(int(c.get("checkpoints", 0)) for c in chains),
                "problem": "; ".join(str(c["problem"]) for c in chains if c.get("problem")),
            }
            if chains
            else {}
        )
        return doc


def _entries(export: Path) -> list[dict[str, Any]]:
    """The entries of an exported audit chain (JSON lines), or none if it is missing."""
    if not export.exists():
        return []
    lines = (json.loads(line) for line in export.read_text().splitlines() if line.strip())
    return [r for r in lines if r.get("record") == "entry"]


def _terminate(procs: Iterable[Proc]) -> None:
    for proc in procs:
        if proc.popen is not None and proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGTERM)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=cwd
    )
    out, err = await proc.communicate()
    return subprocess.CompletedProcess(argv, proc.returncode or 0, out.decode(), err.decode())
