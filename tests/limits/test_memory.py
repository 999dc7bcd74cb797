"""Tests for llmbatch.limits.memory (the in-process RateLimiter and the registry), on
virtual time (FakeClock.patch_loop): no test sleeps."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from llmbatch.flow import AsyncParallelBatchNode
from llmbatch.limits import (
    Limits,
    RateLimiter,
    RequestTooLarge,
    get_limiter,
    key_fingerprint,
)
from llmbatch.testing.clock import FakeClock


@pytest.fixture
async def clock() -> AsyncIterator[FakeClock]:
    """The running loop on virtual time starting at 1000 s."""
    fake = FakeClock(start=1000.0)
    with fake.patch_loop():
        yield fake


def full(**kwargs: Any) -> Limits:
    """A limiter that starts full and keeps no cushion, so counts are exact."""
    return Limits(initial_fill=1.0, reserve=0.0, transit=0.0, **kwargs)


# -- acquiring ----------------------------------------------------------------------------


async def test_rpm_admits_a_full_bucket_then_paces(clock: FakeClock) -> None:
    """At RPM 60 with a full bucket, 60 go at once and the 61st waits one second."""
    limiter = RateLimiter(full(rpm=60))
    for _ in range(60):
        (await limiter.acquire()).release()
    assert 1000.0 == clock.time()
    (await limiter.acquire()).release()
    assert 1001.0 == pytest.approx(clock.time())


async def test_initial_fill_limits_the_first_burst(clock: FakeClock) -> None:
    """With a half-full start, half the RPM is available at once."""
    limiter = RateLimiter(Limits(rpm=60, initial_fill=0.5, reserve=0.0))
    for _ in range(30):
        (await limiter.acquire()).release()
    assert 1000.0 == clock.time()
    (await limiter.acquire()).release()
    assert 1001.0 == pytest.approx(clock.time())


@pytest.mark.parametrize(
    ("limits", "at_once"),
    [
        (Limits(rpm=600, reserve=0.0, transit=0.0), 10),  # one second of 600/min
        (Limits(rpm=10_000, reserve=0.0, transit=0.0), 166),
        (Limits(rpm=600, slow_start=3.0, reserve=0.0, transit=0.0), 30),
        (Limits(rpm=60, slow_start=45.0, reserve=0.0, transit=0.0), 30),  # at most half
        (Limits(rpd=1000, reserve=0.0, transit=0.0), 500),  # per day: half, as before
    ],
)
async def test_the_default_start_is_slow(clock: FakeClock, limits: Limits, at_once: int) -> None:
    """Before the server's first headers, only ``slow_start`` seconds of each limit
    (1 s by default; at most half the bucket) go out at once: a key whose limit is
    enforced over a few seconds never gets a burst its bucket cannot hold. The rest
    comes at the refill rate (or as soon as headers show more is left)."""
    limiter = RateLimiter(limits)
    sent = 0
    while True:
        permit = await limiter.acquire()
        if clock.time() > 1000.0:
            break
        sent += 1
        permit.release()
    assert at_once == sent


async def test_reserve_keeps_a_cushion_but_not_the_rate(clock: FakeClock) -> None:
    """reserve=0.05 of RPM 100 keeps 5 unspent: 95 go at once, then one per 0.6 s."""
    limiter = RateLimiter(Limits(rpm=100, initial_fill=1.0, reserve=0.05, transit=0.0))
    for _ in range(95):
        (await limiter.acquire()).release()
    assert 1000.0 == clock.time()
    for _ in range(10):
        (await limiter.acquire()).release()
    assert 1006.0 == pytest.approx(clock.time())  # 10 more at the full refill rate


@pytest.mark.parametrize(
    ("fill", "transit", "left"),
    [
        (1.0, 0.0, 599.0),  # no transit: exactly one request taken
        (1.0, 0.5, 594.0),  # full: half a second of refill (5 at 600/min) counts as in use
        (1.0, 0.05, 598.5),  # less transit than one request: charged down to the request
        (0.5, 0.5, 299.0),  # half full: the server's bucket is not full either, no charge
    ],
)
async def test_a_full_bucket_charges_the_transit(
    clock: FakeClock, fill: float, transit: float, left: float
) -> None:
    """A request taken from a (nearly) full bucket counts *transit* seconds of refill as
    in use: the server's full bucket gains nothing while the request is on its way."""
    limits = Limits(rpm=600, initial_fill=fill, reserve=0.0, transit=transit)
    limiter = RateLimiter(limits)
    await limiter.acquire()
    assert left == pytest.approx(limiter.statistics().available["rpm"])


async def test_the_transit_charge_is_paid_once_per_burst(clock: FakeClock) -> None:
    """The transit charge is at most one transit's worth of refill for a whole burst, and
    is paid again only after the bucket has refilled (an idle spell)."""
    limiter = RateLimiter(Limits(rpm=600, initial_fill=1.0, reserve=0.0, transit=0.5))
    for _ in range(100):
        await limiter.acquire()
    assert 600.0 - 100 - 5 == pytest.approx(limiter.statistics().available["rpm"])
    clock.advance(60.0)  # full again
    await limiter.acquire()
    assert 600.0 - 1 - 5 + 0.0 == pytest.approx(limiter.statistics().available["rpm"])


async def test_headers_give_back_the_transit_the_request_did_not_need(clock: FakeClock) -> None:
    """The server's answer shows what the transit charge over-estimated, and the bucket
    gets it back, less the refill of the request's own measured lag."""
    limiter = RateLimiter(Limits(rpm=600, initial_fill=1.0, reserve=0.0, transit=2.0))
    permit = await limiter.acquire()
    assert 600.0 - 1 - 20 == pytest.approx(limiter.statistics().available["rpm"])
    clock.advance(0.2)  # 2 refilled
    permit.release()
    # It reached the server 0.05 s after the permit (0.15 s of the 0.2 s were processing).
    await limiter.observe({**openai_headers(599, 0), "openai-processing-ms": "150"}, permit)
    # 599 on the server after it, against 579 believed: 20 back, less 0.5 of refill,
    # which makes the bucket full, as the server's is by now (579 + 2 + 19.5, capped).
    assert 600.0 == pytest.approx(limiter.statistics().available["rpm"])


async def test_a_first_request_bigger_than_the_starting_fill_waits_then_goes(
    clock: FakeClock,
) -> None:
    """TPM 10,000 starting half full: a 6,000-token request waits for the missing 1,000
    (plus the cushion) at 10,000 a minute, then goes; it never waits forever."""
    limiter = RateLimiter(Limits(tpm=10_000, initial_fill=0.5, transit=0.0))
    permit = await limiter.acquire(tokens=6_000)
    assert 1000.0 + (1_000 + 25) * 60 / 10_000 == pytest.approx(clock.time())
    assert permit.cost == {"tpm": 6_000.0}


async def test_no_lift_right_after_a_429(clock: FakeClock) -> None:
    """After a 429, headers saying more is left do not undo the cooldown."""
    limiter = RateLimiter(full(rpm=600))
    permit = await limiter.acquire()
    await limiter.observe(openai_headers(599, 0, tpm=1), permit)  # synced
    await limiter.on_rate_limited(1.0, dimension="rpm")
    level = limiter.statistics().available["rpm"]
    assert level < 0  # emptied: one second of refill owed
    await limiter.observe(openai_headers(500, 0, tpm=1), permit)
    assert level == limiter.statistics().available["rpm"]


async def test_all_dimensions_are_taken_together(clock: FakeClock) -> None:
    """A request waits for its tokens without holding a request slot meanwhile."""
    limiter = RateLimiter(full(rpm=600, tpm=1000))
    await limiter.acquire(tokens=400)
    await limiter.acquire(tokens=400)
    assert {"rpm": 598.0, "tpm": 200.0} == limiter.statistics().available
    await limiter.acquire(tokens=400)  # needs 200 more tokens: 200 / (1000/60) = 12 s
    assert 1012.0 == pytest.approx(clock.time())


@pytest.mark.parametrize(
    ("limits", "kwargs", "message"),
    [
        (Limits(tpm=1000), {"tokens": 1001}, "request needs 1,001 tpm but the limit is 1,000"),
        (Limits(input_tpm=50), {"input_tokens": 51}, "needs 51 input_tpm"),
        (Limits(rpm=10, tpd=100), {"tokens": 200}, "needs 200 tpd but the limit is 100"),
    ],
)
async def test_request_too_large_fails_at_once(
    clock: FakeClock, limits: Limits, kwargs: dict[str, int], message: str
) -> None:
    """A request bigger than a bucket raises RequestTooLarge without waiting."""
    limiter = RateLimiter(limits)
    with pytest.raises(RequestTooLarge, match=message):
        await limiter.acquire(**kwargs)
    assert 1000.0 == clock.time()


async def test_waiters_are_served_in_arrival_order(clock: FakeClock) -> None:
    """A big request at the head of the line is not overtaken by small ones."""
    limiter = RateLimiter(full(tpm=600))  # refills 10 tokens/s
    await limiter.acquire(tokens=600)
    order: list[str] = []

    async def request(name: str, tokens: int) -> None:
        await limiter.acquire(tokens=tokens)
        order.append(name)

    await asyncio.gather(request("big", 300), request("small-1", 10), request("small-2", 10))
    assert ["big", "small-1", "small-2"] == order
    assert 1032.0 == pytest.approx(clock.time())  # 300 + 10 + 10 tokens at 10/s


async def test_cancelled_waiter_takes_nothing(clock: FakeClock) -> None:
    """Cancelling a waiting acquire leaks no capacity and lets the next waiter through."""
    limiter = RateLimiter(full(tpm=600))
    await limiter.acquire(tokens=600)
    doomed = asyncio.create_task(limiter.acquire(tokens=500))
    await asyncio.sleep(1)
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    await limiter.acquire(tokens=20)  # waits only for its own 20 tokens: 2 s
    assert 1002.0 == pytest.approx(clock.time())
    assert 1 == limiter.statistics().acquired - 1


async def test_concurrency_gate(clock: FakeClock) -> None:
    """max_concurrency permits are in flight at most; release frees a slot."""
    limiter = RateLimiter(Limits(max_concurrency=2))
    first = await limiter.acquire()
    await limiter.acquire()
    third = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0)
    assert (False, 2, 1) == (third.done(), limiter.statistics().in_flight, len(limiter._waiters))
    first.release()
    first.release()  # idempotent
    await third
    assert 2 == limiter.statistics().in_flight


@pytest.mark.parametrize(
    ("refund", "actual", "expected_available"),
    [
        (False, 100, 400.0),  # OpenAI keeps the reservation
        (True, 100, 900.0),  # refunded the 500 unused
        (False, 800, 200.0),  # under-reserved: the extra 200 is charged
        (True, 800, 200.0),
    ],
)
async def test_settle(
    clock: FakeClock, refund: bool, actual: int, expected_available: float
) -> None:
    """Settling charges what was under-reserved and refunds only where allowed."""
    limiter = RateLimiter(full(tpm=1000, refund_unused=refund))
    permit = await limiter.acquire(tokens=600)
    permit.settle(tokens=actual)
    permit.settle(tokens=0)  # settling twice changes nothing
    assert expected_available == pytest.approx(limiter.statistics().available["tpm"])


# -- feedback -----------------------------------------------------------------------------


def openai_headers(
    rpm_left: int, tpm_left: int, rpm: int = 600, tpm: int = 100_000
) -> dict[str, str]:
    return {
        "x-ratelimit-limit-requests": str(rpm),
        "x-ratelimit-remaining-requests": str(rpm_left),
        "x-ratelimit-limit-tokens": str(tpm),
        "x-ratelimit-remaining-tokens": str(tpm_left),
    }


async def test_first_headers_set_the_level_up_or_down(clock: FakeClock) -> None:
    """The first headers replace the initial guess with the server's level."""
    limiter = RateLimiter(Limits(rpm=600, tpm=100_000))  # starts half full
    permit = await limiter.acquire(tokens=1000)
    await limiter.observe(openai_headers(599, 99_000), permit)
    assert {"rpm": 599.0, "tpm": 99_000.0} == limiter.statistics().available


async def test_later_headers_drain_once_per_deficit(clock: FakeClock) -> None:
    """When another client spent the quota, the deficit is drained once, not per response."""
    limiter = RateLimiter(full(rpm=600, tpm=100_000))
    first = await limiter.acquire(tokens=1000)
    second = await limiter.acquire(tokens=1000)
    await limiter.observe(openai_headers(599, 99_000), first)  # first sync: agrees
    # Someone else took 10,000 tokens; both responses report it.
    await limiter.observe(openai_headers(598 - 10, 98_000 - 10_000), second)
    third = await limiter.acquire(tokens=1000)
    await limiter.observe(openai_headers(587, 87_000), third)
    assert {"rpm": 587.0, "tpm": 87_000.0} == limiter.statistics().available
    assert 4 == limiter.statistics().header_corrections  # 2 at first sync + 2 drains


async def test_more_left_on_the_server_lifts_only_what_is_certain(clock: FakeClock) -> None:
    """A server with more left lifts the bucket, minus what earlier permits still
    unanswered may not have spent there yet."""
    limiter = RateLimiter(full(tpm=100_000))
    sync = await limiter.acquire(tokens=0)
    await limiter.observe(openai_headers(599, 100_000), sync)  # first sync: agrees
    first = await limiter.acquire(tokens=50_000)  # sent, no answer yet
    second = await limiter.acquire(tokens=10_000)
    await limiter.observe(openai_headers(598, 60_000), second)  # maybe before the first arrived
    assert 40_000.0 == limiter.statistics().available["tpm"]  # 50,000 uncertain: no lift
    first.release()
    second.release()
    third = await limiter.acquire(tokens=10_000)
    await limiter.observe(openai_headers(597, 50_000), third)  # we believed 30,000
    assert 50_000.0 == limiter.statistics().available["tpm"]


def processing_headers(tpm_left: int, processing: float | None) -> dict[str, str]:
    """OpenAI headers with ``openai-processing-ms`` (the server's own handling time)."""
    headers = openai_headers(599, tpm_left)
    if processing is not None:
        headers["openai-processing-ms"] = str(int(processing * 1000))
    return headers


@pytest.mark.parametrize(
    ("first_processing", "lifted"),
    [
        # The first answer came 1.1 s after its permit, 1.05 s of it at the server: it
        # arrived there by 0.05 s, before the second permit (0.1 s). Certain: lift.
        (1.05, True),
        # Without the server's handling time it may have arrived as late as 1.1 s, after
        # the second request: its cost stays uncertain.
        (None, False),
        # The server held it only 0.5 s: it may have arrived at 0.6 s. Uncertain.
        (0.5, False),
    ],
)
async def test_an_earlier_answer_makes_its_cost_certain(
    clock: FakeClock, first_processing: float | None, lifted: bool
) -> None:
    """An earlier request whose answer shows it reached the server before a later permit
    was taken no longer holds back the later permit's lift."""
    limiter = RateLimiter(full(tpm=100_000))
    sync = await limiter.acquire(tokens=0)
    await limiter.observe(openai_headers(599, 100_000), sync)
    sync.release()
    first = await limiter.acquire(tokens=20_000)  # at 0.0 s
    clock.advance(0.1)
    second = await limiter.acquire(tokens=20_000)  # at 0.1 s; we believe 60,000 left
    clock.advance(1.0)
    first.release()
    await limiter.observe(processing_headers(80_000, first_processing), first)  # consistent
    second.release()
    before = limiter.statistics().available["tpm"]
    # The server says 70,000 after admitting the second: ~10,000 more than we believed.
    await limiter.observe(processing_headers(70_000, 1.0), second)
    lift = 70_000 - second.available_after["tpm"] if lifted else 0.0
    assert before + lift == pytest.approx(limiter.statistics().available["tpm"], abs=1)


async def test_a_refund_is_not_counted_twice_by_a_later_lift(clock: FakeClock) -> None:
    """An earlier request refunded (settled under its reservation) after a later permit
    was taken: the server may count that refund in the later request's headers, but the
    bucket has it already, so it lifts nothing more."""
    limiter = RateLimiter(full(tpm=100_000, refund_unused=True))
    sync = await limiter.acquire(tokens=0)
    await limiter.observe(openai_headers(599, 100_000), sync)
    sync.release()
    first = await limiter.acquire(tokens=20_000)
    clock.advance(0.1)
    second = await limiter.acquire(tokens=20_000)
    clock.advance(1.0)
    first.release()
    await limiter.observe(processing_headers(80_000, 1.05), first)  # reached the server first
    first.settle(tokens=19_200)  # 800 refunded, here and at the server
    second.release()
    before = limiter.statistics().available["tpm"]
    # The server refunded the first before admitting the second: 800 more than we had
    # believed right after taking the second.
    await limiter.observe(processing_headers(int(second.available_after["tpm"]) + 800, 1.0), second)
    assert before == pytest.approx(limiter.statistics().available["tpm"], abs=1)


async def test_permits_beyond_the_scan_count_in_full(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Earlier permits beyond the look-back window are treated as uncertain, even when
    answered: the lift is never bigger than what the window proves."""
    import llmbatch.limits.memory as memory

    monkeypatch.setattr(memory, "_SCAN", 2)
    limiter = RateLimiter(full(rpm=600))
    sync = await limiter.acquire()
    await limiter.observe(openai_headers(599, 0), sync)
    sync.release()
    early = [await limiter.acquire() for _ in range(5)]  # 594 left
    clock.advance(0.1)
    for permit in early:
        await limiter.observe(openai_headers(594, 0), permit)  # answered, but kept in flight
    clock.advance(0.1)
    last = await limiter.acquire()  # 5 earlier permits in flight, the last 2 scanned
    believed = last.available_after["rpm"]
    await limiter.observe(openai_headers(int(believed) + 4, 0), last)  # 4 more than we think
    # The two scanned permits are certain; the three beyond the window count in full:
    # 4 - 3 = 1 lifted.
    assert believed + 1 == pytest.approx(limiter.statistics().available["rpm"], abs=0.01)


async def test_first_sync_is_not_fooled_by_reordering(clock: FakeClock) -> None:
    """Requests reach the server out of order: the first response to come back may be
    the last one sent. Its headers must not lift the bucket beyond the truth."""
    limiter = RateLimiter(Limits(rpm=600))  # half full: 300 available; the server has 600
    permits = [await limiter.acquire() for _ in range(300)]
    # The server admitted the 300th permit first: 599 left after it.
    await limiter.observe(openai_headers(599, 0), permits[-1])
    assert limiter.statistics().available["rpm"] <= 300.0  # truth: 600 - 300 sent
    # The 1st permit's response (admitted 300th: 300 left) is exact and lifts to the truth.
    await limiter.observe(openai_headers(300, 0), permits[0])
    assert 300.0 == pytest.approx(limiter.statistics().available["rpm"], abs=1)


async def test_auto_learns_limits_from_headers(clock: FakeClock) -> None:
    """Limits.auto() adopts the limits the server reports and paces at them."""
    limiter = RateLimiter(Limits.auto())
    assert {} == limiter.statistics().capacity
    permit = await limiter.acquire(tokens=100)
    await limiter.observe(openai_headers(59, 9_900, rpm=60, tpm=10_000), permit)
    stats = limiter.statistics()
    assert ({"rpm": 60.0, "tpm": 10_000.0}, ("rpm", "tpm")) == (stats.capacity, stats.learned)
    assert {"rpm": 59.0, "tpm": 9_900.0} == stats.available
    # the AIMD probe (8) is lifted once limits are known: they pace, no fixed cap
    assert stats.concurrency_cap is None


async def test_without_learn_reported_limits_are_ignored(clock: FakeClock) -> None:
    """A limiter not told to learn keeps its configured limits."""
    limiter = RateLimiter(full(rpm=10))
    await limiter.observe(openai_headers(5, 5, rpm=60, tpm=10_000))
    assert {"rpm": 10.0} == limiter.statistics().capacity


async def test_429_pauses_everyone_then_resumes_at_the_refill_rate(clock: FakeClock) -> None:
    """A 429 pauses every waiter until retry-after; then requests flow at the refill rate
    (the bucket is empty when the pause ends, so the first unit refills during second 5-6)."""
    limiter = RateLimiter(full(rpm=60))
    await limiter.on_rate_limited(5.0, dimension="rpm")
    times: list[float] = []

    async def request() -> None:
        (await limiter.acquire()).release()
        times.append(clock.time() - 1000.0)

    await asyncio.gather(*(request() for _ in range(3)))
    assert [pytest.approx(t) for t in (6.0, 7.0, 8.0)] == times
    assert 1 == limiter.statistics().rate_limited


async def test_aimd_halves_on_429_and_grows_on_success(clock: FakeClock) -> None:
    """Without known rate limits, the concurrency cap halves on 429 and creeps back up."""
    limiter = RateLimiter(Limits.auto(max_concurrency=64))
    assert 8.0 == limiter.statistics().concurrency_cap
    await limiter.on_rate_limited(1.0)
    assert 4.0 == limiter.statistics().concurrency_cap
    for _ in range(4):
        permit = await limiter.acquire()
        permit.settle(tokens=10)
        permit.release()
    assert 5.0 == pytest.approx(limiter.statistics().concurrency_cap, abs=0.1)


async def test_a_burst_of_429s_halves_the_probing_cap_once(clock: FakeClock) -> None:
    """Three 429s answered at once are one signal: the cap halves once, not to 1."""
    limiter = RateLimiter(Limits.auto(max_concurrency=64))
    for _ in range(3):
        await limiter.on_rate_limited(1.0)
    assert 4.0 == limiter.statistics().concurrency_cap
    clock.advance(1.5)  # that cooldown is over: the next 429 is news
    await limiter.on_rate_limited(1.0)
    assert 2.0 == limiter.statistics().concurrency_cap


async def test_aimd_leaves_the_cap_alone_once_limits_are_known(clock: FakeClock) -> None:
    """After Limits.auto() has learned a limit the buckets pace: a 429 pauses the quota
    but no longer halves the concurrency cap (nothing would raise it again)."""
    limiter = RateLimiter(Limits.auto(max_concurrency=64))
    permit = await limiter.acquire()
    await limiter.observe(openai_headers(59, 9_000, rpm=60, tpm=10_000), permit)
    permit.release()
    assert 64.0 == limiter.statistics().concurrency_cap
    for _ in range(3):
        await limiter.on_rate_limited(0.5, dimension="rpm")
        clock.advance(1.0)
    assert (64.0, 3) == (
        limiter.statistics().concurrency_cap,
        limiter.statistics().rate_limited,
    )


async def test_a_429_of_unknown_kind_spares_the_daily_buckets(clock: FakeClock) -> None:
    """A 429 that does not say which limit it hit (Anthropic, Azure) empties the
    per-minute buckets only: the day's quota is not thrown away."""
    limiter = RateLimiter(full(rpm=600, rpd=100_000))
    await limiter.acquire()
    await limiter.on_rate_limited(2.0)
    available = limiter.statistics().available
    assert -20.0 == pytest.approx(available["rpm"])  # empty, and 2 s of debt
    assert 100_000.0 - 1 == pytest.approx(available["rpd"])


@pytest.mark.parametrize(
    ("limit", "cost", "learned"),
    [
        (10_000, 100, True),
        (1, 100, False),  # an odd 1 providers send now and then
        (0, 100, False),
        (500, 1_000, False),  # below what the server just admitted
    ],
)
async def test_implausible_limits_are_not_learned(
    clock: FakeClock, limit: int, cost: int, learned: bool
) -> None:
    """Limits.auto() adopts a reported token limit only if it is plausible: not 0 or 1,
    and not below the cost of the request the server has just admitted."""
    limiter = RateLimiter(Limits.auto())
    permit = await limiter.acquire(tokens=cost)
    headers = {"x-ratelimit-limit-tokens": str(limit), "x-ratelimit-remaining-tokens": "0"}
    await limiter.observe(headers, permit)
    assert learned == ("tpm" in limiter.statistics().capacity)


async def test_nested_async_with_releases_each_its_own_permit(clock: FakeClock) -> None:
    """``async with a: async with b:`` (and a limiter nested in itself) gives every
    permit back on the way out: nothing stays in flight, so a capped limiter never
    deadlocks."""
    outer = RateLimiter(Limits(max_concurrency=2))
    inner = RateLimiter(Limits(max_concurrency=2))
    async with asyncio.timeout(60):  # virtual: a leak fails at once instead of hanging
        for _ in range(5):  # more rounds than the cap
            async with outer, inner:  # noqa: SIM117 - the nesting is what is tested
                async with outer:
                    stats = (outer.statistics().in_flight, inner.statistics().in_flight)
                    assert (2, 1) == stats
    assert (0, 0) == (outer.statistics().in_flight, inner.statistics().in_flight)


@pytest.mark.parametrize(
    ("configured", "provider_rule", "available"),
    [
        (None, True, 5_000.0 - 500 + 450),  # the provider refunds (Anthropic)
        (None, False, 5_000.0 - 500),  # the provider keeps its reservation (OpenAI)
        (None, None, 5_000.0 - 500),  # no rule given: nothing comes back
        (False, True, 5_000.0 - 500),  # Limits.refund_unused=False wins
        (True, False, 5_000.0 - 500 + 450),  # Limits.refund_unused=True wins
    ],
)
async def test_refunds_follow_the_providers_rule_unless_configured(
    clock: FakeClock, configured: bool | None, provider_rule: bool | None, available: float
) -> None:
    """500 output tokens reserved, 50 used: the 450 come back when the provider's rule
    says so (given on settling), unless Limits.refund_unused decides."""
    limiter = RateLimiter(
        Limits(output_tpm=10_000, initial_fill=0.5, refund_unused=configured, transit=0.0)
    )
    permit = await limiter.acquire(output_tokens=500)
    permit.settle(output_tokens=50, refund=provider_rule)
    assert available == pytest.approx(limiter.statistics().available["output_tpm"])


def test_statistics_and_repr_work_outside_the_event_loop() -> None:
    """A limiter built in one loop can be inspected after it ended (a CLI summary, a
    notebook cell): levels as last updated, no RuntimeError."""

    async def build() -> RateLimiter:
        limiter = RateLimiter(Limits(rpm=60, initial_fill=1.0, transit=0.0))
        await limiter.acquire()
        return limiter

    limiter = asyncio.run(build())  # real time: a few ms of refill before the loop ends
    stats = limiter.statistics()
    assert 59.0 == pytest.approx(stats.available["rpm"], abs=0.01)
    assert 1 == stats.acquired
    assert "rpm=59/60" in repr(limiter)


async def test_a_request_waiting_for_tokens_holds_no_request_slot(clock: FakeClock) -> None:
    """RPM 2, TPM 1,000: a request waiting 48 s for tokens leaves the requests bucket
    untouched meanwhile (it refills as if nobody waited) and takes both at once."""
    limiter = RateLimiter(full(rpm=2, tpm=1000))
    await limiter.acquire(tokens=900)
    waiting = asyncio.create_task(limiter.acquire(tokens=900))
    await asyncio.sleep(30)
    assert not waiting.done()
    assert 1.0 + 30 * 2 / 60 == pytest.approx(limiter.statistics().available["rpm"])
    await waiting
    assert 1000.0 + 800 * 60 / 1000 == pytest.approx(clock.time())
    assert 2.0 - 1 == pytest.approx(limiter.statistics().available["rpm"])  # full, less it


async def test_a_cancelled_waiter_in_the_middle_of_the_line_takes_nothing(
    clock: FakeClock,
) -> None:
    """Head, middle, tail wait in line; the middle one is cancelled: the tail is served
    right after the head, as if the middle one had never asked."""
    limiter = RateLimiter(full(tpm=600))
    await limiter.acquire(tokens=600)
    head = asyncio.create_task(limiter.acquire(tokens=100))  # 10 s
    middle = asyncio.create_task(limiter.acquire(tokens=300))
    tail = asyncio.create_task(limiter.acquire(tokens=100))  # 10 s more
    await asyncio.sleep(1)
    middle.cancel()
    await head
    assert 1010.0 == pytest.approx(clock.time())
    await tail
    assert 1020.0 == pytest.approx(clock.time())
    assert (2, 0) == (limiter.statistics().acquired - 1, limiter.statistics().waiting)


async def test_statistics_report_waits_and_the_cooldown(clock: FakeClock) -> None:
    """statistics(): seconds waited in all, the longest wait, the cooldown left and the
    429s seen."""
    limiter = RateLimiter(full(tpm=600))
    await limiter.acquire(tokens=600)
    await limiter.acquire(tokens=120)  # 12 s
    await limiter.acquire(tokens=30)  # 3 s
    await limiter.on_rate_limited(5.0, dimension="tpm")
    stats = limiter.statistics()
    waits = (stats.waited_seconds, stats.max_wait_seconds, stats.cooldown_remaining)
    assert pytest.approx((15.0, 12.0, 5.0)) == waits
    assert 1 == stats.rate_limited


async def test_waits_cooldowns_and_learned_limits_are_logged(clock: FakeClock) -> None:
    """Structured events: limits.waited (a wait over a second), limits.cooldown (a 429),
    limits.learned (a limit adopted from the headers)."""
    limiter = RateLimiter(Limits.auto(max_concurrency=8, learn_burst=False))
    with capture_logs() as logs:
        permit = await limiter.acquire()
        await limiter.observe(openai_headers(0, 9_000, rpm=60, tpm=10_000), permit)
        permit.release()
        await limiter.acquire()  # the bucket is empty: ~1 s for one request at 60/min
        await limiter.on_rate_limited(2.0, dimension="rpm")
    events = [(e["event"], e.get("dimension")) for e in logs if e["event"].startswith("limits")]
    assert [
        ("limits.learned", "rpm"),
        ("limits.learned", "tpm"),
        ("limits.waited", None),
        ("limits.cooldown", "rpm"),
    ] == [e for e in events if e[0] != "limits.corrected"]


async def test_a_per_day_limit_paces_too(clock: FakeClock) -> None:
    """RPD 10 from full: ten requests at once, the eleventh after a tenth of a day."""
    limiter = RateLimiter(full(rpd=10))
    for _ in range(10):
        await limiter.acquire()
    assert 1000.0 == clock.time()
    await limiter.acquire()
    assert 1000.0 + 86_400 / 10 == pytest.approx(clock.time())


# -- integration --------------------------------------------------------------------------


async def test_limiter_paces_a_parallel_node(clock: FakeClock) -> None:
    """Passed as a node's limiter, 120 items at RPM 60 (full start) take one minute."""

    class Echo(AsyncParallelBatchNode):
        async def exec_async(self, item: int) -> int:
            await asyncio.sleep(0.5)
            return item

    limiter = RateLimiter(full(rpm=60))
    assert list(range(120)) == await Echo(limiter=limiter, max_concurrency=32)._exec(range(120))
    assert 1060.5 == pytest.approx(clock.time())
    assert 0 == limiter.statistics().in_flight


async def test_registry_shares_one_limiter_per_quota(clock: FakeClock) -> None:
    """Same provider/endpoint/key/model: same limiter; conflicting limits are refused."""
    a = get_limiter("openai", "gpt-4o-mini", api_key="sk-secret-1", limits=Limits(rpm=10))
    assert a is get_limiter("openai", "gpt-4o-mini", api_key="sk-secret-1")
    assert a is not get_limiter("openai", "gpt-4o-mini", api_key="sk-secret-2")
    assert a is not get_limiter("openai", "gpt-4o", api_key="sk-secret-1")
    with pytest.raises(ValueError, match="already has limits"):
        get_limiter("openai", "gpt-4o-mini", api_key="sk-secret-1", limits=Limits(rpm=20))
    # defaults (a model profile's) only apply when the limiter is created
    same = get_limiter(
        "openai", "gpt-4o-mini", api_key="sk-secret-1", default_limits=Limits(rpm=99)
    )
    assert (a, 10) == (same, same.limits.rpm)
    assert "sk-secret" not in repr(a)


def test_key_fingerprint_hides_the_key() -> None:
    """A fingerprint is stable, short and does not contain the key."""
    assert key_fingerprint("sk-abc") == key_fingerprint("sk-abc")
    assert "abc" not in key_fingerprint("sk-abc")
    assert "anonymous" == key_fingerprint(None)


async def test_repr_and_statistics(clock: FakeClock) -> None:
    """repr shows levels and waiters; statistics is a frozen snapshot."""
    limiter = RateLimiter(full(rpm=60, max_concurrency=4), name="openai/gpt-4o-mini")
    permit = await limiter.acquire()
    assert "<RateLimiter openai/gpt-4o-mini rpm=59/60 in_flight=1 cap=4 waiters=0>" == repr(limiter)
    stats = limiter.statistics()
    with pytest.raises(AttributeError):
        stats.acquired = 5  # type: ignore[misc]
    permit.release()


@pytest.mark.parametrize(
    ("processing_ms", "expected"),
    [
        ("1000", 510.0),  # admitted as soon as acquired: no refill to discount
        ("900", 509.0),  # admitted 0.1 s after acquire: 1 unit of server refill discounted
        (None, 500.0),  # unknown processing time: the whole second counts as send lag
    ],
)
async def test_lift_excludes_refill_during_the_send_lag(
    clock: FakeClock, processing_ms: str | None, expected: float
) -> None:
    """The server refilled between our acquire and its admission, as our bucket did since:
    a lift never counts that refill twice."""
    limiter = RateLimiter(Limits(rpm=600, initial_fill=0.5, reserve=0.0))  # half full: 300
    permit = await limiter.acquire()  # 299 left after it
    await asyncio.sleep(1.0)  # the response arrives a second later; we refilled 10 (309)
    headers = openai_headers(500, 0, tpm=1)  # the server had 201 more than we believed
    if processing_ms is not None:
        headers["openai-processing-ms"] = processing_ms
    await limiter.observe(headers, permit)
    assert expected == pytest.approx(limiter.statistics().available["rpm"], abs=0.01)


# -- the server's limits win; the server's burst --------------------------------------


def rpm_headers(limit: int, left: int) -> dict[str, str]:
    return {"x-ratelimit-limit-requests": str(limit), "x-ratelimit-remaining-requests": str(left)}


@pytest.mark.parametrize(
    ("limits", "reported", "expected"),
    [
        # a profile (a starting estimate) follows the key's real limit, both ways
        (Limits(rpm=500, learn=True, transit=0.0), 10_000, 10_000.0),
        (Limits(rpm=5_000, learn=True, transit=0.0), 3_000, 3_000.0),
        # a limit given explicitly is never raised, but a lower one reported wins
        (Limits(rpm=5_000, transit=0.0), 10_000, 5_000.0),
        (Limits(rpm=20_000, transit=0.0), 10_000, 10_000.0),
        # an implausible report (0 or 1, as servers now and then send) changes nothing
        (Limits(rpm=500, learn=True, transit=0.0), 1, 500.0),
    ],
)
async def test_reported_limits_replace_estimates_and_lower_explicit_ones(
    clock: FakeClock, limits: Limits, reported: int, expected: float
) -> None:
    """The limit the server reports for the key replaces a profile's estimate (higher or
    lower) and says so once in the log; an explicit limit is only ever lowered."""
    limiter = RateLimiter(limits)
    permit = await limiter.acquire()
    with capture_logs() as logs:
        await limiter.observe(rpm_headers(reported, max(reported - 1, 0)), permit)
        await limiter.observe(rpm_headers(reported, max(reported - 2, 0)), permit)
    assert expected == limiter.statistics().limits["rpm"]
    adopted = [e for e in logs if e["event"] == "limits.adopted"]
    assert (1 if expected == reported else 0) == len(adopted)


async def test_a_bucket_of_a_few_seconds_is_learned_from_the_first_answers(
    clock: FakeClock,
) -> None:
    """RPM 10,000 enforced over 6 s (the server's bucket holds 1,000). The slow start
    sends one second's worth (166); the first answer says 990 are left, which with
    everything in flight is far below a minute's worth: the local bucket holds no
    more than 991 from then on, and refills at the full rate. Later answers raise it
    only when the server shows more left; a low count later is spending."""
    limiter = RateLimiter(Limits(rpm=10_000, reserve=0.0, transit=0.0))
    permits = [await limiter.acquire() for _ in range(166)]
    assert 1000.0 == clock.time()  # the slow start: one second of the limit at once
    with capture_logs() as logs:
        await limiter.observe(rpm_headers(10_000, 990), permits[0])
    stats = limiter.statistics()
    assert (991.0, 10_000.0) == (stats.capacity["rpm"], stats.limits["rpm"])
    assert ["limits.burst"] == [e["event"] for e in logs if e["event"] == "limits.burst"]
    await limiter.observe(rpm_headers(10_000, 995), permits[1])
    assert 996.0 == limiter.statistics().capacity["rpm"]
    await limiter.observe(rpm_headers(10_000, 10), permits[2])
    assert 996.0 == limiter.statistics().capacity["rpm"]
    for permit in permits:
        permit.release()
    clock.advance(60.0)  # idle for a minute: never more than the server's bucket
    assert 996.0 == pytest.approx(limiter.statistics().available["rpm"])
    started = clock.time()
    for _ in range(996 + 1000):
        (await limiter.acquire()).release()
    assert 6.0 == pytest.approx(clock.time() - started, abs=0.01)  # then 166.7/s


async def test_a_full_minute_bucket_is_used_at_once(clock: FakeClock) -> None:
    """RPM 600 with a full-minute bucket: the first answer shows it (589 left with the
    slow start's 10 in flight), so the whole minute's worth may go at once."""
    limiter = RateLimiter(Limits(rpm=600, reserve=0.0, transit=0.0))
    permits = [await limiter.acquire() for _ in range(10)]
    await limiter.observe(rpm_headers(600, 589), permits[0])
    stats = limiter.statistics()
    assert 600.0 == stats.capacity["rpm"]
    assert 580.0 == pytest.approx(stats.available["rpm"], abs=1)


async def test_a_permit_of_a_dimension_dropped_since_settles_what_is_left(
    clock: FakeClock,
) -> None:
    """A profile's TPM that the server turns out not to enforce is dropped at its first
    headers; a permit taken before, charged for it, settles its other dimensions instead
    of failing (the client would log every such settlement as a failed update)."""
    limiter = RateLimiter(Limits(rpm=600, tpm=100_000, output_tpm=1_000, learn=True))
    first = await limiter.acquire(tokens=1_000, output_tokens=100)
    second = await limiter.acquire(tokens=1_000, output_tokens=100)
    await limiter.observe(
        {
            "x-ratelimit-limit-requests": "600",
            "x-ratelimit-remaining-requests": "598",
            "anthropic-ratelimit-output-tokens-limit": "1000",
            "anthropic-ratelimit-output-tokens-remaining": "800",
        },
        first,
    )
    assert ["output_tpm", "rpm"] == sorted(limiter.statistics().capacity)
    before = limiter.statistics().available["output_tpm"]
    second.settle(tokens=2_000, output_tokens=150)  # the tpm it was charged: gone
    assert before - 50 == pytest.approx(limiter.statistics().available["output_tpm"])


async def test_observe_refuses_a_permit_of_another_kind(clock: FakeClock) -> None:
    """A permit the limiter cannot have issued (another limiter's kind) is a TypeError,
    not a correction measured against nothing."""

    class Foreign:
        def release(self) -> None: ...

        def settle(self, **usage: Any) -> None: ...

    limiter = RateLimiter(full(rpm=60))
    with pytest.raises(TypeError, match="is not a permit of <RateLimiter"):
        await limiter.observe({}, Foreign())  # type: ignore[arg-type]
