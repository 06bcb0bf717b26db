from __future__ import annotations

from pathlib import Path

import pytest

from coalition.pki import make_dev_pki
from tests.helpers import ALL_PARTNERS, OPERATORS, now_ms


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A development PKI shared by the whole session (keys are slow-ish to make)."""
    d = tmp_path_factory.mktemp("pki")
    make_dev_pki(d, ALL_PARTNERS, OPERATORS, now_ms(), force=True)
    return d
