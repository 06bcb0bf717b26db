"""The per-message hook: a command fed one JSON document on stdin, time-limited."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from clients.node.config import HookConfig
from clients.node.content import ContentError, content_dict
from clients.node.inbox import Entry


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


async def run_hook(hook: HookConfig, doc: dict[str, Any]) -> str:
    """Run the hook once; returns "ok" or what went wrong (never raises for hook failures)."""
    data = json.dumps(doc).encode()
    env = dict(os.environ, COALITION_MESSAGE_ID=str(doc["message_id"]))
    try:
        # Output is discarded: it may echo content, and our stderr is the status channel.
        proc = await asyncio.create_subprocess_exec(
            *hook.command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env=env,
        )
    except OSError as exc:
        return f"cannot start {hook.command[0]}: {exc.strerror}"
    try:
        await asyncio.wait_for(proc.communicate(data), hook.timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return f"timed out after {hook.timeout_s:g} s"
    except (BrokenPipeError, ConnectionResetError):
        await proc.wait()  # it exited without reading stdin; its exit code still counts
    return "ok" if proc.returncode == 0 else f"exit status {proc.returncode}"
