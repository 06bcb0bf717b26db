"""`coalition-admin` on a broker whose disk is full: `audit verify` still gives its verdict
(exit 0, "OK: ..."), and a registry change is refused with a status and a sentence that
names the full disk, never "UNKNOWN: Unexpected <class ...>". Real broker, real tmpfs
(needs root to mount, as CI has), the CLI as a subprocess."""

from __future__ import annotations

import json
from pathlib import Path

from coalition.cli_common import EXIT_OK, EXIT_REFUSED
from tests.helpers import admit, policy, running_broker
from tests.test_admin_cli import cli
from tests.test_disk_full import fill_disk, tmpfs


async def test_audit_verify_and_refusals_on_a_full_disk(pki: Path, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "6m") as disk:
        b = await running_broker(
            pki, disk / "broker", min_free_bytes=512 * 1024, audit_checkpoint_every=10_000
        )
        try:
            await admit(pki, b.port, policy("KOR"))
            fill_disk(disk, leave=0)  # not a byte free, the reserve included
            verify = await cli("audit", "verify", broker=b, pki=pki)
            as_json = await cli("audit", "verify", "--json", broker=b, pki=pki)
            change = await cli("suspend", "KOR", "--reason", "disk test", broker=b, pki=pki)
        finally:
            await b.stop(grace=1)
    assert verify.code == EXIT_OK, verify
    assert verify.out.startswith("OK: ") and verify.err == "", verify
    assert as_json.code == EXIT_OK and json.loads(as_json.out)["ok"] is True, as_json
    assert change.code == EXIT_REFUSED, change
    [line] = change.err.strip().splitlines()
    assert line.startswith("coalition-admin: RESOURCE_EXHAUSTED: ") and "full" in line, line
    for r in (verify, as_json, change):
        assert "Unexpected" not in r.err + r.out and "Traceback" not in r.err, r
