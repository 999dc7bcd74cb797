"""Rate-limit conformance: the simulator's buckets on a ``FakeClock``, seen through real HTTP.

The clock only moves when a test advances it, so "exactly at the limit" is exact.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam

from llmbatch.testing import FakeClock, Simulator
from llmbatch.testing._buckets import go_duration
from llmbatch.testing._content import estimate_tokens
from llmbatch.testing.pytest_plugin import SimulatorFactory

MODEL = "gpt-4o-mini"
USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Count the sheep."}]
PROMPT = estimate_tokens({"messages": USER})  # the prompt estimate of every request here


def _message(error: openai.APIStatusError) -> str:
    """The ``message`` of the error body (the SDK's own message prefixes the status)."""
    assert isinstance(error.body, dict)
    return str(error.body["message"])


@dataclass
class Rig:
    """A simulator on a fake clock, and a client for it."""

    sim: Simulator
    clock: FakeClock
    client: openai.AsyncOpenAI

    async def chat(self, model: str = MODEL, **params: Any) -> ChatCompletion:
        completion: ChatCompletion = await self.client.chat.completions.create(
            model=model, messages=USER, **params
        )
        return completion

    async def raw_chat(self, **params: Any) -> dict[str, str]:
        """The response headers of a successful chat call."""
        raw = await self.client.chat.completions.with_raw_response.create(
            model=MODEL, messages=USER, **params
        )
        return dict(raw.headers)

    async def rejected(self, **params: Any) -> openai.RateLimitError:
        with pytest.raises(openai.RateLimitError) as info:
            await self.chat(**params)
        return info.value


MakeRig = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def make_rig(simulator_factory: SimulatorFactory) -> AsyncIterator[MakeRig]:
    """``await make_rig(rpm=3, ...)``: a started simulator on a FakeClock, plus a client."""
    clients: list[openai.AsyncOpenAI] = []

    async def make(api_key: str = "sk-test", **options: object) -> Rig:
        clock = FakeClock()
        sim = await simulator_factory(clock=clock, **options)
        client = openai.AsyncOpenAI(base_url=sim.base_url, api_key=api_key, max_retries=0)
        clients.append(client)
        return Rig(sim, clock, client)

    yield make
    for client in clients:
        await client.close()


async def test_exactly_at_the_rpm_limit_passes_one_more_is_429(make_rig: MakeRig) -> None:
    """RPM 3: three requests pass at t=0, the fourth is a ``requests`` 429 with the exact body."""
    rig = await make_rig(rpm=3)
    for _ in range(3):
        await rig.chat()
    error = await rig.rejected()
    assert ("requests", "rate_limit_exceeded", None) == (error.type, error.code, error.param)
    assert _message(error) == (
        f"Rate limit reached for {MODEL} in organization org-llmbatch-sim on requests per min "
        "(RPM): Limit 3, Used 3, Requested 1. Please try again in 40s. "
        "Visit https://platform.openai.com/account/rate-limits to learn more."
    )
    # the rejected request was charged one request (OpenAI: unsuccessful requests count)
    assert ("40", "40000") == (
        error.response.headers["retry-after"],
        error.response.headers["retry-after-ms"],
    )
    assert "0" == error.response.headers["x-ratelimit-remaining-requests"]


async def test_refill_after_advancing_time(make_rig: MakeRig) -> None:
    """At 3/min one request drips back every 20 s, continuously."""
    rig = await make_rig(rpm=3, charge_rejected="none")
    for _ in range(3):
        await rig.chat()
    rig.clock.advance(19.9)
    await rig.rejected()
    rig.clock.advance(0.1)
    await rig.chat()
    await rig.rejected()
    rig.clock.advance(60)
    for _ in range(3):
        await rig.chat()


async def test_retry_after_is_the_time_to_refill(make_rig: MakeRig) -> None:
    """Waiting exactly ``retry-after-ms`` is enough, and no less would do."""
    rig = await make_rig(tpm=1000, charge_rejected="none")
    await rig.chat(max_tokens=900)
    error = await rig.rejected(max_tokens=500)
    wait_ms = int(error.response.headers["retry-after-ms"])
    assert "tokens" == error.type
    # 900 + PROMPT used of 1000, and 500 + PROMPT wanted: missing 400 + 2 PROMPT at 1000/min
    assert round((400 + 2 * PROMPT) * 60) == wait_ms
    rig.clock.advance(wait_ms / 1000 - 0.01)
    await rig.rejected(max_tokens=500)
    rig.clock.advance(0.01)
    await rig.chat(max_tokens=500)


async def test_tpm_charges_max_tokens_times_n(make_rig: MakeRig) -> None:
    """The TPM charge is the prompt estimate plus ``max_tokens`` x ``n``, reported as Used."""
    rig = await make_rig(tpm=10_000)
    headers = await rig.raw_chat(max_tokens=1000, n=3)
    assert str(10_000 - PROMPT - 3000) == headers["x-ratelimit-remaining-tokens"]
    error = await rig.rejected(max_tokens=2500, n=3)
    assert "tokens" == error.type
    assert (
        f"on tokens per min (TPM): Limit 10000, Used {PROMPT + 3000}, "
        f"Requested {PROMPT + 7500}." in _message(error)
    )


async def test_default_max_tokens_is_charged(make_rig: MakeRig) -> None:
    """Without max_tokens the default (4096) is reserved, as OpenAI reserves its default."""
    rig = await make_rig(tpm=100_000)
    headers = await rig.raw_chat()
    assert str(100_000 - PROMPT - 4096) == headers["x-ratelimit-remaining-tokens"]


async def test_remaining_headers_decrease_as_charged(make_rig: MakeRig) -> None:
    """Each answer reports what is left and when the bucket is full again (Go durations)."""
    rig = await make_rig(rpm=60, tpm=6000)
    seen = []
    for _ in range(3):
        headers = await rig.raw_chat(max_tokens=100)
        seen.append(
            tuple(
                headers[f"x-ratelimit-{kind}"]
                for kind in (
                    "limit-requests",
                    "remaining-requests",
                    "reset-requests",
                    "limit-tokens",
                    "remaining-tokens",
                )
            )
        )
    per = 100 + PROMPT
    assert [
        ("60", "59", "1s", "6000", str(6000 - per)),
        ("60", "58", "2s", "6000", str(6000 - 2 * per)),
        ("60", "57", "3s", "6000", str(6000 - 3 * per)),
    ] == seen
    # at 6000/min, 3 x per tokens take 3 x per / 100 seconds to refill
    assert headers["x-ratelimit-reset-tokens"] == f"{3 * per / 100:g}s"


async def test_a_request_larger_than_tpm_can_never_pass(make_rig: MakeRig) -> None:
    """Asking for more than the whole TPM is 'Request too large' (sent as OpenAI sends
    it: without ``x-should-retry``; the message is what says it can never pass)."""
    rig = await make_rig(tpm=1000)
    error = await rig.rejected(max_tokens=5000)
    assert ("tokens", "rate_limit_exceeded") == (error.type, error.code)
    assert _message(error).startswith(f"Request too large for {MODEL} in organization")
    assert "x-should-retry" not in error.response.headers
    assert "retry-after" not in error.response.headers


async def test_limits_are_per_key_and_per_model(make_rig: MakeRig) -> None:
    """Another key, or another model, has its own buckets."""
    rig = await make_rig(rpm=1)
    await rig.chat()
    await rig.rejected()
    await rig.chat(model="gpt-4o")
    async with openai.AsyncOpenAI(
        base_url=rig.sim.base_url, api_key="sk-other", max_retries=0
    ) as other:
        await other.chat.completions.create(model=MODEL, messages=USER)


async def test_daily_request_limit(make_rig: MakeRig) -> None:
    """RPD: the day's requests run out even though RPM refills; the message says RPD."""
    rig = await make_rig(rpm=100, rpd=2, charge_rejected="none")
    await rig.chat()
    await rig.chat()
    error = await rig.rejected()
    assert "requests" == error.type
    assert "on requests per day (RPD): Limit 2, Used 2, Requested 1." in _message(error)
    assert "Please try again in 12h0m0s." in _message(error)
    rig.clock.advance(12 * 3600)
    await rig.chat()


async def test_daily_token_limit(make_rig: MakeRig) -> None:
    """TPD limits tokens per day."""
    rig = await make_rig(tpd=1000)
    await rig.chat(max_tokens=900)
    error = await rig.rejected(max_tokens=900)
    assert "tokens" == error.type
    assert "on tokens per day (TPD)" in _message(error)


@pytest.mark.parametrize(
    ("policy", "expected_wait_ms"),
    [("request", 40_000), ("full", 40_000), ("none", 20_000)],
)
async def test_charge_rejected_policy(
    make_rig: MakeRig, policy: str, expected_wait_ms: int
) -> None:
    """What a 429 costs decides how long the client must wait (RPM 3)."""
    rig = await make_rig(rpm=3, charge_rejected=policy)
    for _ in range(3):
        await rig.chat()
    error = await rig.rejected()
    assert str(expected_wait_ms) == error.response.headers["retry-after-ms"]


async def test_hammering_keeps_a_client_locked_out(make_rig: MakeRig) -> None:
    """Under the default policy, retrying early pushes the bucket into debt."""
    rig = await make_rig(rpm=3)
    for _ in range(3):
        await rig.chat()
    for _ in range(3):
        rig.clock.advance(10)
        await rig.rejected()
    # four rejections cost 4 requests; 30 s refilled 1.5 -> 2.5 in debt, 1 needed
    error = await rig.rejected()
    assert "70000" == error.response.headers["retry-after-ms"]


@pytest.mark.parametrize(
    ("setting", "key", "broke"),
    [(True, "sk-any", True), ({"sk-broke"}, "sk-broke", True), ({"sk-broke"}, "sk-ok", False)],
)
async def test_insufficient_quota(
    make_rig: MakeRig, setting: object, key: str, broke: bool
) -> None:
    """Keys out of quota get the non-retryable 429, which the SDK exposes as type and code."""
    rig = await make_rig(api_key=key, insufficient_quota=setting)
    if not broke:
        await rig.chat()
        return
    error = await rig.rejected()
    assert ("insufficient_quota", "insufficient_quota") == (error.type, error.code)
    assert _message(error).startswith("You exceeded your current quota")
    assert "false" == error.response.headers["x-should-retry"]
    assert {"insufficient_quota": 1} == dict(rig.sim.stats().rate_limited)


async def test_embeddings_are_charged_prompt_tokens_only(make_rig: MakeRig) -> None:
    """An embeddings request costs its input tokens, with no output reservation."""
    rig = await make_rig(tpm=1000)
    raw = await rig.client.embeddings.with_raw_response.create(
        model="text-embedding-3-small", input="x" * 400
    )
    assert "900" == raw.headers["x-ratelimit-remaining-tokens"]


async def test_admissions_per_second_follow_the_clock(make_rig: MakeRig) -> None:
    """Admitted requests are counted per second of the simulator's clock; 429s are not."""
    rig = await make_rig(rpm=120, charge_rejected="none")
    await rig.chat()
    await rig.chat()
    rig.clock.advance(1.5)
    await rig.chat()
    rig.clock.advance(3)
    await rig.chat()
    assert {0: 2, 1: 1, 4: 1} == dict(rig.sim.stats().admissions_per_second)


# -- quantized limits (bucket_seconds) -----------------------------------------------------------


async def _burst(rig: Rig, count: int) -> list[int]:
    """Send *count* chat requests one after another (a lean client: the burst happens at
    one instant of the fake clock anyway); return their statuses."""
    body = {"model": MODEL, "messages": USER, "max_tokens": 1}
    headers = {"Authorization": "Bearer sk-test"}
    async with aiohttp.ClientSession(headers=headers) as session:
        statuses = []
        for _ in range(count):
            async with session.post(f"{rig.sim.base_url}/chat/completions", json=body) as reply:
                await reply.read()
                statuses.append(reply.status)
    return statuses


async def test_a_6_second_bucket_admits_exactly_1000_then_refills_at_166_per_second(
    make_rig: MakeRig,
) -> None:
    """RPM 10,000 enforced over 6 s: a burst of exactly 1,000 at once, then 10,000/60 per
    second; the 429 still speaks of the per-minute limit."""
    rig = await make_rig(rpm=10_000, bucket_seconds=6, charge_rejected="none")
    assert [200] * 1000 == await _burst(rig, 1000)
    error = await rig.rejected(max_tokens=1)
    assert "requests" == error.type
    assert (
        "on requests per min (RPM): Limit 10000, Used 10000, Requested 1. "
        "Please try again in 6ms." in _message(error)
    )
    assert ("1", "6") == (
        error.response.headers["retry-after"],
        error.response.headers["retry-after-ms"],
    )
    rig.clock.advance(0.3)  # 0.3 s x 166.67/s = 50 requests
    assert [200] * 50 + [429] == await _burst(rig, 51)
    assert 1050 == rig.sim.stats().ok


@pytest.mark.parametrize(
    ("bucket_seconds", "remaining"),
    [(None, "9999"), (60, "9999"), (6, "999"), (0.6, "99")],
)
async def test_headers_report_the_limit_and_the_short_buckets_remaining(
    make_rig: MakeRig, bucket_seconds: float | None, remaining: str
) -> None:
    """``limit`` stays the per-minute limit; ``remaining`` and ``reset`` describe the bucket
    actually enforced (one request refills in 6 ms at 10,000/min, whatever it holds)."""
    rig = await make_rig(rpm=10_000, bucket_seconds=bucket_seconds)
    headers = await rig.raw_chat(max_tokens=1)
    assert ("10000", remaining, "6ms") == (
        headers["x-ratelimit-limit-requests"],
        headers["x-ratelimit-remaining-requests"],
        headers["x-ratelimit-reset-requests"],
    )


async def test_tpm_in_a_6_second_bucket(make_rig: MakeRig) -> None:
    """TPM 100,000 over 6 s holds 10,000 tokens: headers and the 429 body say so."""
    rig = await make_rig(tpm=100_000, bucket_seconds=6)
    first = PROMPT + 6000
    headers = await rig.raw_chat(max_tokens=6000)
    assert ("100000", str(10_000 - first), go_duration(first * 60 / 100_000)) == (
        headers["x-ratelimit-limit-tokens"],
        headers["x-ratelimit-remaining-tokens"],
        headers["x-ratelimit-reset-tokens"],
    )
    error = await rig.rejected(max_tokens=6000)
    # Used is the limit minus what the bucket holds: Limit - Used is the remaining header
    used = 100_000 - (10_000 - first)
    wait = (first - (10_000 - first)) * 60 / 100_000
    assert (
        f"on tokens per min (TPM): Limit 100000, Used {used}, Requested {first}. "
        f"Please try again in {go_duration(wait)}." in _message(error)
    )
    assert str(math.ceil(wait * 1000)) == error.response.headers["retry-after-ms"]
    rig.clock.advance(wait)
    await rig.chat(max_tokens=6000)


async def test_a_request_beyond_the_short_bucket_passes_when_it_is_full(
    make_rig: MakeRig,
) -> None:
    """20,000 tokens fit TPM 100,000 but not its 10,000-token bucket: they pass on a full
    bucket and leave it in debt; only more than the per-minute limit is too large."""
    rig = await make_rig(tpm=100_000, bucket_seconds=6)
    headers = await rig.raw_chat(max_tokens=20_000)
    assert ("0", go_duration((PROMPT + 20_000) * 60 / 100_000)) == (
        headers["x-ratelimit-remaining-tokens"],
        headers["x-ratelimit-reset-tokens"],
    )
    await rig.rejected(max_tokens=1)
    error = await rig.rejected(max_tokens=100_000)
    assert _message(error).startswith(f"Request too large for {MODEL}")
    assert "Limit 100000, Requested" in _message(error)
