"""The node's receive path without a network: verify, check, store once, quarantine, gaps."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from clients.node.config import ConfigError, load_config
from clients.node.content import ContentError, build_summary, content_dict
from clients.node.daemon import Backoff
from clients.node.inbox import Inbox
from clients.node.receive import Outcome, handle
from clients.node.sequences import DurableSequencer
from clients.sdk import Opened, Opener, Sequencer
from coalition import envelope as env
from coalition import envelope_v2
from coalition.epoch import SenderEpochs
from coalition.hybrid import HybridPublicKey, HybridSigningKey
from coalition.labels import Label, label_to_proto, parse_label
from coalition.pki import PartnerCredentials, load_partner
from coalition.v1 import exchange_pb2, intel_pb2, label_pb2
from tests.helpers import now_ms

LABEL = parse_label("NATO SECRET // REL TO KOR, USA")
# KOR's hybrid key for the v2 deliveries (as its certificate would certify it).
KOR_HYBRID = HybridSigningKey.generate()


@pytest.fixture(scope="module")
def creds(pki: Path) -> dict[str, PartnerCredentials]:
    return {c: load_partner(pki / "partners" / c) for c in ("KOR", "USA", "GBR")}


def signer(creds: dict[str, PartnerCredentials]) -> Callable[[str, str], Ed25519PublicKey]:
    def find(sender: str, key_id: str) -> Ed25519PublicKey:
        c = creds.get(sender)
        if c is None or c.signing_key_id != key_id:
            raise KeyError(sender)
        return c.signing_key.public_key()

    return find


# The signing key id of KOR's hybrid certificate (its v1 deliveries use its v1-only one).
KOR_HYBRID_ID = "kor-hybrid"


class Keys:
    """The senders' keys as a verified directory gives them: KOR's certificate
    ``KOR_HYBRID_ID`` (or those named) certifies KOR_HYBRID's ML-DSA-65 key."""

    def __init__(
        self, creds: dict[str, PartnerCredentials], hybrid_ids: frozenset[str] = frozenset()
    ) -> None:
        self.creds = creds
        self.hybrid_ids = hybrid_ids | {KOR_HYBRID_ID}

    def signer(self, sender: str, key_id: str) -> Ed25519PublicKey:
        if sender == "KOR" and key_id in self.hybrid_ids:
            return KOR_HYBRID.public_key().ed25519
        return signer(self.creds)(sender, key_id)

    def hybrid_signer(self, sender: str, key_id: str) -> HybridPublicKey:
        if sender != "KOR" or key_id not in self.hybrid_ids:
            raise KeyError(sender)
        return KOR_HYBRID.public_key()


@pytest.fixture(params=[1, 2], ids=["v1", "v2"])
def version(request: pytest.FixtureRequest) -> int:
    return int(request.param)


def delivery(
    creds: dict[str, PartnerCredentials],
    *,
    seq: int = 1,
    offset: int = 1,
    to: tuple[str, ...] = ("USA",),
    title: str = "Armour moving north",
    label: Label = LABEL,
    version: int = 1,
) -> exchange_pb2.Delivery:
    kor = creds["KOR"]
    recipients = []
    for code in to:
        kid = next(iter(creds[code].hpke_keys))
        pub = creds[code].hpke_keys[kid].public_key()
        recipients.append(env.Recipient(code, kid, pub, sequence=seq))
    plaintext = intel_pb2.IntelSummary(title=title, summary="secret body").SerializeToString()
    if version == 2:
        [e] = envelope_v2.seal_batch(
            [
                envelope_v2.Message(
                    plaintext=plaintext,
                    topic="intel.ground",
                    label=label_to_proto(label),
                    precedence=int(label_pb2.FLASH),
                    content_type=env.INTEL_SUMMARY,
                    recipients=recipients,
                    sequence=1000 + seq,
                    created_ms=now_ms(),
                )
            ],
            sender="KOR",
            signing_key=KOR_HYBRID,
            signing_key_id=KOR_HYBRID_ID,
            epochs=SenderEpochs("KOR"),
            created_ms=now_ms(),
        )
        return exchange_pb2.Delivery(
            offset=offset,
            envelope=e,
            label=label_to_proto(label),
            topic="intel.ground",
            precedence=label_pb2.FLASH,
        )
    e = env.seal(
        plaintext=plaintext,
        sender="KOR",
        signing_key=kor.signing_key,
        signing_key_id=kor.signing_key_id,
        sequence=1000 + seq,
        topic="intel.ground",
        label=label_to_proto(label),
        precedence=int(label_pb2.FLASH),
        content_type=env.INTEL_SUMMARY,
        recipients=recipients,
        created_ms=now_ms(),
    )
    return exchange_pb2.Delivery(
        offset=offset,
        envelope=e,
        label=label_to_proto(label),
        topic="intel.ground",
        precedence=label_pb2.FLASH,
    )


async def receive(
    d: exchange_pb2.Delivery,
    inbox: Inbox,
    creds: dict[str, PartnerCredentials],
    me: str = "USA",
    keys: Keys | None = None,
) -> Outcome:
    opener_ = Opener(me, creds[me].hpke_keys)

    async def opener(x: exchange_pb2.Delivery) -> Opened:
        return opener_.open(x.envelope, keys or Keys(creds))

    h = await handle(d, me=me, opener=opener, inbox=inbox, now_ms=now_ms())
    return h.outcome


async def test_store_once_even_when_delivered_twice(
    tmp_path: Path, creds: dict[str, PartnerCredentials], version: int
) -> None:
    inbox = Inbox(tmp_path / "inbox.db")
    d = delivery(creds, version=version)
    assert await receive(d, inbox, creds) is Outcome.STORED
    assert await receive(d, inbox, creds) is Outcome.DUPLICATE
    [e] = inbox.entries()
    assert (e.sender, e.title, e.precedence, e.label) == (
        "KOR",
        "Armour moving north",
        "FLASH",
        "NATO SECRET // REL TO KOR, USA",
    )
    assert inbox.counts() == (1, 0)
    assert (tmp_path / "inbox.db").stat().st_mode & 0o077 == 0


async def test_relabelled_delivery_is_quarantined(
    tmp_path: Path, creds: dict[str, PartnerCredentials], version: int
) -> None:
    inbox = Inbox(tmp_path / "inbox.db")
    d = delivery(creds, version=version)
    # A broker that routes under a weaker label than the one the sender signed.
    d.label.CopyFrom(label_to_proto(parse_label("NATO RESTRICTED // REL TO NATO")))
    assert await receive(d, inbox, creds) is Outcome.QUARANTINED
    [q] = inbox.quarantined()
    assert q["reason"] == "label_mismatch"
    assert "NATO RESTRICTED" in str(q["detail"]) and "secret body" not in str(q["detail"])
    assert inbox.counts() == (0, 1)


async def test_a_label_claiming_another_originator_is_quarantined(
    tmp_path: Path, creds: dict[str, PartnerCredentials], version: int
) -> None:
    """The broker's header rule (coalition.checks), made again by the node: KOR signed a
    label that says GBR originated it, and a broker that let it through is not trusted."""
    inbox = Inbox(tmp_path / "inbox.db")
    forged = parse_label("NATO SECRET // REL TO KOR, USA", originator="GBR")
    assert (
        await receive(delivery(creds, label=forged, version=version), inbox, creds)
        is Outcome.QUARANTINED
    )
    [q] = inbox.quarantined()
    assert q["reason"] == "originator_mismatch" and "'GBR'" in str(q["detail"])
    assert inbox.counts() == (0, 1)


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        ("signature", "bad_signature"),
        ("ciphertext", "digest_mismatch"),
        ("recipient", "not_a_recipient"),
        ("topic", "topic_mismatch"),
    ],
)
async def test_refused_deliveries_are_quarantined(
    tmp_path: Path, creds: dict[str, PartnerCredentials], tamper: str, reason: str, version: int
) -> None:
    inbox = Inbox(tmp_path / "inbox.db")
    d = delivery(creds, to=("GBR",) if tamper == "recipient" else ("USA",), version=version)
    if tamper == "signature" and version == 2:
        d.envelope.batch.root_signature.ed25519 = bytes(64)
    elif tamper == "signature":
        d.envelope.signature = bytes(64)
    elif tamper == "ciphertext":
        # Flip a bit: setting the last byte to a constant is a no-op 1 time in 256.
        d.envelope.ciphertext = d.envelope.ciphertext[:-1] + bytes([d.envelope.ciphertext[-1] ^ 1])
    elif tamper == "topic":
        d.topic = "intel.other"
    assert await receive(d, inbox, creds) is Outcome.QUARANTINED
    [q] = inbox.quarantined()
    assert q["reason"] == reason
    assert inbox.entries() == []


async def test_v1_under_a_hybrid_certificate_is_refused(
    tmp_path: Path, creds: dict[str, PartnerCredentials]
) -> None:
    """A certificate that certifies an ML-DSA-65 key signs v2 only: a v1 envelope under
    it (Ed25519 alone, which a quantum attacker could forge) is quarantined, whoever
    delivered it; the same envelope under a v1-only certificate is stored."""
    inbox = Inbox(tmp_path / "inbox.db")
    d = delivery(creds)
    hybrid = Keys(creds, hybrid_ids=frozenset({creds["KOR"].signing_key_id}))
    assert await receive(d, inbox, creds, keys=hybrid) is Outcome.QUARANTINED
    [q] = inbox.quarantined()
    assert q["reason"] == "bad_signature" and "must be v2" in str(q["detail"])
    assert await receive(d, inbox, creds) is Outcome.STORED


async def test_gaps_are_detected_and_late_arrivals_close_them(
    tmp_path: Path, creds: dict[str, PartnerCredentials], version: int
) -> None:
    inbox = Inbox(tmp_path / "inbox.db")
    for seq in (1, 2, 6):
        assert (
            await receive(delivery(creds, seq=seq, offset=seq, version=version), inbox, creds)
            is Outcome.STORED
        )
    [gap] = inbox.take_unreported_gaps()
    assert gap.describe() == (
        "gap from KOR: sequences 3..5 missing (the broker may be withholding messages)"
    )
    assert inbox.take_unreported_gaps() == []  # warned once
    await receive(delivery(creds, seq=4, offset=4, version=version), inbox, creds)
    assert [(g.first, g.last) for g in inbox.gaps()] == [(3, 3), (5, 5)]
    assert inbox.senders() == {"KOR": 6}


async def test_gaps_are_taken_by_when_they_opened(
    tmp_path: Path, creds: dict[str, PartnerCredentials]
) -> None:
    # The daemon asks for holes older than its grace period: a fresh one waits.
    inbox = Inbox(tmp_path / "inbox.db")
    for seq in (1, 3):
        await receive(delivery(creds, seq=seq, offset=seq), inbox, creds)
    [gap] = inbox.gaps()
    assert inbox.take_unreported_gaps(opened_by_ms=gap.detected_ms - 1) == []
    assert inbox.take_unreported_gaps(opened_by_ms=gap.detected_ms) == [gap]
    assert inbox.take_unreported_gaps() == []


def test_durable_sequences_survive_restarts(tmp_path: Path) -> None:
    db = tmp_path / "node.db"
    clock = iter(range(100, 0, -10))  # a clock that goes backwards
    s1 = DurableSequencer(db, clock_us=lambda: next(clock))
    a = s1.allocate(["USA", "GBR"])
    b = s1.allocate(["USA"])
    s1.close()
    s2 = DurableSequencer(db, clock_us=lambda: 1)
    c = s2.allocate(["USA", "GBR"])
    assert a.sequence < b.sequence < c.sequence
    assert [a.per_recipient["USA"], b.per_recipient["USA"], c.per_recipient["USA"]] == [1, 2, 3]
    assert c.per_recipient["GBR"] == 2
    s2.release(c)  # refused, and nobody allocated since: numbers are reused
    assert s2.allocate(["GBR"]).per_recipient == {"GBR": 2}


def test_durable_sequences_across_processes(tmp_path: Path) -> None:
    db = tmp_path / "node.db"
    DurableSequencer(db).close()
    code = (
        "import sys, pathlib\n"
        "from clients.node.sequences import DurableSequencer\n"
        "s = DurableSequencer(pathlib.Path(sys.argv[1]))\n"
        "for _ in range(40):\n"
        "    a = s.allocate(['USA'])\n"
        "    print(a.sequence, a.per_recipient['USA'])\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(db)], stdout=subprocess.PIPE)
        for _ in range(3)
    ]
    pairs = []
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        pairs += [tuple(int(x) for x in line.split()) for line in out.decode().splitlines()]
    headers = sorted(h for h, _ in pairs)
    assert len(set(headers)) == 120
    assert sorted(r for _, r in pairs) == list(range(1, 121))
    # Within one process, the header sequence is strictly increasing.
    assert sorted(pairs) == sorted(pairs, key=lambda x: x[1])


def test_config_errors_are_one_clear_sentence(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("broker = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    bad.write_text('broker = "x:1"\nidentity = "i"\n')
    with pytest.raises(ConfigError, match="missing required key 'inbox'"):
        load_config(bad)
    bad.write_text('broker = "x:1"\nidentity = "i"\ninbox = "i.db"\ntopcs = []\n')
    with pytest.raises(ConfigError, match="unknown key 'topcs'"):
        load_config(bad)
    bad.write_text('broker = "x:1"\nidentity = "i"\ninbox = "i.db"\n[hook]\ncommand = "./h"\n')
    cfg = load_config(bad)
    assert cfg.inbox == tmp_path / "i.db" and cfg.hook is not None
    assert cfg.hook.command == (str(tmp_path / "h"),)


def test_content_from_text_and_json() -> None:
    s = build_summary(b"\nFirst line\nmore detail\n", area="Sector 4")
    assert (s.title, s.area.name) == ("First line", "Sector 4")
    assert s.reliability == intel_pb2.RELIABILITY_F and s.credibility == intel_pb2.CREDIBILITY_6
    j = build_summary(b'{"title": "T", "summary": "S", "reliability": "B", "credibility": 2}')
    assert (j.title, j.reliability, j.credibility) == (
        "T",
        intel_pb2.RELIABILITY_B,
        intel_pb2.CREDIBILITY_2,
    )
    with pytest.raises(ContentError, match="not an IntelSummary"):
        build_summary(b'{"titel": "T"}')
    with pytest.raises(ContentError, match="empty"):
        build_summary(b"  \n")
    doc = content_dict(env.INTEL_SUMMARY, j.SerializeToString(), attachments=False)
    assert doc["title"] == "T"


def test_backoff_is_jittered_exponential_and_capped() -> None:
    b = Backoff(rng=lambda: 1.0)
    delays = [b.next() for _ in range(10)]
    assert delays[:4] == [0.2, 0.4, 0.8, 1.6]
    assert max(delays) == 30.0
    low = Backoff(rng=lambda: 0.0)
    assert low.next() == 0.1


@pytest.mark.parametrize("durable", [True, False], ids=["node-db", "in-memory"])
def test_refused_numbers_are_taken_again_first(tmp_path: Path, durable: bool) -> None:
    # Pipelined: 1, 2, 3 sealed; 2 refused (never stored) -> the next envelope takes 2.
    s = DurableSequencer(tmp_path / "node.db") if durable else Sequencer(per_recipient=True)
    a, b, c = (s.allocate(["USA"]) for _ in range(3))
    s.release(b)
    assert s.allocate(["USA"]).per_recipient == {"USA": 2}
    assert s.allocate(["USA"]).per_recipient == {"USA": 4}
    # 3 refused below the last (taken again first); 5 refused as the last (simply taken
    # back, as is GBR's 1).
    e = s.allocate(["USA", "GBR"])
    s.release(c)
    s.release(e)
    assert s.allocate(["USA"]).per_recipient == {"USA": 3}
    assert s.allocate(["USA", "GBR"]).per_recipient == {"USA": 5, "GBR": 1}
    assert a.per_recipient == {"USA": 1}
