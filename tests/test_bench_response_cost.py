"""bench.response_cost: real grpc.aio over mutual TLS, subscriber processes that parse what
they get; every delivery arrives, in the number of responses asked for."""

from __future__ import annotations

import pytest

from bench import response_cost


async def test_each_subscriber_gets_every_delivery_in_the_responses_asked_for() -> None:
    r = await response_cost.measure((1, 4, 16), 40, subscribers=2)
    assert [row.per_response for row in r.rows] == [1, 4, 16]
    assert [row.deliveries for row in r.rows] == [80, 80, 80]
    assert [row.responses for row in r.rows] == [80, 20, 6]  # 16, 16, 8 per subscriber
    assert all(8000 < row.bytes_per_delivery < 10000 for row in r.rows)  # v2, epochs carried
    assert "per response" in response_cost.table(r)


def test_the_fit_separates_per_response_from_per_delivery() -> None:
    fitted = response_cost._fit([(1.0, 70.0), (0.25, 25.0), (1 / 16, 13.75)])
    assert fitted == pytest.approx((60.0, 10.0))
    assert response_cost._fit([(1.0, 5.0)]) == (0.0, 5.0)
