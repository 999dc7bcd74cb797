"""Tests for llmbatch.limits.redis against a real redis-server (started by conftest).

Redis's own clock drives these buckets, so the tests do not sleep: they make single atomic
attempts (``try_acquire``) and check the admission decisions and the wait the script
computes, with a tolerance for the milliseconds that pass between calls. The few that
must let Redis's clock pass (an ``acquire`` that waits, a lease that expires) wait for
it for real, and as briefly as they can.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from structlog.testing import capture_logs

from llmbatch.client import LLMClient
from llmbatch.errors import LimiterUnavailable, redact
from llmbatch.failure import is_fatal
from llmbatch.limits import Limits, RedisRateLimiter, RequestTooLarge
from llmbatch.models import Request, Response
from llmbatch.providers.fake import FakeProvider


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    """A client of the session's redis-server (tests/conftest.py)."""
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


pytestmark = pytest.mark.redis


def limiter(redis: Redis, quota: str, **limits: float) -> RedisRateLimiter:
    exact = Limits(initial_fill=1.0, reserve=0.0, transit=0.0, **limits)  # type: ignore[arg-type]
    return RedisRateLimiter(redis, exact, quota=quota)


def fresh() -> str:
    return f"test/{uuid.uuid4().hex}"


def key_of(quota: str) -> str:
    """The quota's bucket hash (its leases and lease records are this plus a suffix)."""
    return f"llmbatch:default:{quota}"


async def counted(redis: Redis, quota: str) -> dict[str, float]:
    """What Redis counts of the quota's permits: the outstanding amounts (``rpm:out``,
    ``u:tokens:out``...), the leases and the lease records; zeros left out."""
    key = key_of(quota)
    fields = {
        name.decode() if isinstance(name, bytes) else name: value
        for name, value in (await redis.hgetall(key)).items()
    }
    found = {name: float(value) for name, value in fields.items() if name.endswith(":out")}
    found["leases"] = await redis.zcard(f"{key}:leases")
    found["records"] = await redis.hlen(f"{key}:counted")
    return {name: value for name, value in found.items() if value}


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
    shared = RedisRateLimiter(
        redis, Limits(tpm=100, initial_fill=0.5), quota=quota, namespace="ns1"
    )
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
    own Redis client) paces at it from its very next request, which is charged for it,
    and both see the same bucket."""
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
        charged = (await other.try_acquire())[1]  # adopts the limit, then is charged
        assert charged is not None
        assert {"rpm": 1.0} == charged.cost
        assert 58 == pytest.approx(charged.available_after["rpm"], abs=0.1)
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

    worker = Path(__file__).parents[1] / "helpers" / "redis_worker.py"
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
    shared = RedisRateLimiter(redis, Limits(rpm=600, initial_fill=0.5), quota=fresh())
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
    started = time.monotonic()
    for _ in range(95):
        assert (await shared.try_acquire())[1] is not None
    wait, permit = await shared.try_acquire()
    elapsed = time.monotonic() - started  # Redis's clock is real: the bucket refilled meanwhile
    assert permit is None
    assert 0.6 - elapsed - 0.01 < wait <= 0.6  # one unit at 100/min, less what refilled


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
        (Limits(tpm=10_000, initial_fill=0.5, transit=0.0), 6_000, 6.15),  # 1,025 at 166.7/s
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


# -- cancellation, killed workers, key expiry --------------------------------------------


async def test_an_acquire_cancelled_while_its_script_is_in_flight_takes_nothing(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A waiter cancelled after the acquire script has run in Redis but before its reply
    is back gives everything back: bucket levels, its lease and the outstanding counts."""
    quota = fresh()
    shared = limiter(redis, quota, rpm=60, tpm=1000, max_concurrency=1)
    script = shared._acquire_script
    ran, reply_arrives = asyncio.Event(), asyncio.Event()

    async def in_flight(**call: Any) -> Any:
        reply = await script(**call)  # the script has run in Redis...
        ran.set()
        await reply_arrives.wait()  # ...and its reply is still on its way back
        return reply

    monkeypatch.setattr(shared, "_acquire_script", in_flight)
    waiter = asyncio.create_task(shared.acquire(tokens=400))
    await ran.wait()
    waiter.cancel()
    reply_arrives.set()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await shared.flush()
    assert {} == await counted(redis, quota)
    stats = shared.statistics()
    assert (0, 0, 0) == (stats.acquired, stats.in_flight, stats.waiting)
    permit = (await shared.try_acquire(tokens=400))[1]  # the slot is free, the buckets full
    assert permit is not None
    assert {"rpm": 59, "tpm": 600} == pytest.approx(permit.available_after, abs=0.1)
    assert {"rpm": 0.0, "tpm": 0.0} == permit.outstanding_before


async def test_a_permit_never_released_stops_counting_when_its_lease_expires(
    redis: Redis,
) -> None:
    """A worker killed with a permit in flight: while its lease runs the permit counts as
    outstanding; once it expires, it counts neither in what later permits find
    outstanding (header lifts) nor in what a newly learned bucket allows for."""
    quota = fresh()
    limits = Limits.auto(rpm=600, transit=0.0)
    killed = RedisRateLimiter(redis, limits, quota=quota, lease_seconds=0.3)
    alive = RedisRateLimiter(redis, limits, quota=quota)
    assert (await killed.try_acquire(tokens=100))[1] is not None  # never released
    meanwhile = (await alive.try_acquire(tokens=100))[1]
    assert meanwhile is not None
    assert {"rpm": 1.0} == meanwhile.outstanding_before
    meanwhile.release()
    await alive.flush()
    await asyncio.sleep(0.4)  # the lease expires on Redis's clock: only real time passes it
    permit = (await alive.try_acquire(tokens=100))[1]
    assert permit is not None
    assert {"rpm": 0.0} == permit.outstanding_before
    await alive.observe(
        {"x-ratelimit-limit-tokens": "10000", "x-ratelimit-remaining-tokens": "5000"}, permit
    )
    assert 5000 == pytest.approx(alive.statistics().available["tpm"], abs=0.1)
    expected = {"rpm:out": 1, "u:requests:out": 1, "u:tokens:out": 100, "leases": 1, "records": 1}
    assert expected == await counted(redis, quota)  # only the permit still held
    permit.release()
    await alive.flush()


async def test_no_key_is_left_without_an_expiry_after_a_release(redis: Redis) -> None:
    """After a release every key of the quota still expires, even when its bucket hash
    expired while the request was in flight (the release must not recreate it bare)."""
    quota = fresh()
    key = key_of(quota)
    shared = limiter(redis, quota, rpm=60)
    first = (await shared.try_acquire())[1]
    second = (await shared.try_acquire())[1]
    assert first is not None
    assert second is not None
    first.release()
    await shared.flush()
    ttls = {name.decode(): await redis.ttl(name) async for name in redis.scan_iter(f"{key}*")}
    assert [] == [name for name, ttl in ttls.items() if not 0 < ttl <= 86_400]
    assert key in ttls
    await redis.delete(key)  # the hash expired while the second request was in flight
    second.release()
    await shared.flush()
    ttls = {name.decode(): await redis.ttl(name) async for name in redis.scan_iter(f"{key}*")}
    assert [] == [name for name, ttl in ttls.items() if not 0 < ttl <= 86_400]


async def test_a_request_too_large_for_a_learned_limit_fails_in_every_process(
    redis: Redis, redis_url: str
) -> None:
    """Once TPM 1,000 is learned, a 2,000-token acquire fails at once with RequestTooLarge,
    in the process that learned it and in another one that has not adopted it yet."""
    quota = fresh()
    first = RedisRateLimiter(redis, Limits.auto(transit=0.0), quota=quota)
    other = RedisRateLimiter.from_url(redis_url, Limits.auto(transit=0.0), quota=quota)
    try:
        permit = (await first.try_acquire(tokens=100))[1]
        assert permit is not None
        permit.release()
        headers = {"x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "900"}
        await first.observe(headers, permit)
        with pytest.raises(RequestTooLarge, match="needs 2,000 tpm but the limit is 1,000"):
            await first.acquire(tokens=2000)
        with pytest.raises(RequestTooLarge, match="needs 2,000 tpm but the limit is 1,000"):
            await other.acquire(tokens=2000)
        assert (0, 0) == (other.statistics().acquired, other.statistics().in_flight)
    finally:
        await first.flush()
        await other.aclose()


# -- logging and statistics ----------------------------------------------------------------


async def test_a_wait_longer_than_a_second_is_logged(redis: Redis) -> None:
    """acquire() logs limits.waited (debug) after a wait over a second, as the in-process
    limiter does, and counts it in the statistics (RPM 50 from empty: 1.2 s)."""
    quota = fresh()
    limits = Limits(rpm=50, initial_fill=0.0, reserve=0.0, transit=0.0)
    shared = RedisRateLimiter(redis, limits, quota=quota)
    with capture_logs() as logs:
        permit = await shared.acquire()
    permit.release()
    waited = [entry for entry in logs if entry["event"] == "limits.waited"]
    assert [("debug", quota)] == [(entry["log_level"], entry["limiter"]) for entry in waited]
    assert 1.2 == pytest.approx(waited[0]["seconds"], abs=0.1)
    assert 1.2 == pytest.approx(shared.statistics().max_wait_seconds, abs=0.1)
    await shared.flush()


async def test_a_429_is_logged_and_its_pause_reported_by_every_sharer(redis: Redis) -> None:
    """on_rate_limited logs limits.cooldown; the pause shows in cooldown_remaining of the
    limiter that saw the 429, and of another one once Redis refuses it because of it."""
    quota = fresh()
    seen, other = limiter(redis, quota, rpm=600), limiter(redis, quota, rpm=600)
    with capture_logs() as logs:
        await seen.on_rate_limited(5.0, dimension="rpm")
    expected = {
        "event": "limits.cooldown",
        "log_level": "info",
        "limiter": quota,
        "seconds": 5.0,
        "dimension": "rpm",
        "shared": True,
    }
    assert [expected] == logs
    assert 5.0 == pytest.approx(seen.statistics().cooldown_remaining, abs=0.1)
    assert 0.0 == other.statistics().cooldown_remaining  # it has not heard of it yet
    assert (await other.try_acquire())[1] is None
    assert 5.0 == pytest.approx(other.statistics().cooldown_remaining, abs=0.1)


async def test_a_learned_limit_is_logged_by_every_process_that_adopts_it(redis: Redis) -> None:
    """limits.learned (info) is logged by the process whose headers taught the limit and by
    the other one when it adopts it."""
    quota = fresh()
    first = RedisRateLimiter(redis, Limits.auto(transit=0.0), quota=quota)
    other = RedisRateLimiter(redis, Limits.auto(transit=0.0), quota=quota)
    with capture_logs() as logs:
        permit = (await first.try_acquire())[1]
        assert permit is not None
        permit.release()
        await first.observe(openai_headers(60, 59), permit)
        adopted = (await other.try_acquire())[1]
        assert adopted is not None
        adopted.release()
    learned = [
        (entry["log_level"], entry["limiter"], entry["dimension"], entry["limit"])
        for entry in logs
        if entry["event"] == "limits.learned"
    ]
    assert [("info", quota, "rpm", 60.0)] * 2 == learned
    await first.flush()
    await other.flush()


# -- the rest of the contract, over Redis ---------------------------------------------------


async def test_acquire_waits_for_the_bucket_and_serves_waiters_in_arrival_order(
    redis: Redis,
) -> None:
    """acquire() waits until the request fits; a process's waiters are served first come,
    first served: a big request at the head is not overtaken by small ones that would fit
    sooner (TPM 6,000: 100 tokens a second, all spent)."""
    shared = limiter(redis, fresh(), tpm=6000)
    spending = (await shared.try_acquire(tokens=6000))[1]
    assert spending is not None
    spending.release()  # the tokens stay spent
    order: list[str] = []

    async def one(name: str, tokens: int) -> None:
        permit = await shared.acquire(tokens=tokens)
        order.append(name)
        permit.release()

    await asyncio.gather(one("big", 10), one("small", 1), one("tiny", 1))
    assert ["big", "small", "tiny"] == order
    stats = shared.statistics()
    assert (4, 0, 0) == (stats.acquired, stats.waiting, stats.in_flight)
    assert 0.09 < stats.max_wait_seconds < 1.0  # ~0.12 s: 10 + 1 + 1 tokens at 100/s
    await shared.flush()


async def test_input_and_output_tokens_are_taken_together_and_unused_output_refunded(
    redis: Redis,
) -> None:
    """Anthropic's ITPM and OTPM: one acquire takes both or neither; with refund_unused
    settling gives back the output tokens the response did not use."""
    limits = Limits(
        input_tpm=1000,
        output_tpm=500,
        refund_unused=True,
        initial_fill=1.0,
        reserve=0.0,
        transit=0.0,
    )
    shared = RedisRateLimiter(redis, limits, quota=fresh())
    first = (await shared.try_acquire(input_tokens=400, output_tokens=300))[1]
    assert first is not None
    assert {"input_tpm": 400.0, "output_tpm": 300.0} == first.cost
    wait, refused = await shared.try_acquire(input_tokens=400, output_tokens=300)
    assert refused is None  # 600 output tokens: more than OTPM 500 holds
    assert wait > 0
    second = (await shared.try_acquire(input_tokens=600, output_tokens=200))[1]
    assert second is not None  # the refusal took none of the input tokens
    assert {"input_tpm": 0, "output_tpm": 0} == pytest.approx(second.available_after, abs=1)
    first.settle(input_tokens=400, output_tokens=100)
    await shared.flush()
    third = (await shared.try_acquire(input_tokens=0, output_tokens=200))[1]
    assert third is not None  # the 200 output tokens the first did not use
    assert 0 == pytest.approx(third.available_after["output_tpm"], abs=1)


async def test_a_429_of_unknown_kind_empties_per_minute_buckets_not_a_per_day_one(
    redis: Redis,
) -> None:
    """on_rate_limited() without a dimension restarts RPM empty (0.1 of debt after a
    0.01 s pause at 10/s) but leaves RPD alone: the next wait is RPM's refill, not the
    86 s an emptied RPD of 1,000 a day would need for one request."""
    shared = limiter(redis, fresh(), rpm=600, rpd=1000)
    assert (await shared.try_acquire())[1] is not None
    await shared.on_rate_limited(0.01)
    assert -0.1 == pytest.approx(shared.statistics().available["rpm"], abs=0.02)
    wait, permit = await shared.try_acquire()
    assert permit is None
    assert 0.11 == pytest.approx(wait, abs=0.02)


async def test_implausible_learned_limits_are_not_adopted(redis: Redis) -> None:
    """Limits.auto() ignores a header limit of 1 and a limit below the cost of the request
    just admitted (TPM 1,000 after a 5,000-token request): neither is paced at nor stored
    for other processes, while a plausible one in the next headers is."""
    quota = fresh()
    shared = RedisRateLimiter(redis, Limits.auto(transit=0.0), quota=quota)
    permit = (await shared.try_acquire(tokens=5000))[1]
    assert permit is not None
    headers = {
        **openai_headers(1, 0),
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "0",
    }
    await shared.observe(headers, permit)
    stats = shared.statistics()
    assert ({}, ()) == (stats.capacity, stats.learned)
    assert None is await redis.hget(key_of(quota), "learned")
    await shared.observe(openai_headers(60, 59), permit)
    assert {"rpm": 60.0} == shared.statistics().capacity
    permit.release()
    await shared.flush()


@pytest.mark.parametrize(("provider_rule", "kept"), [(True, 50.0), (False, 500.0)])
async def test_settling_follows_the_providers_refund_rule(
    redis: Redis, provider_rule: bool, kept: float
) -> None:
    """With default limits (``refund_unused=None``) the shared bucket gets the unused
    reservation back only if the provider's rule says so (Anthropic's does)."""
    limits = Limits(output_tpm=10_000, initial_fill=1.0, reserve=0.0, transit=0.0)
    shared = RedisRateLimiter(redis, limits, quota=fresh())
    permit = (await shared.try_acquire(output_tokens=500))[1]
    assert permit is not None
    permit.settle(output_tokens=50, refund=provider_rule)
    await shared.flush()
    after = (await shared.try_acquire(output_tokens=0))[1]
    assert after is not None
    assert 10_000 - kept == pytest.approx(after.available_after["output_tpm"], abs=1)


async def test_nested_async_with_releases_each_its_own_permit(redis: Redis) -> None:
    """``async with shared: async with shared:`` gives both permits back on the way out."""
    shared = limiter(redis, fresh(), rpm=60)
    async with shared, shared:
        assert 2 == shared.statistics().in_flight
    assert 0 == shared.statistics().in_flight
    await shared.flush()
    after = (await shared.try_acquire())[1]  # both releases reached Redis
    assert after is not None
    assert 0.0 == after.outstanding_before["rpm"]
    after.release()
    await shared.flush()


# -- a Redis that cannot be used: one fatal error, before any request ---------------------

#: a password that must never show in a message
SECRET = "limiter-SECRET-pw-31d7"


def dead_url(password: str | None = SECRET) -> str:
    """A redis:// URL of a port on 127.0.0.1 where nothing listens (bound, then freed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    secret = "" if password is None else f":{password}@"
    return f"redis://{secret}127.0.0.1:{port}/0"


def other_password(url: str, password: str | None) -> str:
    """*url* of the password-protected server, with *password* (``None``: none) instead."""
    host = url.rpartition("@")[2]
    return f"redis://{host}" if password is None else f"redis://:{password}@{host}"


WHERE = "--limiter-url, LLMBATCH_LIMITER_URL, [limiter] url"


@pytest.mark.parametrize("call", ["acquire", "check"])
@pytest.mark.parametrize(
    ("server", "problem", "cause", "advice"),
    [
        (
            "nothing listens",
            "cannot be reached",
            "Connection refused",
            f"start Redis, or stop sharing the quota ({WHERE})",
        ),
        (
            "wrong password",
            "refuses the password",
            "invalid username-password pair",
            f"check the password in the limiter URL ({WHERE})",
        ),
        (
            "no password",
            "requires a password",
            "the limiter URL gives none",
            f"put the password in the limiter URL ({WHERE})",
        ),
    ],
    ids=["nothing listens", "wrong password", "no password"],
)
async def test_a_redis_that_cannot_be_used_is_one_fatal_error(
    redis_password_url: str,
    redis_password: str,
    server: str,
    problem: str,
    cause: str,
    advice: str,
    call: str,
) -> None:
    """acquire() and check() on a Redis that is not there, or that refuses the password,
    raise LimiterUnavailable at once (fatal: the job stops) naming the server, its
    password hidden, and why; the redis-py error is its cause."""
    url = {
        "nothing listens": dead_url(),
        "wrong password": other_password(redis_password_url, SECRET),
        "no password": other_password(redis_password_url, None),
    }[server]
    shared = RedisRateLimiter.from_url(url, Limits(rpm=60), quota=fresh())
    try:
        with pytest.raises(LimiterUnavailable) as caught:
            async with asyncio.timeout(10):  # fails fast: never a hang
                await (shared.acquire() if call == "acquire" else shared.check())
    finally:
        await shared.aclose()
    message = str(caught.value)
    where = redact(url)
    expected = f"the shared rate limiter at {where} {problem} ({cause}"
    assert expected == message[: len(expected)]
    assert message.endswith(f"): no request is sent without its permit; {advice}"), message
    assert [] == [s for s in (SECRET, redis_password) if s in message or s in repr(caught.value)]
    assert is_fatal(caught.value)
    assert isinstance(caught.value.__cause__, redis_errors.RedisError)
    assert 0 == shared.statistics().waiting


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (
            redis_errors.TimeoutError("Timeout reading from socket"),
            "cannot be reached (Timeout reading from socket)",
        ),
        (
            # what redis-py raises for a refused connection: the OS says it best
            redis_errors.ConnectionError("Error 111 connecting to 127.0.0.1:1."),
            "cannot be reached (Connection refused)",
        ),
        (
            redis_errors.NoScriptError("No matching script. Please use EVAL."),
            "fails (No matching script. Please use EVAL)",
        ),
        (
            redis_errors.ResponseError("OOM command not allowed when used memory > 'maxmemory'."),
            "fails (OOM command not allowed when used memory > 'maxmemory')",
        ),
        (
            # as an older redis-py raises it, to a client that sends no password
            redis_errors.ResponseError("NOAUTH Authentication required."),
            "requires a password (the limiter URL gives none)",
        ),
    ],
    ids=["timeout", "refused", "noscript", "oom", "noauth"],
)
async def test_every_redis_error_while_acquiring_is_limiter_unavailable(
    redis: Redis, redis_url: str, failure: Exception, expected: str
) -> None:
    """Whatever redis-py raises while a permit is asked for (a timeout, a script that
    reloading cannot bring back, a server out of memory) becomes LimiterUnavailable."""
    shared = limiter(redis, fresh(), rpm=60)

    async def failing(**call: Any) -> Any:
        if isinstance(failure, redis_errors.ConnectionError):
            raise failure from ConnectionRefusedError(111, "Connect call failed")
        raise failure

    shared._acquire_script = failing  # type: ignore[assignment]
    with pytest.raises(LimiterUnavailable) as caught:
        await shared.acquire()
    where = redis_url.rpartition("/")[0]  # the client's host, port and db
    assert str(caught.value).startswith(f"the shared rate limiter at {where}/0 {expected}: ")
    assert failure is caught.value.__cause__


async def test_an_error_not_from_redis_is_not_disguised(redis: Redis) -> None:
    """A bug in the limiter's own code stays what it is: only Redis's errors are
    LimiterUnavailable."""
    shared = limiter(redis, fresh(), rpm=60)

    async def buggy(**call: Any) -> Any:
        raise KeyError("a bug")

    shared._acquire_script = buggy  # type: ignore[assignment]
    with pytest.raises(KeyError):
        await shared.acquire()


@pytest.mark.parametrize("call", ["acquire", "check"])
async def test_a_script_redis_refuses_is_limiter_unavailable(redis: Redis, call: str) -> None:
    """A script the server refuses to compile fails check() and acquire() as
    LimiterUnavailable: reloading it cannot help."""
    shared = limiter(redis, fresh(), rpm=60)
    shared._acquire_script = redis.register_script("this is not lua")
    with pytest.raises(LimiterUnavailable, match=r" fails \(Error compiling script"):
        await (shared.acquire() if call == "acquire" else shared.check())


@pytest.mark.parametrize("server", ["open", "with a password"])
async def test_check_passes_on_a_usable_redis_and_loads_the_scripts(
    redis: Redis, redis_url: str, redis_password_url: str, server: str
) -> None:
    """check() on a live server (with the right password too) passes, and leaves the
    scripts loaded for the first acquire."""
    url = redis_url if server == "open" else redis_password_url
    shared = RedisRateLimiter.from_url(url, Limits(rpm=60, initial_fill=0.5), quota=fresh())
    try:
        await shared.check()
        scripts = [shared._acquire_script, shared._adjust_script, shared._release_script]
        assert [True] * 3 == await shared._redis.script_exists(*(s.sha for s in scripts))
        assert (await shared.try_acquire())[1] is not None
    finally:
        await shared.aclose()


@pytest.mark.parametrize(
    ("query", "expected"),
    [("", 5.0), ("?socket_connect_timeout=0.5", 0.5)],
)
async def test_from_url_waits_a_few_seconds_for_a_connection(query: str, expected: float) -> None:
    """A limiter from a URL gives up connecting after 5 s (a host that drops packets
    must not hang the job for minutes), unless the URL says otherwise."""
    shared = RedisRateLimiter.from_url(dead_url() + query, Limits(rpm=60), quota=fresh())
    options = shared._redis.connection_pool.connection_kwargs
    await shared.aclose()
    assert expected == options["socket_connect_timeout"]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"http://:{SECRET}@127.0.0.1:6379/0", "redis://, rediss://, unix://"),
        ("redis://127.0.0.1:notaport/0", "Port could not be cast"),
    ],
)
def test_from_url_refuses_a_url_that_is_not_redis(url: str, expected: str) -> None:
    """A URL of another scheme, or with a port that is not a number, is a ValueError that
    names it (its password hidden)."""
    with pytest.raises(ValueError, match="is not a Redis URL") as caught:
        RedisRateLimiter.from_url(url, Limits(rpm=60), quota=fresh())
    assert expected in str(caught.value)
    assert SECRET not in str(caught.value)


async def test_an_answer_is_kept_when_redis_fails_after_its_permit(redis: Redis) -> None:
    """Redis failing between the permit and the feedback (observe) does not lose the
    answer, already paid for: the client logs the failed feedback and returns it."""
    shared = limiter(redis, fresh(), rpm=60)

    async def gone(**call: Any) -> Any:
        raise redis_errors.ConnectionError("Connection closed by server.")

    shared._adjust_script = gone  # type: ignore[assignment]

    def answer(request: Request) -> Response:
        return Response(text="kept", headers={"x-ratelimit-remaining-requests": "5"})

    client = LLMClient(FakeProvider(answer), model="m", limiter=shared)
    with capture_logs() as logs:
        response = await client.complete("hello")
    await client.aclose()
    assert "kept" == response.text
    failed = [(e["step"], e["error_type"]) for e in logs if e["event"] == "limits.feedback_failed"]
    assert [("observe", "ConnectionError")] == failed
    await shared.flush()


async def test_a_refund_is_not_counted_twice_by_a_later_lift(redis: Redis) -> None:
    """A request refunded (settled under its reservation) after a later permit was taken:
    the server may count that refund in the later request's headers, but the shared
    bucket has it already, so it lifts nothing more (as in the in-process limiter)."""
    limits = Limits(tpm=10_000, initial_fill=1.0, reserve=0.0, transit=0.0, refund_unused=True)
    shared = RedisRateLimiter(redis, limits, quota=fresh())
    first = (await shared.try_acquire(tokens=2_000))[1]
    assert first is not None
    first.release()  # answered: no longer in flight when the second is taken
    await shared.flush()
    second = (await shared.try_acquire(tokens=2_000))[1]
    assert second is not None
    first.settle(tokens=1_200)  # 800 refunded, here and at the server
    await shared.flush()
    before = (await shared.try_acquire(tokens=0))[1]
    assert before is not None
    # The server refunded the first before admitting the second: 800 more than Redis
    # had left right after the second.
    left = int(second.available_after["tpm"]) + 800
    await shared.observe({"x-ratelimit-remaining-tokens": str(left)}, second)
    after = shared.statistics().available["tpm"]
    # (the bucket refills 167 a second: a few milliseconds pass between the calls)
    assert before.available_after["tpm"] == pytest.approx(after, abs=20)
    second.release()
    await shared.flush()
