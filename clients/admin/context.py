"""What every ``coalition-admin`` command gets, and the failures that set the exit status."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from clients.sdk import OperatorClient

T = TypeVar("T")


class UsageError(Exception):
    """Bad arguments or local input (files, identity): exit status 2 (EXIT_USAGE)."""


class Unreachable(Exception):
    """The broker did not answer in time: exit status 4 (EXIT_UNREACHABLE)."""


class AuditBroken(Exception):
    """The audit chain does not verify: exit status 5 (the report is already printed)."""


@dataclass
class Ctx:
    """What every command gets: the client, its parsed arguments and the output mode."""

    client: OperatorClient
    ns: argparse.Namespace
    timeout: float
    as_json: bool

    async def rpc(self, aw: Awaitable[T]) -> T:
        """Await one broker call within the timeout."""
        try:
            return await asyncio.wait_for(aw, self.timeout)
        except TimeoutError:
            raise Unreachable(f"no answer from the broker within {self.timeout:g} s") from None


Command = Callable[[Ctx], Awaitable[None]]
