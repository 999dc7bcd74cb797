"""Tests for llmbatch.limits._permit: the bucket limiters' permit and what header
feedback reads from it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from llmbatch.limits import (
    BucketPermit,
    Limits,
    RateLimiter,
    RateLimitHeaders,
    plausible_limit,
    send_lag,
)
from llmbatch.testing.clock import FakeClock


@pytest.fixture
async def clock() -> AsyncIterator[FakeClock]:
    """The running loop on virtual time starting at 1000 s."""
    fake = FakeClock(start=1000.0)
    with fake.patch_loop():
        yield fake


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"openai-processing-ms": "900"}, 0.1),
        ({"OpenAI-Processing-Ms": "1500"}, 0.0),  # never negative
        ({"openai-processing-ms": "soon"}, 1.0),
        ({}, 1.0),
    ],
)
def test_send_lag(headers: dict[str, str], expected: float) -> None:
    """The send lag is the time to the response minus the server's processing time."""
    permit = BucketPermit(RateLimiter.__new__(RateLimiter), {}, {}, {}, acquired_at=100.0)
    processing = RateLimitHeaders.parse(headers).processing
    assert expected == pytest.approx(send_lag(permit, processing, now=101.0))


@pytest.mark.parametrize(
    ("dimension", "limit", "units", "expected"),
    [
        ("tpm", 10_000, {"tokens": 100.0}, True),
        ("tpm", 1, {}, False),  # an odd 1 providers send now and then
        ("rpm", 0, {}, False),
        ("tpm", 500, {"tokens": 1_000.0}, False),  # below what the server just admitted
        ("output_tpm", 500, {"tokens": 1_000.0}, True),  # another unit: no bound
    ],
)
def test_plausible_limit(
    dimension: str, limit: int, units: dict[str, float], expected: bool
) -> None:
    """A reported limit is adopted only if it is not 0 or 1 and not below the cost of
    the request the server has just admitted."""
    permit = BucketPermit(RateLimiter.__new__(RateLimiter), {}, {}, {}, units=units)
    assert expected == plausible_limit(dimension, limit, permit)


async def test_a_permit_is_an_async_context_manager_that_releases_once(
    clock: FakeClock,
) -> None:
    """``async with await limiter.acquire() as permit`` releases on exit; release is
    idempotent and settling twice changes nothing."""
    limiter = RateLimiter(Limits(tpm=1_000, initial_fill=1.0, reserve=0.0, transit=0.0))
    async with await limiter.acquire(tokens=100) as permit:
        assert (1, False) == (limiter.statistics().in_flight, permit.released)
    assert (0, True) == (limiter.statistics().in_flight, permit.released)
    permit.release()
    assert 0 == limiter.statistics().in_flight
    permit.settle(tokens=300)
    permit.settle(tokens=900)
    assert 700.0 == pytest.approx(limiter.statistics().available["tpm"])
    assert "<Permit {'tpm': 100} released=True settled=True>" == repr(permit)
