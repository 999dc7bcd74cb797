"""The limiter against the simulator over real HTTP, on virtual time.

The simulator and the limiter share one FakeClock (the simulator's buckets read
``clock.time``; the event loop runs on it through ``patch_loop``), so minutes of paced
traffic run in a fraction of a second and the results are deterministic.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest

from llmbatch.limits import Limits, RateLimiter
from llmbatch.testing import FakeClock, Simulator
from llmbatch.tokens import count_messages

MODEL = "gpt-4o-mini"


@dataclass
class Run:
    ok: int = 0
    rate_limited: int = 0


@pytest.fixture
async def clock() -> AsyncIterator[FakeClock]:
    fake = FakeClock(start=5000.0)
    with fake.patch_loop():
        yield fake


async def drive(
    sim: Simulator,
    limiter: RateLimiter,
    n: int,
    *,
    max_tokens: int = 16,
    concurrency: int = 32,
    api_key: str = "sk-a",
) -> Run:
    """Send n chat requests through the limiter: acquire, call, observe, settle, release."""
    run = Run()
    semaphore = asyncio.Semaphore(concurrency)
    async with openai.AsyncOpenAI(base_url=sim.base_url, api_key=api_key, max_retries=0) as client:

        async def one(i: int) -> None:
            messages: list[Any] = [{"role": "user", "content": f"document number {i}"}]
            cost = count_messages(messages, MODEL) + max_tokens
            async with semaphore:
                while True:
                    permit = await limiter.acquire(tokens=cost)
                    try:
                        raw = await client.chat.completions.with_raw_response.create(
                            model=MODEL,
                            messages=messages,
                            max_tokens=max_tokens,
                        )
                    except openai.RateLimitError as exc:
                        run.rate_limited += 1
                        retry_after = float(exc.response.headers.get("retry-after", "1"))
                        kind = (exc.body or {}).get("type") if isinstance(exc.body, dict) else None
                        await limiter.on_rate_limited(
                            retry_after, dimension="tpm" if kind == "tokens" else "rpm"
                        )
                        continue
                    finally:
                        permit.release()
                    await limiter.observe(raw.headers, permit)
                    usage = raw.parse().usage
                    assert usage is not None
                    permit.settle(tokens=usage.prompt_tokens + max_tokens)
                    run.ok += 1
                    return

        await asyncio.gather(*(one(i) for i in range(n)))
    return run


async def test_rpm_bound_run_has_no_429(clock: FakeClock) -> None:
    """200 requests at RPM 60: all succeed, none is refused, paced at the limit."""
    async with Simulator(rpm=60, clock=clock.time) as sim:
        limiter = RateLimiter(Limits(rpm=60))
        start = clock.time()
        run = await drive(sim, limiter, 200)
        elapsed = clock.time() - start
        stats = sim.stats()
    assert (200, 0) == (run.ok, run.rate_limited)
    assert {} == dict(stats.rate_limited)
    assert {} == limiter.statistics().others  # alone on the key: nobody else seen spending
    # the server's full bucket covers 60; 140 more at 1/s: the least possible is 140 s
    assert 140 <= elapsed <= 140 * 1.03


async def test_tpm_bound_run_has_no_429(clock: FakeClock) -> None:
    """TPM binding (each request reserves its prompt + 512 tokens): no 429, near the limit."""
    async with Simulator(tpm=20_000, clock=clock.time) as sim:
        limiter = RateLimiter(Limits(tpm=20_000))
        start = clock.time()
        run = await drive(sim, limiter, 120, max_tokens=512)
        elapsed = clock.time() - start
        stats = sim.stats()
    charged = stats.prompt_tokens + stats.completion_tokens_reserved
    least = (charged - 20_000) / (20_000 / 60)
    assert (120, 0) == (run.ok, run.rate_limited)
    assert least <= elapsed <= least * 1.05


async def test_auto_learns_the_limits(clock: FakeClock) -> None:
    """Limits.auto() starts unlimited (AIMD cap 8), learns RPM/TPM from the headers, and
    then paces at them: requests that waited while the limits were learned are charged
    to the new buckets, so the server never refuses one."""
    async with Simulator(rpm=60, tpm=200_000, clock=clock.time) as sim:
        limiter = RateLimiter(Limits.auto())
        started = clock.time()
        run = await drive(sim, limiter, 150)
        elapsed = clock.time() - started
    stats = limiter.statistics()
    assert 150 == run.ok
    # paced at what it learned: the server's 60 at once, then 90 at one a second
    assert 90.0 <= elapsed <= 90.0 * 1.05
    assert ("rpm", "tpm") == stats.learned
    assert {"rpm": 60.0, "tpm": 200_000.0} == stats.capacity
    assert 0 == run.rate_limited


async def test_headers_reveal_another_client_spending_the_key(clock: FakeClock) -> None:
    """Another client spends half the quota behind the limiter's back (30 a minute of
    the key's 60): the headers drain the local bucket, the limiter learns what the other
    spends and leaves it that share, so few 429s remain, and they pause it instead of
    becoming a storm: every item still succeeds."""
    seen: list[float] = []

    async def probe() -> None:
        await asyncio.sleep(45)  # virtual; both clients busy
        seen.append(limiter.statistics().others.get("rpm", 0.0))

    async with Simulator(rpm=60, clock=clock.time) as sim:
        limiter = RateLimiter(Limits(rpm=60, initial_fill=0.5))
        other = RateLimiter(Limits(rpm=30, initial_fill=0.5))  # the other process
        runs = await asyncio.gather(drive(sim, limiter, 120), drive(sim, other, 60), probe())
    assert (120, 60) == (runs[0].ok, runs[1].ok)
    assert limiter.statistics().header_corrections > 1
    assert 15.0 <= seen[0] <= 45.0  # the other's 30 a minute, estimated
    assert runs[0].rate_limited <= 12  # of its 120 requests (29 with no estimate)


async def test_anthropic_input_and_output_token_limits(clock: FakeClock) -> None:
    """Anthropic's ITPM/OTPM: input estimated, output reserved at max_tokens then settled
    (the simulator refunds unused output, as the 'max_tokens' reservation rule says);
    its RFC 3339 headers feed the limiter; no request is refused."""
    import anthropic

    from llmbatch.tokens import admission_estimate

    async with Simulator(rpm=1000, itpm=3000, otpm=2000, clock=clock.time) as sim:
        limiter = RateLimiter(Limits(rpm=1000, input_tpm=3000, output_tpm=2000, refund_unused=True))
        refused = 0
        async with anthropic.AsyncAnthropic(
            base_url=sim.url, api_key="sk-ant-x", max_retries=0
        ) as client:

            async def one(i: int) -> None:
                nonlocal refused
                messages: list[Any] = [{"role": "user", "content": f"paragraph {i} " * 10}]
                while True:
                    async with await limiter.acquire(
                        input_tokens=admission_estimate(messages), output_tokens=64
                    ) as permit:
                        try:
                            raw = await client.messages.with_raw_response.create(
                                model="claude-haiku-4-5", max_tokens=64, messages=messages
                            )
                        except anthropic.RateLimitError as exc:
                            refused += 1
                            await limiter.on_rate_limited(
                                float(exc.response.headers["retry-after"])
                            )
                            continue
                    await limiter.observe(raw.headers, permit)
                    usage = (await raw.parse()).usage
                    permit.settle(
                        input_tokens=usage.input_tokens, output_tokens=usage.output_tokens
                    )
                    return

            await asyncio.gather(*(one(i) for i in range(100)))
        stats = sim.stats()
    assert 0 == refused
    assert {} == dict(stats.rate_limited)
    assert 100 == stats.responses.get(200)
