"""``coalition-admin partners rekey``'s arguments (the command is
``clients.admin.commands.partners_rekey``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from clients.admin import commands as cmd

Leaf = Callable[..., argparse.ArgumentParser]


def add_rekey(g: argparse._SubParsersAction[argparse.ArgumentParser], leaf: Leaf) -> None:
    """Add ``rekey`` to the ``partners`` group (leaf: how the CLI adds a command)."""
    p = leaf(
        g,
        "rekey",
        cmd.partners_rekey,
        "propose a new signing certificate for an admitted partner (e.g. one with an "
        "ML-DSA-65 key, to move it to envelope v2); a second operator must approve",
        "  coalition-admin partners rekey KOR --signing-cert pki/partners/KOR/signing.crt \\\n"
        "      --reason 'hybrid signing key'\n"
        "  # then, as another operator:\n"
        "  coalition-admin --identity pki/operators/op2 policy approve <PROPOSAL_ID>",
    )
    p.add_argument("partner", metavar="CODE", help="partner code, e.g. KOR")
    p.add_argument(
        "--signing-cert",
        type=Path,
        required=True,
        metavar="FILE",
        help="the partner's new signing certificate (PEM or DER), issued by the CA",
    )
    p.add_argument("--reason", required=True, help="why (recorded in the audit trail)")
