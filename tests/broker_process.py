"""A real `coalition-broker serve` process with extra command-line arguments (a config
file, --log-json, ...): the fault tests' BrokerProcess, one hook wider."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field

from tests.helpers import broker_argv
from tests.test_broker_faults import ROOT, BrokerProcess


@dataclass
class ConfiguredBroker(BrokerProcess):
    """BrokerProcess whose command line ends with extra_args; stderr is its own file."""

    extra_args: list[str] = field(default_factory=list)

    def spawn(self) -> subprocess.Popen[bytes]:
        self.starts += 1
        with (self.data.parent / f"broker-{self.starts}.log").open("wb") as log:
            return subprocess.Popen(
                [*broker_argv(self.pki, self.data, self.port, self.port_file), *self.extra_args],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log_bytes(self) -> bytes:
        """Everything the process wrote so far, raw (to look for control bytes)."""
        return (self.data.parent / f"broker-{self.starts}.log").read_bytes()
