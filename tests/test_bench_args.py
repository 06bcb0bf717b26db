"""The bench's whole-number arguments refuse what they cannot use, with a clear message."""

from __future__ import annotations

import argparse

import pytest

from bench.report import at_least_one


def test_at_least_one_takes_whole_numbers_from_one() -> None:
    assert at_least_one("1") == 1
    assert at_least_one("12") == 12


@pytest.mark.parametrize("text", ["0", "-3", "x", "1.5", ""])
def test_at_least_one_refuses_the_rest(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="at least 1"):
        at_least_one(text)
