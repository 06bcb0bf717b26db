"""Scraping a broker's metrics endpoint over real HTTP, and parsing what it serves."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass
class Scrape:
    """One scrape: the raw text, and every sample as (name, labels) -> value."""

    text: str
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]
    content_type: str

    def value(self, name: str, **labels: str) -> float:
        """The sample's value; 0 when the series is absent (a counter never bumped)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def series(self, name: str) -> list[dict[str, str]]:
        """The label sets of every sample named name."""
        return [dict(lbl) for (n, lbl) in self.samples if n == name]

    def total(self, name: str, **match: str) -> float:
        """The sum over every sample of name whose labels include match."""
        return sum(
            v
            for (n, lbl), v in self.samples.items()
            if n == name and all(dict(lbl).get(k) == want for k, want in match.items())
        )


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


async def http_get(port: int, path: str = "/metrics") -> tuple[int, str, str]:
    """GET http://127.0.0.1:port/path with the standard library's client, off the loop."""
    return await asyncio.to_thread(_get, f"http://127.0.0.1:{port}{path}")


async def scrape(port: int) -> Scrape:
    status, ctype, text = await http_get(port)
    assert status == 200, (status, text)
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return Scrape(text, samples, ctype)
