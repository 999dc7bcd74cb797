"""Tests for llmbatch.concurrency: the in-flight target (Little's law) and its gate."""

from __future__ import annotations

import asyncio

import pytest

from llmbatch.concurrency import FLOOR, SAFETY_CAP, InFlight, in_flight_target


@pytest.mark.parametrize(
    ("rate", "latency", "cap", "expected"),
    [
        (10_000 / 60, 1.0, None, 334),  # RPM 10,000 at 1 s: 166.7 in flight, x2
        (30_000 / 60, 1.0, None, 1000),
        (600 / 60, 1.0, None, 20),  # tier 1
        (600 / 60, 0.5, None, FLOOR),  # 10 wanted: the floor
        (30_000 / 60, 5.0, None, SAFETY_CAP),  # 5,000 wanted: the safety cap
        (None, 1.0, None, SAFETY_CAP),  # no rate limit known
        (10_000 / 60, 1.0, 32, 32),  # an explicit cap wins
    ],
)
def test_in_flight_target_follows_rate_and_latency(
    rate: float | None, latency: float, cap: int | None, expected: int
) -> None:
    """in flight = rate x latency x 2, within [16, 2048]; an explicit cap is used as is."""
    assert expected == in_flight_target(rate, latency, cap=cap).limit


def test_the_reason_says_how_the_target_was_sized() -> None:
    """The reason names the rate, the latency and any bound that applied."""
    assert "166.7 req/s x 1.00 s latency x 2" == in_flight_target(10_000 / 60, 1.0).reason
    assert in_flight_target(500.0, 5.0).reason.endswith("held to the safety cap")
    assert "max_concurrency=8 (given)" == in_flight_target(1.0, 1.0, cap=8).reason


async def test_the_gate_holds_requests_to_the_target_and_grows_with_it() -> None:
    """With a target of 16, the 17th waits; a larger target lets it in at once."""
    gate = InFlight()
    gate.resize(4.0)  # 4 req/s x 2 s (no latency measured yet) x 2 = 16
    assert 16 == gate.target.limit
    entered = 0
    release = asyncio.Event()

    async def request() -> None:
        nonlocal entered
        async with gate:
            entered += 1
            await release.wait()

    tasks = [asyncio.create_task(request()) for _ in range(40)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert (16, 16) == (entered, gate.in_flight)
    gate.resize(10.0)  # 10 x 2 x 2 = 40
    for _ in range(5):
        await asyncio.sleep(0)
    assert 40 == entered
    release.set()
    await asyncio.gather(*tasks)
    assert 0 == gate.in_flight


async def test_the_target_follows_the_measured_latency() -> None:
    """The median latency of recent answers sizes the target: it shrinks when answers
    come faster and grows when they slow down."""
    gate = InFlight()
    for _ in range(20):
        gate.observe(0.5)
    gate.resize(100.0)
    assert 100 == gate.target.limit
    for _ in range(300):
        gate.observe(3.0)
    gate.resize(100.0)
    assert 600 == gate.target.limit


async def test_a_cancelled_waiter_takes_no_slot() -> None:
    """A waiter cancelled in line leaves the count as it was; one cancelled just as it
    was handed a slot passes the slot on."""
    gate = InFlight(cap=1)
    await gate.__aenter__()
    waiter = asyncio.create_task(gate.__aenter__())
    other = asyncio.create_task(gate.__aenter__())
    await asyncio.sleep(0)
    waiter.cancel()
    await gate.__aexit__()  # hands the slot to the next in line
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await other
    assert 1 == gate.in_flight
