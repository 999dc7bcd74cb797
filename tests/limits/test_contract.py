"""The limiter contract (llmbatch.limits._contract), one suite run against every limiter:

* ``memory``: :class:`~llmbatch.limits.RateLimiter` from the registry, on virtual time
  (FakeClock.patch_loop: waits take no time);
* ``redis``: :class:`~llmbatch.limits.RedisRateLimiter` against a real redis-server
  (tests/conftest.py), on Redis's clock;
* ``ray``: :class:`~llmbatch.integrations.ray.RayQuotaLimiter` over a
  :class:`~llmbatch.integrations.ray.QuotaActor` in a local Ray cluster (started once
  for this module, about 10 s), on the actor's clock.

Redis and Ray keep real time, so the cases wait as little as they can and allow for the
milliseconds between calls; on virtual time the same bounds hold exactly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from redis.asyncio import Redis

from llmbatch.limits import (
    Limiter,
    LimiterStatistics,
    Limits,
    Permit,
    RedisRateLimiter,
    RequestTooLarge,
    get_limiter,
)
from llmbatch.testing.clock import FakeClock


class Backend:
    """One place to keep a quota: how a case gets a limiter on a new quota, another one
    sharing it (another worker), and waits for the updates a limiter queues."""

    def __init__(self) -> None:
        self.opened: list[Limiter] = []

    async def limiter(self, limits: Limits) -> Limiter:
        """A limiter on a new quota."""
        raise NotImplementedError

    async def sharer(self, limiter: Limiter) -> Limiter:
        """Another limiter on *limiter*'s quota, as another worker would hold."""
        raise NotImplementedError

    async def settled(self) -> None:
        """Wait until the updates the limiters queued (releases, settlements) are in."""

    async def close(self) -> None:
        for limiter in self.opened:
            await limiter.aclose()


class Memory(Backend):
    async def limiter(self, limits: Limits) -> Limiter:
        self.model = f"contract-{uuid.uuid4().hex}"
        return get_limiter("test", self.model, limits=limits)

    async def sharer(self, limiter: Limiter) -> Limiter:
        return get_limiter("test", self.model)  # the same quota: the same limiter


class Shared(Backend):
    """Redis: every limiter its own client, as separate processes have."""

    def __init__(self, redis_url: str) -> None:
        super().__init__()
        self.url = redis_url
        self.clients: list[Redis] = []

    def _open(self, limits: Limits, quota: str) -> RedisRateLimiter:
        client = Redis.from_url(self.url)
        self.clients.append(client)
        limiter = RedisRateLimiter(client, limits, quota=quota)
        self.opened.append(limiter)
        return limiter

    async def limiter(self, limits: Limits) -> Limiter:
        self.quota, self.limits = f"test/{uuid.uuid4().hex}", limits
        return self._open(limits, self.quota)

    async def sharer(self, limiter: Limiter) -> Limiter:
        return self._open(self.limits, self.quota)

    async def settled(self) -> None:
        for limiter in self.opened:
            assert isinstance(limiter, RedisRateLimiter)
            await limiter.flush()

    async def close(self) -> None:
        await super().close()
        for client in self.clients:
            await client.aclose()


class Cluster(Backend):
    """Ray: every limiter a RayQuotaLimiter over the quota's named actor."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    async def limiter(self, limits: Limits) -> Limiter:
        self.limits = limits
        self.names.append(f"contract-{uuid.uuid4().hex[:12]}")
        return await self.sharer(None)  # type: ignore[arg-type]

    async def sharer(self, limiter: Limiter) -> Limiter:
        from llmbatch.integrations.ray import RayQuotaLimiter, quota_actor

        shared = RayQuotaLimiter(quota_actor(self.names[-1], self.limits))
        self.opened.append(shared)
        return shared

    async def settled(self) -> None:
        # Release and settle are calls to the actor nobody waits for; the actor runs a
        # caller's calls in order, so one answered call later they are in.
        for limiter in self.opened:
            limiter.statistics()

    async def close(self) -> None:
        from llmbatch.integrations.ray import close_quota

        await super().close()
        for name in self.names:
            close_quota(name)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """A local Ray cluster for the ``ray`` cases of this module."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(
    params=[
        "memory",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param(
            "ray",
            marks=[
                pytest.mark.slow,
                # Ray's own deprecation notices are not ours to fix
                pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*"),
            ],
        ),
    ]
)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """Each implementation of the contract in turn."""
    made: Backend
    if request.param == "memory":
        with FakeClock(start=1000.0).patch_loop():
            made = Memory()
            yield made
            await made.close()
        return
    if request.param == "redis":
        made = Shared(request.getfixturevalue("redis_url"))
    else:
        request.getfixturevalue("ray_cluster")
        made = Cluster()
    try:
        yield made
    finally:
        await made.close()


def exact(**kwargs: Any) -> Limits:
    """Limits that start full, with no cushion and no transit charge: counts are exact."""
    return Limits(initial_fill=1.0, reserve=0.0, transit=0.0, **kwargs)


async def eventually(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    """Wait until *condition* holds (at once on virtual time; Ray's cancellations
    arrive at the actor a moment later)."""
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"still not so after {seconds} s")


async def test_acquire_release_settle(backend: Backend) -> None:
    """A permit counts in flight until released (twice is once); settling charges what
    was under-reserved (600 reserved, 800 used: 200 left of TPM 1,000)."""
    limiter = await backend.limiter(exact(tpm=1_000))
    assert isinstance(limiter, Limiter)
    permit = await limiter.acquire(tokens=600)
    assert isinstance(permit, Permit)
    assert (1, 1) == (limiter.statistics().acquired, limiter.statistics().in_flight)
    permit.release()
    permit.release()
    permit.settle(tokens=800)
    await backend.settled()
    stats = limiter.statistics()
    assert (1, 0) == (stats.acquired, stats.in_flight)
    assert 200 == pytest.approx(stats.available["tpm"], abs=5)


async def test_a_concurrency_cap(backend: Backend) -> None:
    """max_concurrency=2: a third acquire waits until a permit is released."""
    limiter = await backend.limiter(Limits(max_concurrency=2))
    first, second = await limiter.acquire(), await limiter.acquire()
    third = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0.2)
    assert (False, 2) == (third.done(), limiter.statistics().in_flight)
    first.release()
    last = await asyncio.wait_for(third, 10)
    await backend.settled()
    assert 2 == limiter.statistics().in_flight
    second.release()
    last.release()


async def test_a_request_too_large_fails_at_once(backend: Backend) -> None:
    """More than a bucket can ever hold raises RequestTooLarge, and takes nothing."""
    limiter = await backend.limiter(Limits(tpm=1_000))
    with pytest.raises(RequestTooLarge, match="needs 1,001 tpm but the limit is 1,000"):
        await asyncio.wait_for(limiter.acquire(tokens=1_001), 5)
    assert 0 == limiter.statistics().acquired


async def test_a_429_pauses_every_sharer(backend: Backend) -> None:
    """A 429 seen by one limiter pauses another on the same quota for the retry-after,
    and the bucket restarts empty: its next request waits the pause plus one unit's
    refill (0.5 s + 0.1 s at RPM 600)."""
    limiter = await backend.limiter(exact(rpm=600))
    other = await backend.sharer(limiter)
    await limiter.on_rate_limited(0.5, dimension="rpm")
    stats = limiter.statistics()
    assert 1 == stats.rate_limited
    assert 0 < stats.cooldown_remaining <= 0.5
    loop = asyncio.get_running_loop()
    started = loop.time()
    (await asyncio.wait_for(other.acquire(), 10)).release()
    assert 0.6 - 0.05 <= loop.time() - started <= 2.0


@pytest.mark.parametrize(
    ("fill", "server_left", "meaning"),
    [
        (1.0, {"rpm": 590, "tpm": 50_000}, "someone else spends the key: drained"),
        (0.5, {"rpm": 599, "tpm": 99_000}, "a half-full start, the server's is full: lifted"),
    ],
)
async def test_headers_drain_and_lift_the_buckets(
    backend: Backend, fill: float, server_left: dict[str, int], meaning: str
) -> None:
    """The first headers set each bucket to what the server has left after the request."""
    limits = Limits(rpm=600, tpm=100_000, initial_fill=fill, reserve=0.0, transit=0.0)
    limiter = await backend.limiter(limits)
    permit = await limiter.acquire(tokens=1_000)
    permit.release()
    headers = {
        "x-ratelimit-remaining-requests": str(server_left["rpm"]),
        "x-ratelimit-remaining-tokens": str(server_left["tpm"]),
    }
    await limiter.observe(headers, permit)
    available = limiter.statistics().available
    assert server_left["rpm"] == pytest.approx(available["rpm"], abs=2)
    assert server_left["tpm"] == pytest.approx(available["tpm"], abs=100)  # 1,667 a second


async def test_limits_auto_learns_the_limits_from_headers(backend: Backend) -> None:
    """Limits.auto() starts without limits, adopts the ones the headers report, and
    then charges every request for them, on every limiter sharing the quota."""
    limiter = await backend.limiter(Limits.auto(transit=0.0))
    assert {} == limiter.statistics().capacity
    permit = await limiter.acquire(tokens=100)
    permit.release()
    headers = {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-limit-tokens": "10000",
        "x-ratelimit-remaining-tokens": "9900",
    }
    await limiter.observe(headers, permit)
    stats = limiter.statistics()
    assert ({"rpm": 60.0, "tpm": 10_000.0}, ("rpm", "tpm")) == (stats.capacity, stats.learned)
    other = await backend.sharer(limiter)
    for one in (limiter, other):
        with pytest.raises(RequestTooLarge, match="needs 20,000 tpm but the limit is 10,000"):
            await asyncio.wait_for(one.acquire(tokens=20_000), 5)


async def test_statistics_are_a_frozen_snapshot(backend: Backend) -> None:
    """statistics(): counters, the concurrency cap, and per dimension what is available,
    what a bucket holds and the limit; frozen."""
    limiter = await backend.limiter(exact(rpm=60, tpm=1_000, max_concurrency=4))
    permit = await limiter.acquire(tokens=100)
    stats = limiter.statistics()
    assert isinstance(stats, LimiterStatistics)
    counters = (stats.acquired, stats.in_flight, stats.waiting, stats.rate_limited)
    assert ((1, 1, 0, 0), 4.0, ()) == (counters, stats.concurrency_cap, stats.learned)
    limits = {"rpm": 60.0, "tpm": 1_000.0}
    assert (limits, limits) == (stats.capacity, stats.limits)
    assert {"rpm": 59, "tpm": 900} == pytest.approx(stats.available, abs=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.acquired = 2  # type: ignore[misc]
    permit.release()


async def test_async_with_takes_one_request_and_gives_it_back(backend: Backend) -> None:
    """``async with limiter`` (nested too) holds a permit each and releases each on the
    way out: more rounds than the cap never deadlock."""
    limiter = await backend.limiter(exact(rpm=600, max_concurrency=2))
    async with asyncio.timeout(30):
        for _ in range(3):
            async with limiter as permit:
                assert isinstance(permit, Permit)
                async with limiter:
                    assert 2 == limiter.statistics().in_flight
            await backend.settled()
            assert 0 == limiter.statistics().in_flight
        async with await limiter.acquire() as permit:
            assert 1 == limiter.statistics().in_flight
    await backend.settled()
    assert 0 == limiter.statistics().in_flight


async def test_a_cancelled_acquire_takes_nothing(backend: Backend) -> None:
    """TPM 6,000 (100 a second) all spent; a 5,000-token acquire waiting for its turn
    is cancelled: the next small request waits only for its own tokens, not for the
    50 s the cancelled one would have taken."""
    limiter = await backend.limiter(exact(tpm=6_000))
    (await limiter.acquire(tokens=6_000)).release()
    waiter = asyncio.create_task(limiter.acquire(tokens=5_000))
    await asyncio.sleep(0.2)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await eventually(lambda: limiter.statistics().waiting == 0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    (await asyncio.wait_for(limiter.acquire(tokens=10), 10)).release()
    assert loop.time() - started < 1.0
    assert 2 == limiter.statistics().acquired
