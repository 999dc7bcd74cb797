"""Tests for llmbatch.limits_redis against a real redis-server (started by conftest).

Redis's own clock drives these buckets, so the tests never sleep: they make single atomic
attempts (``try_acquire``) and check the admission decisions and the wait the script
computes, with a tolerance for the milliseconds that pass between calls.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from llmbatch.limits import Limits, RequestTooLarge
from llmbatch.limits_redis import RedisRateLimiter

pytestmark = pytest.mark.redis


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


def limiter(redis: Redis, quota: str, **limits: float) -> RedisRateLimiter:
    exact = Limits(initial_fill=1.0, reserve=0.0, transit=0.0, **limits)  # type: ignore[arg-type]
    return RedisRateLimiter(redis, exact, quota=quota)


def fresh() -> str:
    return f"test/{uuid.uuid4().hex}"


async def test_full_bucket_admits_capacity_then_reports_the_wait(redis: Redis) -> None:
    """RPM 60: sixty attempts pass, the next is refused with ~1 s to wait."""
    shared = limiter(redis, fresh(), rpm=60)
    for _ in range(60):
        wait, permit = await shared.try_acquire()
        assert (0.0, True) == (wait, permit is not None)
    wait, permit = await shared.try_acquire()
    assert permit is None
    assert 0.9 < wait <= 1.0


async def test_dimensions_are_taken_together_or_not_at_all(redis: Redis) -> None:
    """A refusal for tokens does not consume a request slot."""
    shared = limiter(redis, fresh(), rpm=2, tpm=100)
    assert (await shared.try_acquire(tokens=80))[1] is not None
    wait, permit = await shared.try_acquire(tokens=30)
    assert permit is None
    assert wait > 0
    assert (await shared.try_acquire(tokens=20))[1] is not None  # the rpm slot was kept


async def test_two_limiters_share_one_quota(redis: Redis) -> None:
    """Two limiters (as two processes would) draw from the same Redis bucket."""
    quota = fresh()
    a, b = limiter(redis, quota, rpm=60), limiter(redis, quota, rpm=60)
    for _ in range(30):
        assert (await a.try_acquire())[1] is not None
        assert (await b.try_acquire())[1] is not None
    assert (await a.try_acquire())[1] is None
    assert (await b.try_acquire())[1] is None


async def test_concurrency_leases(redis: Redis) -> None:
    """max_concurrency slots are shared leases; releasing one frees a slot."""
    shared = limiter(redis, fresh(), max_concurrency=2)
    first = (await shared.try_acquire())[1]
    assert first is not None
    assert (await shared.try_acquire())[1] is not None
    assert (-1.0, None) == await shared.try_acquire()
    first.release()
    await shared.flush()
    assert (await shared.try_acquire())[1] is not None


async def test_observe_drains_to_the_server_level(redis: Redis) -> None:
    """Headers saying fewer remain than Redis believes drain the shared bucket."""
    shared = limiter(redis, fresh(), rpm=600, tpm=10_000)
    permit = (await shared.try_acquire(tokens=100))[1]
    await shared.observe(
        {"x-ratelimit-remaining-requests": "590", "x-ratelimit-remaining-tokens": "500"}, permit
    )
    stats = shared.statistics()
    assert 500 == pytest.approx(stats.available["tpm"], abs=5)
    assert 590 == pytest.approx(stats.available["rpm"], abs=1)
    wait, refused = await shared.try_acquire(tokens=600)
    assert refused is None
    assert wait > 0


async def test_429_pauses_every_sharer(redis: Redis) -> None:
    """A 429 seen by one limiter pauses the other for the retry-after."""
    quota = fresh()
    a, b = limiter(redis, quota, rpm=600), limiter(redis, quota, rpm=600)
    await a.on_rate_limited(5.0, dimension="rpm")
    wait, permit = await b.try_acquire()
    assert permit is None
    assert 4.9 < wait <= 5.1 + 0.1  # the pause, then the first unit refills


async def test_settle_charges_the_shared_bucket(redis: Redis) -> None:
    """Settling with more than was reserved charges the difference in Redis."""
    shared = limiter(redis, fresh(), tpm=1000)
    permit = (await shared.try_acquire(tokens=500))[1]
    assert permit is not None
    permit.settle(tokens=900)
    await shared.flush()
    assert (await shared.try_acquire(tokens=200))[1] is None
    assert (await shared.try_acquire(tokens=90))[1] is not None


async def test_request_too_large_and_key_hygiene(redis: Redis) -> None:
    """Oversized requests fail at once; keys are namespaced and expire."""
    quota = fresh()
    shared = RedisRateLimiter(redis, Limits(tpm=100), quota=quota, namespace="ns1")
    with pytest.raises(RequestTooLarge, match="needs 101 tpm"):
        await shared.try_acquire(tokens=101)
    assert (await shared.try_acquire(tokens=10))[1] is not None
    ttl = await redis.ttl(f"llmbatch:ns1:{quota}")
    assert 0 < ttl <= 86_400


def openai_headers(limit: int, left: int) -> dict[str, str]:
    """A response's RPM headers."""
    return {"x-ratelimit-limit-requests": str(limit), "x-ratelimit-remaining-requests": str(left)}


async def test_a_learned_limit_is_shared_by_every_process(redis: Redis, redis_url: str) -> None:
    """Limits.auto(): one process learns RPM 60 from its headers; another process (its
    own Redis client) paces at it from its next request, and both see the same bucket."""
    quota = fresh()
    first = RedisRateLimiter(redis, Limits.auto(transit=0.0), quota=quota)
    other = RedisRateLimiter.from_url(redis_url, Limits.auto(transit=0.0), quota=quota)
    try:
        permit = (await first.try_acquire())[1]
        assert permit is not None
        assert {} == permit.cost  # nothing known yet: nothing charged
        permit.release()
        await first.observe(openai_headers(60, 59), permit)
        stats = first.statistics()
        assert ({"rpm": 60.0}, ("rpm",)) == (stats.capacity, stats.learned)
        unpaced = (await other.try_acquire())[1]  # adopts the limit from this reply
        assert unpaced is not None
        paced = (await other.try_acquire())[1]
        assert paced is not None
        assert {"rpm": 1.0} == paced.cost
        assert 58 == pytest.approx(paced.available_after["rpm"], abs=0.1)
        assert ("rpm",) == other.statistics().learned
    finally:
        await first.flush()
        await other.aclose()


async def test_a_learned_bucket_starts_below_the_server_by_what_is_in_flight(
    redis: Redis,
) -> None:
    """The server's remaining does not count requests still on their way: a newly learned
    bucket starts that much lower than the server says."""
    quota = fresh()
    one = RedisRateLimiter(redis, Limits.auto(transit=0.0), quota=quota)
    two = RedisRateLimiter(redis, Limits.auto(transit=0.0), quota=quota)
    reporting = (await one.try_acquire())[1]
    elsewhere = [(await two.try_acquire())[1] for _ in range(3)]  # in flight, other process
    assert reporting is not None
    await one.observe(openai_headers(60, 50), reporting)  # before its own release
    assert 47 == pytest.approx(one.statistics().available["rpm"], abs=0.1)  # 50 - 3
    for permit in elsewhere:
        assert permit is not None
        permit.release()
    reporting.release()
    await one.flush()
    await two.flush()


async def test_the_aimd_cap_is_shared_until_a_limit_is_known(redis: Redis) -> None:
    """Without known limits, Limits.auto() caps the quota's requests in flight at 8 for
    every process together; successes raise the shared cap, a 429 halves it."""
    quota = fresh()
    one = RedisRateLimiter(redis, Limits.auto(max_concurrency=64), quota=quota)
    two = RedisRateLimiter(redis, Limits.auto(max_concurrency=64), quota=quota)
    held = [(await one.try_acquire())[1] for _ in range(4)]
    held += [(await two.try_acquire())[1] for _ in range(4)]
    assert all(p is not None for p in held)
    assert (-1.0, None) == await one.try_acquire()  # 8 in flight: wait for a slot
    for permit in held:
        assert permit is not None
        permit.settle(tokens=10)
        permit.release()
    await one.flush()
    await two.flush()
    assert 8 < (one.statistics().concurrency_cap or 0) < 9  # 8 successes: +1/cap each
    await two.on_rate_limited(0.01)
    assert 4 < (two.statistics().concurrency_cap or 0) < 4.5


@pytest.mark.slow
async def test_four_processes_share_one_quota_without_429(redis_url: str) -> None:
    """Four worker processes, one Redis quota of 1,200 RPM, 1,240 requests in all against
    one simulator: the server never refuses one (so the shared quota was never exceeded)."""
    import json
    import sys
    from pathlib import Path

    from llmbatch.testing import Simulator

    worker = Path(__file__).parent / "helpers" / "redis_worker.py"
    quota = fresh()
    async with Simulator(rpm=1200) as sim:
        processes = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                str(worker),
                sim.base_url,
                redis_url,
                quota,
                "1200",
                "310",
                stdout=asyncio.subprocess.PIPE,
            )
            for _ in range(4)
        ]
        outputs = [await p.communicate() for p in processes]
        stats = sim.stats()
    reports = [json.loads(out.decode().strip().splitlines()[-1]) for out, _ in outputs]
    assert [{"ok": 310, "rate_limited": 0}] * 4 == reports
    assert {} == dict(stats.rate_limited)
    assert 1240 == stats.requests


async def test_first_headers_raise_a_half_full_start_later_ones_by_what_is_certain(
    redis: Redis,
) -> None:
    """A shared bucket starts half full; the first server headers lift it to the server's
    level; a later report of more left lifts only by what in-flight permits cannot explain."""
    shared = RedisRateLimiter(redis, Limits(rpm=600), quota=fresh())
    permit = (await shared.try_acquire())[1]
    assert permit is not None
    assert 299 == pytest.approx(permit.available_after["rpm"], abs=1)
    await shared.observe({"x-ratelimit-remaining-requests": "599"}, permit)
    assert 599 == pytest.approx(shared.statistics().available["rpm"], abs=1)
    second = (await shared.try_acquire())[1]  # the first is still in flight
    assert second is not None
    await shared.observe({"x-ratelimit-remaining-requests": "600"}, second)
    # 600 left after the second means the first had not reached the server: 599 is true
    assert 599 == pytest.approx(shared.statistics().available["rpm"], abs=0.5)


async def test_shared_bucket_keeps_its_cushion(redis: Redis) -> None:
    """reserve=0.05 keeps 5 of 100 unspent in the shared bucket too."""
    limits = Limits(rpm=100, initial_fill=1.0, reserve=0.05, transit=0.0)
    shared = RedisRateLimiter(redis, limits, quota=fresh())
    for _ in range(95):
        assert (await shared.try_acquire())[1] is not None
    wait, permit = await shared.try_acquire()
    assert permit is None
    assert 0.5 < wait <= 0.6  # one unit at 100/min


async def test_a_full_shared_bucket_charges_the_transit_once(redis: Redis) -> None:
    """In Redis too, the first request from a full bucket counts *transit* seconds of
    refill as in use (the server's full bucket gains nothing while it travels); the rest
    of the burst pays only for itself, and the permits count only their own cost."""
    limits = Limits(rpm=600, initial_fill=1.0, reserve=0.0, transit=0.5)
    shared = RedisRateLimiter(redis, limits, quota=fresh())
    first = (await shared.try_acquire())[1]
    second = (await shared.try_acquire())[1]
    assert first is not None
    assert second is not None
    assert 594 == pytest.approx(first.available_after["rpm"], abs=0.1)  # 1 + 5 of refill
    assert 593 == pytest.approx(second.available_after["rpm"], abs=0.1)
    assert ({"rpm": 1.0}, 1.0) == (second.cost, second.outstanding_before["rpm"])


@pytest.mark.parametrize(
    ("limits", "tokens", "first_wait"),
    [
        (Limits(rpm=120, initial_fill=0.0, transit=0.0), 0, 0.65),  # 1 + cushion at 2/s
        (Limits(tpm=10_000, transit=0.0), 6_000, 6.15),  # 1,025 missing at 166.7/s
    ],
)
async def test_a_refused_first_request_starts_the_bucket_all_the_same(
    redis: Redis, limits: Limits, tokens: int, first_wait: float
) -> None:
    """A shared bucket refused at its very first request (it starts empty, or the request
    is bigger than the starting fill) starts refilling then: the next attempt has less
    to wait, instead of the same wait forever."""
    shared = RedisRateLimiter(redis, limits, quota=fresh())
    wait, permit = await shared.try_acquire(tokens=tokens)
    assert permit is None
    assert first_wait == pytest.approx(wait, abs=0.05)
    again, _ = await shared.try_acquire(tokens=tokens)
    assert 0 < again < wait
