"""README.md's "Running each part by hand" runs as printed: it is scripts/walkthrough.sh,
shown verbatim, and this test runs the script (real broker, node and CLIs as processes)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "walkthrough.sh"


def _readme_block() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Running each part by hand", 1)[1].split("\n## ", 1)[0]
    m = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert m, "no bash block in README's 'Running each part by hand'"
    return m.group(1)


def test_readme_shows_the_script_verbatim() -> None:
    body = SCRIPT.read_text().split("\n", 1)[1]  # all but the #! line
    assert _readme_block() == body


def test_walkthrough_runs(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COALITION_")}
    env["BIN"] = str(Path(sys.executable).parent)
    env["TMPDIR"] = str(tmp_path)  # mktemp -d makes its scratch directory here
    proc = subprocess.Popen(
        ["bash", str(SCRIPT)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: leftovers are killed with it
    )
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"walkthrough did not finish in 120 s:\n{out.decode()}") from None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything still running from the script
        except ProcessLookupError:
            pass
    text = out.decode()
    assert proc.returncode == 0, text
    assert "Traceback" not in text, text
    published = r"published [0-9a-f]{32} \(offset 1, envelope v2\), sealed for USA"
    assert re.search(published, text), text
    inbox = text.splitlines()[-1]
    assert "KOR" in inbox and "FLASH" in inbox and "Armour moving north" in inbox, text
    assert list(tmp_path.iterdir()) == [], "the scratch directory was not removed"
