"""Tests for llmbatch.limits._bucket: the leaky bucket the in-process limiter builds on,
pinned to what the limiter relies on (virtual time: the bucket reads ``loop.time()``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from llmbatch.limits._bucket import Bucket
from llmbatch.testing.clock import FakeClock


@pytest.fixture
async def clock() -> AsyncIterator[FakeClock]:
    """The running loop on virtual time starting at 1000 s."""
    fake = FakeClock(start=1000.0)
    with fake.patch_loop():
        yield fake


async def test_a_bucket_starts_at_its_fill_and_refills_at_its_rate(clock: FakeClock) -> None:
    """RPM 600 half full: 300 available; 10 a second come back, never beyond capacity."""
    bucket = Bucket("rpm", 600.0, 60.0, fill=0.5)
    assert (300.0, 10.0, 600.0) == (bucket.available, bucket.rate, bucket.limit)
    clock.advance(10.0)
    assert 400.0 == pytest.approx(bucket.available)
    clock.advance(3_600.0)
    assert (600.0, 0.0) == (bucket.available, bucket.level)


@pytest.mark.parametrize(
    ("amount", "wait"),
    [
        (100.0, 0.0),  # fits: 100 available
        (150.0, 5.0),  # 50 missing at 10 a second
        (900.0, 50.0),  # beyond the capacity: fits an empty bucket (500 missing)
    ],
)
async def test_time_until_an_amount_fits(clock: FakeClock, amount: float, wait: float) -> None:
    """Seconds until *amount* fits; an amount beyond the capacity waits for an empty
    bucket rather than forever."""
    bucket = Bucket("rpm", 600.0, 60.0, fill=1.0)
    bucket.take(500.0)
    assert wait == pytest.approx(bucket.time_until(amount))


async def test_taking_may_go_into_debt_and_refunds_never_beyond_empty(clock: FakeClock) -> None:
    """take() charges whatever it is given (settling more than reserved, a 429's pause);
    give_back() never leaves more than the capacity available."""
    bucket = Bucket("tpm", 1_000.0, 60.0, fill=1.0)
    bucket.take(1_300.0)
    assert -300.0 == pytest.approx(bucket.available)
    assert (300.0 + 100.0) * 60 / 1_000 == pytest.approx(bucket.time_until(100.0))
    bucket.give_back(5_000.0)
    assert 1_000.0 == bucket.available


@pytest.mark.parametrize(
    ("fill", "left"),
    [
        (1.0, 600.0 - 5 - 1),  # full: half a second of refill (5) counts as in use
        (0.5, 300.0 - 1),  # half full: more in use than the transit's refill already
    ],
)
async def test_a_full_bucket_charges_the_transit(
    clock: FakeClock, fill: float, left: float
) -> None:
    """A request taken from a (nearly) full bucket counts *transit* seconds of refill as
    in use, once: the level is at least that refill, plus the amount."""
    bucket = Bucket("rpm", 600.0, 60.0, fill=fill)
    bucket.take(1.0, transit=0.5)
    assert left == pytest.approx(bucket.available)


async def test_set_available_makes_exactly_that_available(clock: FakeClock) -> None:
    """What header corrections use: exactly *amount* available, whatever the level was
    (never more than the capacity)."""
    bucket = Bucket("rpm", 600.0, 60.0, fill=0.5)
    bucket.set_available(123.0)
    assert 123.0 == bucket.available
    bucket.set_available(-50.0)
    assert -50.0 == bucket.available
    bucket.set_available(900.0)
    assert 600.0 == bucket.available


async def test_other_spenders_get_a_share_of_the_refill_at_most_nine_tenths(
    clock: FakeClock,
) -> None:
    """set_external() leaves part of the server's refill to others: this limiter refills
    slower, the limit stays the server's; at most 90% is ever left to others."""
    bucket = Bucket("rpm", 600.0, 60.0, fill=0.0)
    bucket.set_external(4.0)
    assert (6.0, 4.0, 10.0, 600.0) == (
        bucket.rate,
        bucket.external,
        bucket.nominal_rate,
        bucket.limit,
    )
    clock.advance(10.0)
    assert 60.0 == pytest.approx(bucket.available)
    bucket.set_external(100.0)
    assert (1.0, 9.0) == pytest.approx((bucket.rate, bucket.external))


async def test_a_learned_burst_shrinks_the_bucket_not_the_rate(clock: FakeClock) -> None:
    """RPM 10,000 whose server holds 1,000 at once: the bucket holds 1,000, refills at
    the full rate, and keeps what could be taken (within the smaller bucket). A smaller
    reading later changes nothing; a bigger one raises it."""
    bucket = Bucket("rpm", 10_000.0, 60.0, fill=0.05)  # 500 available
    assert bucket.learn_burst(1_000.0)
    assert (1_000.0, 500.0, 10_000.0) == (bucket.capacity, bucket.available, bucket.limit)
    assert 10_000.0 / 60 == pytest.approx(bucket.rate)
    assert not bucket.learn_burst(900.0)
    assert bucket.learn_burst(1_200.0)
    assert 1_200.0 == bucket.capacity


async def test_resize_keeps_what_is_in_use_and_a_learned_burst(clock: FakeClock) -> None:
    """A new limit changes the refill and the capacity (no more than a learned burst),
    keeping the level: what is in use stays in use."""
    bucket = Bucket("rpm", 600.0, 60.0, fill=1.0)
    bucket.take(100.0)
    bucket.resize(1_200.0)
    assert (1_200.0, 20.0, 1_100.0) == (bucket.capacity, bucket.rate, bucket.available)
    bucket.learn_burst(300.0)
    bucket.resize(6_000.0)
    assert (300.0, 6_000.0) == (bucket.capacity, bucket.limit)


def test_outside_the_loop_the_level_is_as_last_updated() -> None:
    """A bucket read after its event loop ended (a CLI summary, a notebook cell) gives
    the level as last updated instead of raising."""

    async def build() -> Bucket:
        bucket = Bucket("rpm", 60.0, 60.0, fill=1.0)
        bucket.take(10.0)
        return bucket

    bucket = asyncio.run(build())
    assert 50.0 == pytest.approx(bucket.available, abs=0.01)
    assert "<Bucket rpm level=10.0/60.0 rate=1/s>" == repr(bucket)
