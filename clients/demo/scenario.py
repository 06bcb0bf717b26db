"""The demo scenario: a new partner (KOR) joins an allied network and shares intelligence
about a hostile deployment. Real broker and node processes over mutual TLS on loopback.

Each step prints what happens and records expectations; the caller exits non-zero if
any expectation fails. All content is fictional.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clients.demo.procs import Proc, python_module, wait_for_file
from clients.node.inbox import Entry, Inbox
from clients.sdk import OperatorClient
from coalition.clock import wall_clock_ms
from coalition.labels import COMPARTMENT, Classification, parse_label
from coalition.pki import load_operator, load_partner, make_dev_pki
from coalition.policy import PartnerPolicy, PartnerStatus, policy_to_proto

PARTNERS = ("KOR", "USA", "GBR", "UKR", "NATO")
OPERATORS = ("op1", "op2")
TOPICS = ("intel.>",)


def _policy(
    code: str, level: Classification, groups: set[str], sigint: bool = False
) -> PartnerPolicy:
    return PartnerPolicy(
        partner=code,
        status=PartnerStatus.ACTIVE,
        clearances={"NATO": level},
        groups=frozenset(groups),
        categories={COMPARTMENT: frozenset({"SIGINT"})} if sigint else {},
        publish_topics=TOPICS,
        subscribe_topics=TOPICS,
        origination_ceilings={"NATO": level},
    )


POLICIES = {
    "USA": _policy("USA", Classification.TOP_SECRET, {"NATO", "FVEY"}),
    "GBR": _policy("GBR", Classification.SECRET, {"NATO", "FVEY"}, sigint=True),
    "UKR": _policy("UKR", Classification.SECRET, {"NATO-PARTNERS"}),
    "NATO": _policy("NATO", Classification.SECRET, {"NATO"}),
    "KOR": _policy("KOR", Classification.SECRET, {"NATO-PARTNERS"}),
}


@dataclass
class Check:
    step: str
    expectation: str
    ok: bool
    detail: str = ""


@dataclass
class Published:
    key: str
    sender: str
    label: str
    title: str
    precedence: str
    message_id: str = ""
    recipients: list[str] = field(default_factory=list)
    published_ms: int = 0
    refused: str = ""
    envelope: str = ""  # "v2" (hybrid-signed batch root) or "v1", as the node reported
    # Each partner's delivery decision when this was published: "allow" or why not.
    reasons: dict[str, str] = field(default_factory=dict)


class Demo:
    """Runs the scenario in a work directory; see ``run()``."""

    # The summary table: its columns, their width, its title.
    partners: tuple[str, ...] = PARTNERS
    cell_width = 20
    summary_title = "Who received what (or why not):"

    def __init__(self, work: Path, *, out: Callable[[str], None], deadline_ms: int) -> None:
        self.work = work
        self.pki = work / "pki"
        self.out = out
        self.deadline_ms = deadline_ms
        self.t0 = time.monotonic()
        self.checks: list[Check] = []
        self.published: dict[str, Published] = {}
        self.rogue: list[dict[str, Any]] = []
        self.broker: Proc | None = None
        self.nodes: dict[str, Proc] = {}
        self.address = ""
        self.audit_summary: dict[str, Any] = {}
        self.denied: list[dict[str, str]] = []

    # -- output and checks ------------------------------------------------------------------
    def say(self, what: str, text: str) -> None:
        self.out(f"[{time.monotonic() - self.t0:5.1f}s] {what:<8} {text}")

    def expect(self, step: str, expectation: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(step, expectation, ok, detail))
        mark = "ok  " if ok else "FAIL"
        self.out(f"         {mark} {expectation}" + (f" ({detail})" if detail else ""))
        return ok

    # -- processes -----------------------------------------------------------------------------
    def start_broker(self) -> None:
        port_file = self.work / "broker.port"
        self.broker = Proc(
            "broker",
            python_module(
                "broker.cli",
                "serve",
                "--pki",
                str(self.pki),
                "--data",
                str(self.work / "broker"),
                "--listen",
                "127.0.0.1:0",
                "--operators",
                ",".join(OPERATORS),
                "--audit-checkpoint-every",
                "25",
                "--port-file",
                str(port_file),
            ),
            self.work / "logs" / "broker.log",
        )
        self.broker.start()
        port = wait_for_file(port_file, self.broker)
        self.address = f"127.0.0.1:{port}"
        self.say("broker", f"serving on {self.address} over mutual TLS 1.3 (pid {self.broker.pid})")

    def node_config(self, code: str) -> Path:
        cfg = self.work / "nodes" / code / "node.toml"
        if not cfg.exists():
            cfg.parent.mkdir(parents=True, exist_ok=True)
            cfg.write_text(
                f'broker = "{self.address}"\n'
                f'identity = "{self.pki / "partners" / code}"\n'
                f'inbox = "{cfg.parent / "inbox.db"}"\n'
                'topics = ["intel.>"]\n'
            )
        return cfg

    def start_node(self, code: str) -> None:
        proc = Proc(
            f"node {code}",
            python_module("clients.node.cli", "run", "--config", str(self.node_config(code))),
            self.work / "logs" / f"node-{code}.log",
        )
        proc.start()
        self.nodes[code] = proc

    def inbox(self, code: str) -> list[Entry]:
        path = self.work / "nodes" / code / "inbox.db"
        if not path.exists():
            return []
        box = Inbox(path)
        try:
            return box.entries()
        finally:
            box.close()

    async def publish(
        self,
        key: str,
        sender: str,
        label: str,
        title: str,
        text: str,
        *,
        precedence: str = "ROUTINE",
        area: str = "Northern corridor",
        topic: str = "intel.ground",
    ) -> Published:
        """Publish through the real `coalition-node publish` command."""
        pub = Published(key, sender, label, title, precedence)
        pub.reasons = await self.decisions(label, topic, sender)
        body = self.node_config(sender).parent / f"{key}.txt"
        body.write_text(text)
        proc = await asyncio.create_subprocess_exec(
            *python_module(
                "clients.node.cli",
                "publish",
                "--config",
                str(self.node_config(sender)),
                "--topic",
                topic,
                "--label",
                label,
                "--precedence",
                precedence,
                "--title",
                title,
                "--area",
                area,
                "--reliability",
                "B",
                "--credibility",
                "2",
                "--json",
                str(body),
            ),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await proc.communicate()
        pub.published_ms = wall_clock_ms()
        if proc.returncode == 0:
            doc = json.loads(stdout)
            pub.message_id = doc["message_id"]
            pub.recipients = list(doc["recipients"])
            pub.envelope = str(doc.get("envelope", ""))
            self.say(
                "publish",
                f'{sender} [{precedence}] {label} "{title}" -> sealed for '
                f"{', '.join(pub.recipients)}",
            )
        else:
            pub.refused = stderr.decode().strip().splitlines()[-1] if stderr else "failed"
            self.say("publish", f'{sender} "{title}" refused: {pub.refused}')
        self.published[key] = pub
        return pub

    async def wait_received(
        self, pub: Published, codes: list[str], timeout: float = 15
    ) -> dict[str, int]:
        """Wait until each code's inbox holds pub; returns receive latency (ms) per code."""
        got: dict[str, int] = {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(got) < len(codes):
            for code in codes:
                if code in got:
                    continue
                for e in self.inbox(code):
                    if e.message_id == pub.message_id:
                        # From the signed creation time to stored in the recipient's inbox.
                        got[code] = max(e.received_ms - e.created_ms, 0)
            await asyncio.sleep(0.05)
        return got

    async def decisions(self, label: str, topic: str, sender: str = "") -> dict[str, str]:
        """Each partner's delivery decision for label on topic, as the broker sees it now
        (sender matters only with several brokers: the federation demo)."""
        async with self.operator("op1") as op:
            resp = await op.who_receives(parse_label(label), topic)
        found = {d.partner: d.reason for d in resp.decisions}
        return {code: found.get(code, "not_admitted") for code in PARTNERS}

    def operator(self, name: str) -> OperatorClient:
        return OperatorClient(load_operator(self.pki / "operators" / name), self.address)

    async def admit(self, code: str, *, approve: bool = True) -> str:
        creds = load_partner(self.pki / "partners" / code)
        async with self.operator("op1") as op1:
            resp = await op1.admit(
                code,
                creds.signing_cert_der,
                policy_to_proto(POLICIES[code]),
                f"{code} joins the network",
            )
        pid = resp.proposal.proposal_id
        if approve:
            async with self.operator("op2") as op2:
                await op2.approve(pid, "second operator agrees")
        return pid

    async def connected(self, code: str) -> bool:
        async with self.operator("op1") as op:
            return any(p.partner == code and p.connected for p in await op.partners())

    async def wait_connected(self, code: str, want: bool = True, timeout: float = 15) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self.connected(code) == want:
                return True
            await asyncio.sleep(0.1)
        return False

    # -- the scenario -----------------------------------------------------------------------------
    async def run(self) -> None:
        self.say("setup", f"development PKI: CA, broker, {', '.join(PARTNERS)}, operators op1 op2")
        make_dev_pki(self.pki, PARTNERS, OPERATORS, wall_clock_ms())
        self.start_broker()
        for code in ("USA", "GBR", "UKR", "NATO"):
            await self.admit(code)
        self.say("admit", "USA, GBR, UKR, NATO admitted (each proposed by op1, approved by op2)")
        for code in PARTNERS:
            self.start_node(code)
        self.say("nodes", f"node daemons started for {', '.join(PARTNERS)} (real processes)")
        for code in ("USA", "GBR", "UKR", "NATO"):
            if not await self.wait_connected(code):
                raise RuntimeError(f"node {code} did not connect; see {self.nodes[code].log}")
        await self.step1_not_admitted()
        await self.step2_admission()
        await self.step3_kor_publishes()
        await self.step4_restrictive()
        await self.step5_offline_catch_up()
        await self.step6_suspension()
        await self.step7_rogue()
        await self.step8_audit()

    async def step1_not_admitted(self) -> None:
        self.out("\n1. KOR's node runs but KOR is not admitted")
        pub = await self.publish(
            "pre-admission",
            "USA",
            "NATO SECRET // REL TO NATO, KOR",
            "OPFOR bridging units sighted",
            "Engineer bridging units observed near the river line.",
        )
        await self.wait_received(pub, ["NATO"])
        self.expect(
            "1",
            "KOR is not among the recipients",
            "KOR" not in pub.recipients,
            f"sealed for {', '.join(pub.recipients)}",
        )
        self.expect("1", "KOR's inbox is empty", not self.inbox("KOR"))

    async def step2_admission(self) -> None:
        self.out("\n2. Two operators admit KOR at SECRET in NATO-PARTNERS")
        pid = await self.admit("KOR", approve=False)
        self.say("admin", f"op1 proposed admitting KOR (proposal {pid}); KOR is pending")
        async with self.operator("op1") as op1:
            try:
                await op1.approve(pid)
                self_ok = False
            except Exception as exc:  # the broker must refuse op1's own approval
                self_ok = "PERMISSION_DENIED" in str(exc)
        self.expect("2", "op1 cannot approve its own proposal", self_ok)
        self.expect(
            "2",
            "pending KOR's node is refused until approved",
            not await self.connected("KOR"),
        )
        async with self.operator("op2") as op2:
            await op2.approve(pid, "KOR vetted")
        self.say("admin", "op2 approved: KOR is ACTIVE")
        if not await self.wait_connected("KOR"):
            raise RuntimeError(f"node KOR did not connect; see {self.nodes['KOR'].log}")
        pub = await self.publish(
            "welcome",
            "USA",
            "NATO SECRET // REL TO NATO, KOR",
            "OPFOR air defence relocation",
            "Two SAM batteries relocated 40 km east overnight.",
        )
        got = await self.wait_received(pub, ["KOR"])
        self.expect(
            "2",
            "KOR receives at once after approval",
            "KOR" in got,
            f"{got.get('KOR', -1)} ms after publish" if "KOR" in got else "not received",
        )

    async def step3_kor_publishes(self) -> None:
        self.out("\n3. KOR shares a summary: NATO SECRET // REL TO NATO, KOR, UKR")
        pub = await self.publish(
            "kor-summary",
            "KOR",
            "NATO SECRET // REL TO NATO, KOR, UKR",
            "Hostile armoured brigade redeploying north",
            "An armoured brigade (est. 90 tanks) is moving toward the northern crossing points; "
            "rail loading observed at two depots.",
            precedence="IMMEDIATE",
        )
        eligible = ["USA", "GBR", "UKR", "NATO"]
        got = await self.wait_received(pub, eligible)
        for code in eligible:
            ms = got.get(code)
            self.expect(
                "3",
                f"{code} receives KOR's summary within {self.deadline_ms / 1000:g} s",
                ms is not None and ms <= self.deadline_ms,
                f"{ms} ms" if ms is not None else "not received",
            )

    async def step4_restrictive(self) -> None:
        self.out("\n4. USA publishes under a RESTRICTIVE compartment (SIGINT) only GBR holds")
        pub = await self.publish(
            "usa-sigint",
            "USA",
            "NATO SECRET // REL TO NATO, KOR, UKR // SIGINT",
            "Intercepted brigade net traffic",
            "Command net traffic indicates an H-hour within 72 hours.",
            precedence="PRIORITY",
        )
        got = await self.wait_received(pub, ["GBR"])
        self.expect("4", "GBR (holds SIGINT) receives it", "GBR" in got)
        await asyncio.sleep(0.5)
        for code in ("KOR", "UKR", "NATO"):
            self.expect(
                "4",
                f"{code} (no SIGINT) does not",
                all(e.message_id != pub.message_id for e in self.inbox(code)),
            )

    async def step5_offline_catch_up(self) -> None:
        self.out("\n5. UKR goes offline; traffic continues; UKR catches up FLASH first")
        code = self.nodes["UKR"].stop()
        self.say("node", f"UKR node stopped (exit {code})")
        await self.wait_connected("UKR", want=False)
        keys = []
        for prec, title in (
            ("ROUTINE", "Logistics convoy schedule"),
            ("PRIORITY", "Fuel depot activity"),
            ("IMMEDIATE", "Artillery moving to firing positions"),
            ("FLASH", "Missile launch preparations detected"),
        ):
            pub = await self.publish(
                f"ukr-{prec.lower()}",
                "NATO",
                "NATO SECRET // REL TO NATO, UKR",
                title,
                f"{title} reported by HQ fusion cell.",
                precedence=prec,
            )
            keys.append(pub.message_id)
        self.start_node("UKR")
        self.say("node", "UKR node restarted")
        pubs = [p for p in self.published.values() if p.message_id in keys]
        for p in pubs:
            await self.wait_received(p, ["UKR"])
        order = [e.precedence for e in self.inbox("UKR") if e.message_id in keys]
        self.expect("5", "UKR caught up on all four", len(order) == 4, ", ".join(order))
        self.expect(
            "5",
            "backlog delivered FLASH first",
            order == ["FLASH", "IMMEDIATE", "PRIORITY", "ROUTINE"],
            " > ".join(order),
        )

    async def step6_suspension(self) -> None:
        self.out("\n6. GBR is suspended mid-stream")
        async with self.operator("op1") as op1:
            await op1.suspend("GBR", "suspected credential compromise")
        self.say("admin", "op1 suspended GBR (lowering: one operator suffices)")
        closed = await self.wait_connected("GBR", want=False, timeout=5)
        self.expect("6", "GBR's live stream is closed at once", closed)
        pub = await self.publish(
            "after-suspension",
            "USA",
            "NATO SECRET // REL TO NATO",
            "OPFOR reserve division alerted",
            "A reserve division has been placed on alert.",
        )
        await self.wait_received(pub, ["NATO"])
        self.expect(
            "6",
            "GBR is not among the recipients (suspended) and receives nothing",
            pub.reasons.get("GBR") == "suspended"
            and "GBR" not in pub.recipients
            and all(e.message_id != pub.message_id for e in self.inbox("GBR")),
        )

    async def step7_rogue(self) -> None:
        self.out("\n7. A rogue process holding UKR's valid certificate misbehaves")
        proc = await asyncio.create_subprocess_exec(
            *python_module(
                "clients.demo.rogue",
                "--identity",
                str(self.pki / "partners" / "UKR"),
                "--broker",
                self.address,
                "--victim",
                "USA",
            ),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await proc.communicate()
        if proc.returncode != 0:
            self.expect("7", "rogue process ran", False, stderr.decode()[-300:])
            return
        self.rogue = [json.loads(line) for line in stdout.decode().splitlines() if line.strip()]
        by_attack = {r["attack"]: r for r in self.rogue}
        wanted = {
            "impersonation": "sender_mismatch",
            "label downgrade": "bad_signature",
            "replay": "replay",
        }
        async with self.operator("op1") as op:
            refused = await op.audit(kind="publish.refused")
        audited = {e.message_id for e in refused}
        for attack, code in wanted.items():
            r = by_attack.get(attack, {})
            self.say(
                "rogue", f"{attack}: {r.get('status')} {r.get('reason_code')} - {r.get('reason')}"
            )
            self.expect(
                "7",
                f"{attack} refused ({code}) and audited",
                not r.get("accepted", True)
                and r.get("reason_code") == code
                and r.get("message_id") in audited,
            )

    async def step8_audit(self) -> None:
        self.out("\n8. The audit chain is verified")
        sent = [p for p in self.published.values() if p.message_id]
        self.expect(
            "8",
            "every published message was envelope v2 (one Ed25519 + ML-DSA-65 batch signature)",
            bool(sent) and all(p.envelope == "v2" for p in sent),
            f"{sum(p.envelope == 'v2' for p in sent)} of {len(sent)} v2",
        )
        async with self.operator("op2") as op:
            res = await op.verify_audit()
            denied = await op.audit(kind="deliver.denied")
        self.audit_summary = {
            "ok": res.ok,
            "entries": res.entries,
            "checkpoints": res.checkpoints,
            "problem": res.problem,
        }
        # One entry may cover several messages of one delivery batch.
        self.denied = [
            {"partner": e.partner, "message_id": mid, "reason": e.decision}
            for e in denied
            for mid in json.loads(e.detail_json or "{}").get("message_ids", [e.message_id])
        ]
        self.expect(
            "8",
            "audit hash chain and signed checkpoints verify",
            res.ok,
            f"{res.entries} entries, {res.checkpoints} checkpoints"
            + (f"; {res.problem}" if res.problem else ""),
        )

    def shutdown(self) -> None:
        for proc in self.nodes.values():
            proc.stop()
        if self.broker is not None:
            code = self.broker.stop()
            self.say("broker", f"stopped (exit {code})")

    # -- the summary --------------------------------------------------------------------------
    def matrix(self) -> dict[str, dict[str, str]]:
        """For each published message and partner: received, or why not.

        Why not is the broker's reason code: refused at delivery (from the audit log), or
        the partner's policy decision when the message was sealed (not_admitted,
        suspended, missing_category, ...); "not_received" if it was eligible but its inbox
        does not hold it, "publish_refused" when the broker refused the message itself.
        """
        inboxes = {c: {e.message_id for e in self.inbox(c)} for c in self.partners}
        withheld = self.withheld()
        out: dict[str, dict[str, str]] = {}
        for key, pub in self.published.items():
            row: dict[str, str] = {}
            for code in self.partners:
                if code == pub.sender:
                    row[code] = "(sender)"
                elif pub.message_id in inboxes[code]:
                    row[code] = "received"
                elif (code, pub.message_id) in withheld:
                    row[code] = withheld[(code, pub.message_id)]
                elif pub.refused:
                    row[code] = "publish_refused"
                else:
                    reason = pub.reasons.get(code, "allow")
                    row[code] = "not_received" if reason == "allow" else reason
            out[key] = row
        return out

    def withheld(self) -> dict[tuple[str, str], str]:
        """(partner, message id) -> why a broker withheld it after accepting it: here the
        delivery refusals read from the audit log."""
        return {(d["partner"], d["message_id"]): d["reason"] for d in self.denied}

    def report(self, elapsed: float) -> dict[str, Any]:
        return {
            "ok": all(c.ok for c in self.checks),
            "elapsed_s": round(elapsed, 2),
            "checks": [c.__dict__ for c in self.checks],
            "published": [p.__dict__ for p in self.published.values()],
            "matrix": self.matrix(),
            "rogue": self.rogue,
            "audit": self.audit_summary,
        }

    def print_summary(self) -> None:
        matrix = self.matrix()
        width = max(len(k) for k in matrix) if matrix else 10
        cell = self.cell_width
        self.out("\n" + self.summary_title)
        self.out(f"  {'message':<{width}}  " + "  ".join(f"{c:<{cell}}" for c in self.partners))
        for key, row in matrix.items():
            cells = (reason_text(row[c]) for c in self.partners)
            self.out(f"  {key:<{width}}  " + "  ".join(f"{c:<{cell}}" for c in cells))
        if self.rogue:
            self.out("\nRefused publishes (rogue):")
            for r in self.rogue:
                verdict = "ACCEPTED" if r["accepted"] else f"{r['status']} {r['reason_code']}"
                self.out(f"  {r['attack']:<22} {verdict:<36} {r['reason']}")
        failed = [c for c in self.checks if not c.ok]
        self.out(
            f"\n{len(self.checks) - len(failed)}/{len(self.checks)} expectations met"
            + (
                ""
                if not failed
                else "; FAILED: " + "; ".join(f"[{c.step}] {c.expectation}" for c in failed)
            )
        )


def reason_text(cell: str) -> str:
    """A matrix cell for people: "received", "(sender)", or the reason in words."""
    return cell.replace("_", " ")


def default_out(line: str) -> None:
    print(line, flush=True)
