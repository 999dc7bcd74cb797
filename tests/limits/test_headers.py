"""Tests for llmbatch.limits._headers: parsing rate-limit headers, and the one case table
of the header-correction rule, run against the Python rule (``correction``) and the Lua
one (``lua/adjust.lua``, through a real redis-server with the same inputs)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from redis.asyncio import Redis

from llmbatch.limits import (
    BucketPermit,
    Limits,
    RateLimitHeaders,
    RedisRateLimiter,
    parse_go_duration,
    parse_reset,
)
from llmbatch.limits._headers import correction


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    """A client of the session's redis-server (tests/conftest.py)."""
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


# -- parsing ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("6m0s", 360.0),
        ("1m30s", 90.0),
        ("120ms", 0.12),
        ("0.5s", 0.5),
        ("1s", 1.0),
        ("1h2m3.5s", 3723.5),
        ("7.66s", 7.66),
        ("250us", 0.00025),
        ("20", 20.0),
        ("1.5", 1.5),
        ("", None),
        ("soon", None),
        ("5m junk", None),
        ("-3", None),
    ],
)
def test_parse_go_duration(text: str, expected: float | None) -> None:
    """Go-style durations (and bare seconds) parse; garbage gives None."""
    assert parse_go_duration(text) == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-08-21T12:41:00Z", 60.0),
        ("2025-08-21T12:40:00+00:00", 0.0),
        ("2025-08-21T12:39:00Z", 0.0),  # in the past: now
        ("1m0s", 60.0),
        ("not a time", None),
    ],
)
def test_parse_reset(text: str, expected: float | None) -> None:
    """Resets are Go durations (OpenAI) or RFC 3339 instants (Anthropic)."""
    now = datetime(2025, 8, 21, 12, 40, 0, tzinfo=UTC)
    assert expected == parse_reset(text, now=now)


def test_parse_openai_headers() -> None:
    """OpenAI's x-ratelimit-* headers map to rpm/tpm, case-insensitively."""
    info = RateLimitHeaders.parse(
        {
            "X-RateLimit-Limit-Requests": "60",
            "x-ratelimit-limit-tokens": "150000",
            "x-ratelimit-remaining-requests": "59",
            "x-ratelimit-remaining-tokens": "149984",
            "x-ratelimit-reset-requests": "1s",
            "x-ratelimit-reset-tokens": "6m0s",
        }
    )
    assert ({"rpm": 60, "tpm": 150000}, {"rpm": 59, "tpm": 149984}) == (info.limits, info.remaining)
    assert {"rpm": 1.0, "tpm": 360.0} == info.resets


@pytest.mark.parametrize(
    ("project_left", "expected"),
    [
        (90_000, ({"tpm": 100_000}, {"tpm": 90_000}, {"tpm": 60.0})),  # the project binds
        (149_000, ({"tpm": 150_000}, {"tpm": 140_000}, {"tpm": 6.0})),  # the organization
    ],
)
def test_the_stricter_of_organization_and_project_token_limits_binds(
    project_left: int, expected: tuple[dict[str, int], dict[str, int], dict[str, float]]
) -> None:
    """With a project-scoped limit OpenAI also sends x-ratelimit-*-project-tokens: the
    limit with less remaining is the one read, its limit, remaining and reset together."""
    info = RateLimitHeaders.parse(
        {
            "x-ratelimit-limit-tokens": "150000",
            "x-ratelimit-remaining-tokens": "140000",
            "x-ratelimit-reset-tokens": "6s",
            "x-ratelimit-limit-project-tokens": "100000",
            "x-ratelimit-remaining-project-tokens": str(project_left),
            "x-ratelimit-reset-project-tokens": "1m0s",
        }
    )
    assert expected == (info.limits, info.remaining, info.resets)


def test_parse_anthropic_headers_and_garbage() -> None:
    """Anthropic's headers map to rpm/input_tpm/output_tpm; odd values are skipped."""
    now = datetime(2025, 8, 21, 12, 40, 0, tzinfo=UTC)
    info = RateLimitHeaders.parse(
        {
            "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-remaining": "49",
            "anthropic-ratelimit-requests-reset": "2025-08-21T12:40:02Z",
            "anthropic-ratelimit-input-tokens-limit": "40000",
            "anthropic-ratelimit-input-tokens-remaining": "many",
            "anthropic-ratelimit-output-tokens-limit": "0",
        },
        now=now,
    )
    assert {"rpm": 50, "input_tpm": 40000} == info.limits
    assert {"rpm": 49} == info.remaining
    assert {"rpm": 2.0} == info.resets
    assert not RateLimitHeaders.parse({"content-type": "application/json"})


# -- the header-correction rule: one table, two implementations ------------------------


@dataclass(frozen=True)
class Reading:
    """One dimension of one response's headers, and what the limiter knows about it: the
    inputs of the rule (see ``llmbatch.limits._headers.correction``)."""

    server_left: float
    #: left right after the request's permit (measured), else left now
    believed: float = 5_000.0
    corrected_since: float = 0.0
    #: earlier permits in flight then, and the server's refill during the send lag
    #: (not measured: every request in flight)
    in_flight: float = 0.0
    refunded_since: float = 0.0
    taken_since: float = 0.0
    first: bool = False
    settling: bool = False
    measured: bool = True
    capacity: float = 10_000.0
    reserve: float = 0.0025  # with the capacity: a drain tolerance of 26


CASES = {
    # measured against the request's permit
    "agreeing headers change nothing": (Reading(5_000), None),
    "the first headers apply even when they agree": (Reading(5_000, first=True), 0.0),
    "the first headers lift to the server": (Reading(6_000, first=True), 1_000.0),
    "the first headers drain to the server": (Reading(4_000, first=True), -1_000.0),
    "a deficit beyond the tolerance drains": (Reading(4_900), -100.0),
    "rounding and the cushion are left alone": (Reading(4_980), None),
    "just beyond the tolerance drains": (Reading(4_973.5), -26.5),
    "no cushion: one unit of rounding tolerated": (Reading(4_998.5, reserve=0.0), -1.5),
    "a deficit corrected since is not drained twice": (
        Reading(4_900, corrected_since=100),
        None,
    ),
    "a drain leaves what later permits took": (Reading(4_900, taken_since=60), -40.0),
    "later permits explain the whole deficit": (Reading(4_900, taken_since=150), None),
    "a lift leaves what was in flight": (Reading(5_300, in_flight=200), 100.0),
    "what was in flight explains the whole surplus": (Reading(5_300, in_flight=400), None),
    "refunds credited since are not lifted twice": (Reading(5_800, refunded_since=800), None),
    "refunds explain part of a surplus": (
        Reading(5_800, refunded_since=300, in_flight=100),
        400.0,
    ),
    "a drain since that the server does not show is lifted back": (
        Reading(5_000, corrected_since=300),
        300.0,
    ),
    "a lift of one unit counts": (Reading(5_001), 1.0),
    "half a unit does not": (Reading(5_000.4), None),
    "no lift while settling after a 429": (Reading(6_000, settling=True), None),
    "settling still drains": (Reading(4_000, settling=True), -1_000.0),
    "the first headers while settling set the level, no higher": (
        Reading(6_000, first=True, settling=True),
        0.0,
    ),
    # without a permit to compare with (or a bucket learned after it): the level now
    "without a permit later headers never lift": (Reading(6_000, measured=False), None),
    "without a permit a deficit drains": (Reading(4_000, measured=False), -1_000.0),
    "without a permit rounding is left alone": (Reading(4_990, measured=False), None),
    "without a permit the first headers lift less all in flight": (
        Reading(6_000, in_flight=300, first=True, measured=False),
        700.0,
    ),
    "without a permit in flight may explain the whole surplus": (
        Reading(5_200, in_flight=300, first=True, measured=False),
        0.0,
    ),
    "without a permit the first headers while settling only drain": (
        Reading(6_000, first=True, settling=True, measured=False),
        0.0,
    ),
}


@pytest.mark.parametrize(("reading", "expected"), CASES.values(), ids=CASES.keys())
def test_the_python_rule(reading: Reading, expected: float | None) -> None:
    """``correction()``, which RateLimiter.observe applies to each dimension."""
    uncertain = reading.in_flight + reading.refunded_since
    assert expected == correction(
        reading.server_left,
        reading.believed,
        corrected_since=reading.corrected_since,
        uncertain=uncertain,
        taken_since=reading.taken_since,
        capacity=reading.capacity,
        reserve=reading.reserve,
        first=reading.first,
        settling=reading.settling,
        measured=reading.measured,
    )


@pytest.mark.redis
@pytest.mark.parametrize(("reading", "expected"), CASES.values(), ids=CASES.keys())
async def test_the_lua_rule(redis: Redis, reading: Reading, expected: float | None) -> None:
    """``lua/adjust.lua`` in "observe" mode, as RedisRateLimiter.observe calls it: the
    same inputs set up in Redis (corrections, takings and refunds so far, requests in
    flight, the synced flag, a 429's settling time) and in the permit, and the change
    it makes to what the bucket has available. A per-day bucket, so that Redis's clock
    moving on between the calls changes nothing that counts."""
    quota = f"test/{uuid.uuid4().hex}"
    limits = Limits(rpd=reading.capacity, reserve=reading.reserve, transit=0.0)
    shared = RedisRateLimiter(redis, limits, quota=quota)
    key = f"llmbatch:default:{quota}"
    seconds, micros = await redis.time()
    now = seconds + micros / 1e6
    level = reading.capacity - (reading.believed if not reading.measured else 5_000.0)
    state: dict[str, float] = {
        "rpd:level": level,
        "rpd:ts": now,
        "rpd:adj": 1_000.0,
        "rpd:taken": 7_000.0,
        "rpd:refunded": 2_000.0,
    }
    if not reading.first:
        state["rpd:synced"] = 1
    if reading.settling:
        state["settle_until"] = now + 1_000
    permit = None
    if reading.measured:
        permit = BucketPermit(
            shared,
            {"rpd": 1.0},
            available_after={"rpd": reading.believed},
            adjusted_at={"rpd": 1_000.0 - reading.corrected_since},
            outstanding_before={"rpd": reading.in_flight},
            taken_at={"rpd": 7_000.0 - reading.taken_since},
        )
        permit.refunded_at = {"rpd": 2_000.0 - reading.refunded_since}
    else:
        state["u:requests:out"] = reading.in_flight  # no permit: nothing of its own
    for field, value in state.items():
        await redis.hset(key, field, value)
    before = reading.capacity - level
    after = await shared._adjust("observe", {"rpd": reading.server_left}, permit=permit)
    assert (expected or 0.0) == pytest.approx(after["rpd"] - before, abs=0.01)
