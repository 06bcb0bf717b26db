"""The operator console in a real headless Chromium (Playwright), against a real broker
process over mTLS, with real `coalition-console` processes for two operators.

Chromium comes from the distribution (`make browser` installs it); CONSOLE_CHROMIUM names
another binary. A missing browser fails these tests, never skips them.
CONSOLE_SCREENSHOTS=1 writes each page's screenshot into docs/console/.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from playwright.async_api import (
    Browser,
    BrowserContext,
    Page,
    ViewportSize,
    async_playwright,
    expect,
)

from clients.sdk import ClientError
from coalition.labels import Classification, parse_label
from coalition.v1 import directory_pb2, envelope_pb2, exchange_pb2
from tests.helpers import admit, eventually, operator, partner, policy
from tests.test_broker_faults import BrokerProcess

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("CONSOLE_CHROMIUM", "/usr/bin/chromium")
SHOTS = REPO / "docs" / "console"
LABEL = parse_label("NATO SECRET // REL TO KOR, USA")
WIDE: ViewportSize = {"width": 1280, "height": 800}
NARROW: ViewportSize = {"width": 400, "height": 800}


@pytest.fixture(scope="module")
def chromium() -> str:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"no Chromium at {CHROMIUM}: run `make browser` (as root it installs the "
            "distribution's chromium), `sudo apt-get install -y chromium`, or set "
            "CONSOLE_CHROMIUM to a Chromium binary"
        )
    return CHROMIUM


@pytest.fixture
async def browser(chromium: str) -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=chromium, headless=True)
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
def broker_proc(pki: Path, tmp_path: Path) -> Iterator[BrokerProcess]:
    b = BrokerProcess(pki, tmp_path / "data")
    try:
        yield b
    finally:
        b.cleanup()


@pytest.fixture
async def broker(broker_proc: BrokerProcess, pki: Path) -> BrokerProcess:
    await broker_proc.start()
    for code in ("KOR", "USA"):
        await admit(pki, broker_proc.port, policy(code))
    await admit(pki, broker_proc.port, policy("GBR", level=Classification.CONFIDENTIAL))
    return broker_proc


@dataclass
class ConsoleProcess:
    proc: asyncio.subprocess.Process
    url: str
    link: str


async def start_console(pki: Path, name: str, port: int) -> ConsoleProcess:
    """`coalition-console` for operator name, on a port it picks; its access link."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "clients.console.cli",
        "--identity",
        str(pki / "operators" / name),
        "--broker",
        f"127.0.0.1:{port}",
        "--listen",
        "127.0.0.1:0",
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    if not line:
        assert proc.stderr is not None
        raise AssertionError(f"console exited: {(await proc.stderr.read()).decode()}")
    info = json.loads(line)
    assert info["operator"] == name and info["url"].startswith("http://127.0.0.1:")
    return ConsoleProcess(proc, info["url"], info["link"])


@pytest.fixture
async def consoles(pki: Path, broker: BrokerProcess) -> AsyncIterator[dict[str, ConsoleProcess]]:
    started = {n: await start_console(pki, n, broker.port) for n in ("op1", "op2")}
    try:
        yield started
    finally:
        for c in started.values():
            if c.proc.returncode is None:
                c.proc.terminate()
                await asyncio.wait_for(c.proc.wait(), 15)


async def signed_in(
    browser: Browser, console: ConsoleProcess, viewport: ViewportSize = WIDE
) -> tuple[BrowserContext, Page]:
    ctx = await browser.new_context(viewport=viewport)
    page = await ctx.new_page()
    await page.goto(console.link)
    await expect(page.locator("#identity")).to_contain_text("Operator")
    return ctx, page


async def shot(page: Page, name: str, *, full: bool = False) -> None:
    """Save the page's screenshot for the docs, only when asked (it changes every run)."""
    if os.environ.get("CONSOLE_SCREENSHOTS") == "1":
        SHOTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=full)


async def test_two_person_flow_in_two_browsers(
    browser: Browser, consoles: dict[str, ConsoleProcess], broker: BrokerProcess, pki: Path
) -> None:
    _, p1 = await signed_in(browser, consoles["op1"])
    _, p2 = await signed_in(browser, consoles["op2"])
    await expect(p1.locator("#identity")).to_contain_text("op1")
    await expect(p2.locator("#identity")).to_contain_text("op2")

    # op1 raises KOR's clearance: a proposal, not a change.
    await p1.goto(consoles["op1"].url + "partners/KOR")
    await p1.get_by_label("Clearances").fill("NATO=TOP_SECRET")
    await p1.get_by_label("Reason (recorded").fill("J2 asks for <b>TS</b> access")
    await p1.get_by_role("button", name="Submit change").click()
    await expect(p1.locator(".notice")).to_contain_text("second operator must approve")
    card = p1.locator("article.proposal").first
    await expect(card.locator(".proposer")).to_have_text("op1")
    # Partner-written text is escaped, never markup.
    await expect(card.locator("q.why")).to_have_text("J2 asks for <b>TS</b> access")
    await expect(card.locator("ul.diff")).to_contain_text("clearance NATO: SECRET -> TOP SECRET")
    changed = card.locator("table.compare tr.changed")
    await expect(changed).to_have_count(1)
    await expect(changed).to_contain_text("NATO=SECRET")
    await expect(changed).to_contain_text("NATO=TOP_SECRET")
    gains = card.locator("ul.gain").first
    await expect(gains).to_contain_text("NATO TOP SECRET // REL TO KOR")
    approve1 = card.get_by_role("button", name="Approve")
    await expect(approve1).to_be_disabled()
    why = card.locator(".why-disabled")
    await expect(why).to_contain_text("You proposed this change")
    assert await approve1.get_attribute("aria-describedby") == await why.get_attribute("id")
    await shot(p1, "proposals", full=True)

    async with operator(pki, "op1", broker.port) as op1:
        [prop] = await op1.proposals()
        assert int((await op1.policy("KOR")).policy.clearances[0].level) == Classification.SECRET

        # op2 sees the same proposal, may approve it; a stale second tab of op2's comes later.
        stale = await p2.context.new_page()
        await stale.goto(consoles["op2"].url + "proposals")
        await p2.goto(consoles["op2"].url + "proposals")
        card2 = p2.locator(f"#proposal-{prop.proposal_id}")
        approve2 = card2.get_by_role("button", name="Approve")
        await expect(approve2).to_be_enabled()
        await expect(card2.locator(".why-disabled")).to_have_count(0)
        # By keyboard: from the reason field, Tab reaches Approve, Enter presses it.
        await card2.get_by_label("Reason (recorded").fill("agreed with J2")
        await p2.keyboard.press("Tab")
        await expect(approve2).to_be_focused()
        await p2.keyboard.press("Enter")
        await expect(p2.locator(".notice")).to_contain_text("approved")

        # The policy changed at the broker, approved by op2.
        pv = await op1.policy("KOR")
        assert int(pv.policy.clearances[0].level) == Classification.TOP_SECRET
        assert (pv.changed_by, pv.approved_by) == ("op1", "op2")

    # The stale tab's reject finds the proposal already decided, said in words.
    await (
        stale.locator(f"#proposal-{prop.proposal_id}").get_by_role("button", name="Reject").click()
    )
    await expect(stale.locator("h1")).to_have_text("Proposal already decided")
    await shot(stale, "error-decided")

    await p1.goto(consoles["op1"].url + "partners/KOR")
    first = p1.locator("ol.versions > li").first
    await expect(first).to_contain_text("approved by op2")
    await expect(first.locator("ul.diff")).to_contain_text("TOP SECRET")
    await shot(p1, "partner")


async def test_suspension_from_partners_page_closes_live_stream(
    browser: Browser, consoles: dict[str, ConsoleProcess], broker: BrokerProcess, pki: Path
) -> None:
    async with (
        partner(pki, "KOR", broker.port) as kor,
        partner(pki, "USA", broker.port) as usa,
        operator(pki, "op1", broker.port) as op1,
    ):
        await usa.register_keys()
        sealed = [
            (await kor.seal(f"m{i}".encode(), topic="intel.ground", label=LABEL)).envelope
            for i in range(3)
        ]
        results = await kor.publish([*sealed, envelope_pb2.Envelope(header=b"\xff")])
        assert [r.outcome for r in results][-1] == exchange_pb2.REFUSED
        sub = usa.subscribe(["intel.>"])
        got: list[int] = []

        async def read() -> None:
            async for d in sub:
                got.append(d.offset)  # never acknowledged: all three stay in flight

        task = asyncio.create_task(read())
        try:
            await eventually(lambda: len(got) == 3, 15)
            ctx, page = await signed_in(browser, consoles["op1"])
            row = page.locator("#partner-USA")
            await expect(row.locator(".connected")).to_have_text("yes")
            await expect(row.locator("td.num").nth(1)).to_have_text("3")  # in flight
            await expect(page.locator("#partner-KOR")).to_contain_text(
                f"{results[3].reason_code}: 1"
            )
            await shot(page, "partners")
            await page.goto(consoles["op1"].url + "messages")
            await expect(page.locator("table.messages tbody tr")).to_have_count(3)
            await expect(page.locator("table.messages tbody tr").first).to_contain_text(
                "NATO SECRET // REL TO KOR, USA"
            )
            await expect(page.locator("table.messages tbody tr").first).to_contain_text("USA")
            await shot(page, "messages")
            narrow = await browser.new_context(viewport=NARROW)
            small = await narrow.new_page()
            await small.goto(consoles["op1"].link)
            await shot(small, "partners-narrow")
            # No horizontal scrolling of the page itself at ~400 px.
            width = await small.evaluate("document.documentElement.scrollWidth")
            assert width <= NARROW["width"], width

            await page.goto(consoles["op1"].url + "partners")
            # A form that did not come from this console (no CSRF token) changes nothing,
            # even sent by the signed-in browser itself.
            forged = await page.evaluate(
                """async () => { const r = await fetch('/partners/GBR/suspend',
                     {method: 'POST', body: new URLSearchParams({reason: 'forged'})});
                     return [r.status, await r.text()]; }"""
            )
            assert forged[0] == 403 and "Form expired" in forged[1]
            assert (await op1.policy("GBR")).policy.status == directory_pb2.ACTIVE
            await page.get_by_label("Reason to suspend USA").fill("keys compromised")
            await page.get_by_role("button", name="Suspend USA").click()
            await expect(page.locator(".notice")).to_contain_text("USA is suspended")
            await expect(row.locator(".status")).to_have_text("suspended")
            with pytest.raises(ClientError) as info:
                await asyncio.wait_for(task, 15)
            assert info.value.status == grpc.StatusCode.PERMISSION_DENIED
            assert "suspended" in info.value.message
            pv = await op1.policy("USA")
            assert pv.reason == "keys compromised" and pv.changed_by == "op1"
            assert not pv.approved_by  # lowering: applied at once by one operator
            await ctx.close()
        finally:
            sub.close()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_audit_live_tail_shows_a_refusal(
    browser: Browser, consoles: dict[str, ConsoleProcess], broker: BrokerProcess, pki: Path
) -> None:
    _, page = await signed_in(browser, consoles["op1"])
    await page.goto(consoles["op1"].url + "audit?partner=KOR&kind=publish")
    await expect(page.locator(".verdict.ok")).to_contain_text("Chain verified")
    before = await page.locator("#entries tr").count()
    async with partner(pki, "KOR", broker.port) as kor:
        # Give the page's EventSource a moment to connect (it resumes after the last seq
        # shown in any case, so this only keeps the latency figure honest).
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        [r] = await kor.publish([envelope_pb2.Envelope(header=b"\xff")])
        assert r.outcome == exchange_pb2.REFUSED
        newest = page.locator("#entries tr").first
        await expect(newest).to_contain_text("publish.refused", timeout=5000)
        latency = time.monotonic() - t0
    cells = await newest.locator("td").all_inner_texts()
    assert cells[2:6] == ["publish.refused", "KOR", "KOR", r.reason_code]
    assert await newest.get_attribute("class") == "refused"
    assert await page.locator("#entries tr").count() == before + 1  # the filter holds
    print(f"audit tail latency {latency:.3f} s")
    await shot(page, "audit")


async def test_tampered_audit_log_shown_broken(
    browser: Browser, broker: BrokerProcess, pki: Path
) -> None:
    async with operator(pki, "op1", broker.port) as op1:
        entries = await op1.audit()
    victim = entries[len(entries) // 2]
    broker.signal(signal.SIGTERM)
    assert await broker.wait_exit() == 0
    with sqlite3.connect(broker.data / "audit.db") as raw:
        raw.execute("DROP TRIGGER IF EXISTS entries_append_only_update")
        raw.execute("UPDATE entries SET decision = 'forged' WHERE seq = ?", (victim.seq,))
    raw.close()
    await broker.start()
    console = await start_console(pki, "op1", broker.port)
    try:
        _, page = await signed_in(browser, console)
        await page.goto(console.url + "audit")
        verdict = page.locator(".verdict.broken")
        await expect(verdict).to_contain_text("Audit log BROKEN")
        await expect(verdict.locator(".first-bad")).to_have_text(f"#{victim.seq}")
        await expect(verdict).to_contain_text("decision forged")
        bad = page.locator(f'#entries tr[data-seq="{victim.seq}"]')
        assert await bad.get_attribute("class") == "bad"
        assert await page.locator("#entries tr.bad").count() == 1
        color = await verdict.evaluate("e => getComputedStyle(e).color")
        assert color == "rgb(179, 38, 30)"  # the red of --bad
        await shot(page, "audit-broken")
    finally:
        console.proc.terminate()
        await asyncio.wait_for(console.proc.wait(), 15)


async def test_errors_in_words_and_access_control(
    browser: Browser, broker: BrokerProcess, pki: Path
) -> None:
    console = await start_console(pki, "op3", broker.port)  # not an operator of this broker
    try:
        ctx = await browser.new_context()
        page = await ctx.new_page()
        await page.goto(console.url + "partners")
        await expect(page.locator("h1")).to_have_text("Open the console's access link")
        await page.goto(console.link)
        await expect(page.locator("h1")).to_have_text("Certificate refused")
        await expect(page.locator(".problem")).to_contain_text("not authorized")
        await expect(page.locator("#identity")).to_contain_text("op3")
        await shot(page, "error-certificate")
        broker.signal(signal.SIGTERM)
        assert await broker.wait_exit() == 0
        await page.goto(console.url + "partners")
        await expect(page.locator("h1")).to_have_text("The broker is down or unreachable")
        await shot(page, "error-down")
    finally:
        console.proc.terminate()
        await asyncio.wait_for(console.proc.wait(), 15)
