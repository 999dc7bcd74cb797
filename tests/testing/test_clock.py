"""Tests for llmbatch.testing.clock.FakeClock."""

from __future__ import annotations

import asyncio
import time

import pytest

from llmbatch.testing.clock import FakeClock


def test_time_and_advance() -> None:
    """time() starts at ``start`` and moves only when advanced."""
    clock = FakeClock(start=100.0)
    assert 100.0 == clock.time() == clock()
    clock.advance(2.5)
    assert 102.5 == clock.time()
    with pytest.raises(ValueError, match="cannot move a clock backward"):
        clock.advance(-1)


async def test_sleep_records_and_advances() -> None:
    """The injectable sleep records each duration and advances virtual time by it."""
    clock = FakeClock()
    await clock.sleep(1.5)
    await clock.sleep(-3)  # clamped, as asyncio.sleep treats negatives as 0
    await clock.sleep(2)
    assert ([1.5, 0.0, 2.0], 3.5) == (clock.sleeps, clock.time())
    assert "<FakeClock now=3.500000 sleeps=3>" == repr(clock)


async def test_patch_loop_jumps_to_the_next_timer() -> None:
    """Inside patch_loop, an hour of asyncio.sleep passes instantly on virtual time."""
    clock = FakeClock(start=10.0)
    wall = time.monotonic()
    with clock.patch_loop():
        loop = asyncio.get_running_loop()
        assert 10.0 == loop.time()
        await asyncio.sleep(3600)
        assert 3610.0 == pytest.approx(loop.time())
    assert time.monotonic() - wall < 5  # no real hour went by
    assert asyncio.get_running_loop().time() != clock.time()  # restored on exit


async def test_patch_loop_orders_concurrent_timers() -> None:
    """Concurrent sleepers wake in virtual-time order at their exact deadlines."""
    clock = FakeClock()
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, seconds: float) -> None:
        await asyncio.sleep(seconds)
        woke.append((name, clock.time()))

    with clock.patch_loop():
        await asyncio.gather(sleeper("c", 30), sleeper("a", 10), sleeper("b", 20))
    assert ["a", "b", "c"] == [name for name, _ in woke]
    assert [10.0, 20.0, 30.0] == [pytest.approx(t) for _, t in woke]


async def test_patch_loop_drives_wait_for_timeouts() -> None:
    """asyncio timeouts fire on virtual time."""
    clock = FakeClock()
    with clock.patch_loop():
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.Event().wait(), timeout=45)
        assert 45.0 == pytest.approx(clock.time())
