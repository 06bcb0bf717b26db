"""The per-message hook: a command fed one JSON document on stdin, time-limited, run once
per message.

Exactly once, as far as a node can: the hook runs under a small ``/bin/sh`` wrapper in
its own session, which creates a marker file as soon as the hook exits 0. The wrapper
does not depend on the daemon, so a daemon killed while the hook runs or just after it
finished leaves the hook to finish and the marker to be written; at the next start the
daemon waits for a wrapper still running, then marks the message done if the marker is
there (``hook_status = 'ok'`` in its inbox row) and runs the hook again only if it is
not. The hook may therefore run twice only if it was itself killed (or the host lost
power) before it exited: at-least-once then. Each run gets the message id as an
idempotency key (``COALITION_MESSAGE_ID``, ``message_id`` on stdin) and the attempt
number (``COALITION_HOOK_ATTEMPT``, ``hook_attempt``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Any

from clients.node.config import HookConfig
from clients.node.content import ContentError, content_dict
from clients.node.inbox import Entry, Inbox

log = logging.getLogger("coalition.node")

# Runs the hook ("$@"), and creates the marker named by COALITION_HOOK_DONE when it
# exits 0, whether or not the daemon is still there to see it.
_WRAPPER = (
    'done="$COALITION_HOOK_DONE"; unset COALITION_HOOK_DONE; "$@"; s=$?; '
    'if [ "$s" -eq 0 ]; then : > "$done"; fi; exit "$s"'
)
# How long a start-up waits for a hook a killed daemon left running, beyond its timeout.
_ORPHAN_GRACE_S = 5.0


def hook_document(e: Entry, payload: bytes, *, content: bool, inbox: str) -> dict[str, Any]:
    """Metadata, plus the decrypted summary fields when the hook is configured for content.

    Attachment bytes are never included (only name, type and size): a hook that needs
    them runs ``coalition-node show ID --json``.
    """
    doc: dict[str, Any] = {
        "message_id": e.message_id,
        "sender": e.sender,
        "sequence": e.sequence,
        "recipient_sequence": e.recipient_sequence,
        "topic": e.topic,
        "precedence": e.precedence,
        "label": e.label,
        "created_ms": e.created_ms,
        "received_ms": e.received_ms,
        "offset": e.offset,
        "content_type": e.content_type,
        "title": e.title,
        "inbox": inbox,
    }
    if content:
        try:
            doc["content"] = content_dict(e.content_type, payload, attachments=False)
        except ContentError:
            doc["content"] = None
    return doc


async def run_hook(
    hook: HookConfig,
    doc: dict[str, Any],
    *,
    done: Path | None = None,
    started: Path | None = None,
    attempt: int = 1,
) -> str:
    """Run the hook once; returns "ok" or what went wrong (never raises for hook failures).

    With ``done``, the wrapper creates that file when the hook exits 0; with ``started``,
    the wrapper's pid and the attempt are written there once it runs."""
    program = hook.command[0]
    if shutil.which(program) is None:
        return f"cannot start {program}: not found or not executable"
    data = json.dumps({**doc, "hook_attempt": attempt}).encode()
    env = dict(
        os.environ,
        COALITION_MESSAGE_ID=str(doc["message_id"]),
        COALITION_HOOK_ATTEMPT=str(attempt),
        COALITION_HOOK_DONE=str(done) if done is not None else os.devnull,
    )
    try:
        # Output is discarded: it may echo content, and our stderr is the status channel.
        # Its own session: it outlives a killed daemon, and a timeout kills it whole.
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            _WRAPPER,
            "coalition-hook",
            *hook.command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    except OSError as exc:
        return f"cannot start {program}: {exc.strerror}"
    if started is not None:
        started.write_text(f"{proc.pid} {attempt}\n")  # noqa: ASYNC240 - a few bytes
    try:
        await asyncio.wait_for(proc.communicate(data), hook.timeout_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        return f"timed out after {hook.timeout_s:g} s"
    except (BrokenPipeError, ConnectionResetError):
        await proc.wait()  # it exited without reading stdin; its exit code still counts
    return "ok" if proc.returncode == 0 else f"exit status {proc.returncode}"


class HookRunner:
    """Runs the hook for new inbox messages, and at start-up for those a stop left."""

    def __init__(self, hook: HookConfig, inbox: Inbox) -> None:
        self.hook = hook
        self.inbox = inbox
        self.dir = Path(f"{inbox.path}.hooks")
        self.dir.mkdir(mode=0o700, exist_ok=True)

    def _files(self, e: Entry) -> tuple[Path, Path]:
        key = hashlib.sha256(f"{e.sender}\0{e.message_id}".encode()).hexdigest()[:32]
        return self.dir / f"{key}.done", self.dir / f"{key}.run"

    async def run(self, e: Entry, attempt: int = 1) -> None:
        done, started = self._files(e)
        found = [p for x, p in self.inbox.find(e.message_id) if x.sender == e.sender]
        doc = hook_document(
            e, found[0] if found else b"", content=self.hook.content, inbox=str(self.inbox.path)
        )
        result = await run_hook(self.hook, doc, done=done, started=started, attempt=attempt)
        if result != "ok":
            log.warning(
                "hook failed for %s: %s",
                e.message_id,
                result,
                extra={"event": "hook_failed", "message_id": e.message_id, "attempt": attempt},
            )
        self._finish(e, "ok" if result == "ok" else "failed")

    def _finish(self, e: Entry, status: str) -> None:
        self.inbox.set_hook_status(e.sender, e.message_id, status)
        for f in self._files(e):
            f.unlink(missing_ok=True)

    async def resume(self) -> None:
        """Messages stored before a stop but not marked done: finished by a hook the
        daemon did not see exit (marked done now), or run again."""
        for e in self.inbox.entries(pending_hook=True):
            done, started = self._files(e)
            pid, attempt = _read_run(started)
            if pid and _is_wrapper(pid, done):
                log.info(
                    "waiting for the hook for %s left running by the last daemon",
                    e.message_id,
                    extra={"event": "hook_wait", "message_id": e.message_id},
                )
                await _wait_gone(pid, done, self.hook.timeout_s + _ORPHAN_GRACE_S)
            if done.exists():
                self._finish(e, "ok")  # it ran to the end; do not run it twice
                continue
            await self.run(e, attempt + 1)


def _read_run(path: Path) -> tuple[int, int]:
    try:
        pid, attempt = path.read_text().split()
        return int(pid), int(attempt)
    except (OSError, ValueError):
        return 0, 0


def _is_wrapper(pid: int, done: Path) -> bool:
    """Whether pid is still the wrapper that writes done (not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        env = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return b"coalition-hook" in cmdline and str(done).encode() in env


async def _wait_gone(pid: int, done: Path, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while _is_wrapper(pid, done) and loop.time() < deadline:  # noqa: ASYNC110 - another process
        await asyncio.sleep(0.1)
    if _is_wrapper(pid, done):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
