"""Token buckets, the header time formats and the admission rule (``_buckets``, ``_quota``)."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmbatch.testing._buckets import DAY, MINUTE, TokenBucket, go_duration, rfc3339_after
from llmbatch.testing._quota import Quota


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0, "0s"),
        (0.0001, "1ms"),
        (0.12, "120ms"),
        (0.5, "500ms"),
        (0.999, "999ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (7.66, "7.66s"),
        (17.0004, "17.001s"),
        (59.999, "59.999s"),
        (60, "1m0s"),
        (90, "1m30s"),
        (360, "6m0s"),
        (68.5, "1m8.5s"),
        (3600, "1h0m0s"),
        (3723.25, "1h2m3.25s"),
        (86_400, "24h0m0s"),
        (-3, "0s"),
    ],
)
def test_go_duration(seconds: float, expected: str) -> None:
    """Durations print like Go's ``time.Duration.String`` at millisecond precision."""
    assert expected == go_duration(seconds)


def _parse_go(text: str) -> float:
    """Parse the Go durations that go_duration emits (h, m, s, ms units)."""
    total, number = 0.0, ""
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isdigit() or ch == ".":
            number += ch
        else:
            unit = "ms" if text.startswith("ms", i) else ch
            total += float(number) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[unit]
            number = ""
            i += len(unit) - 1
        i += 1
    return total


@given(st.floats(min_value=0, max_value=200_000, allow_nan=False))
def test_go_duration_never_early(seconds: float) -> None:
    """The printed duration is never shorter than the real one, and at most 1 ms longer."""
    printed = _parse_go(go_duration(seconds))
    assert seconds - 1e-6 <= printed <= seconds + 0.001 + 1e-6


@pytest.mark.parametrize(
    ("now", "seconds", "expected"),
    [
        (datetime(2025, 8, 21, 12, 40, 58, tzinfo=UTC), 1, "2025-08-21T12:40:59Z"),
        (datetime(2025, 8, 21, 12, 40, 58, 700_000, tzinfo=UTC), 0.5, "2025-08-21T12:41:00Z"),
        (datetime(2025, 8, 21, 12, 40, 58, tzinfo=UTC), 0, "2025-08-21T12:40:58Z"),
        (datetime(2025, 12, 31, 23, 59, 30, tzinfo=UTC), 45, "2026-01-01T00:00:15Z"),
    ],
)
def test_rfc3339_after_rounds_the_moment_up(now: datetime, seconds: float, expected: str) -> None:
    """Anthropic-style reset stamps are whole UTC seconds, never before the real reset."""
    assert expected == rfc3339_after(seconds, now=now)


@pytest.mark.parametrize(
    ("limit", "period", "takes", "elapsed", "expected_level"),
    [
        (3, MINUTE, [1, 1, 1], 0, 0.0),
        (3, MINUTE, [1, 1, 1], 20, 1.0),  # 3/min refills one every 20 s, exactly
        (3, MINUTE, [1, 1, 1], 600, 3.0),  # never beyond the capacity
        (60, MINUTE, [30], 15, 45.0),
        (1000, MINUTE, [1500], 30, 0.0),  # debt refills first
        (86_400, DAY, [86_400], 1, 1.0),
    ],
)
def test_bucket_refills_continuously(
    limit: int, period: float, takes: list[int], elapsed: float, expected_level: float
) -> None:
    """The level drips back at limit/period per second, capped at the limit."""
    bucket = TokenBucket(limit, period, now=100.0)
    for amount in takes:
        bucket.take(amount)
    bucket.refill(100.0 + elapsed)
    assert expected_level == pytest.approx(bucket.level)


@pytest.mark.parametrize(
    ("level", "amount", "expected_wait"),
    [
        (3.0, 1, 0.0),
        (0.0, 1, 20.0),
        (-1.0, 1, 40.0),
        (0.5, 1, 10.0),
        (3.0, 4, math.inf),  # more than the capacity: never
    ],
)
def test_bucket_wait(level: float, amount: int, expected_wait: float) -> None:
    """``wait`` is the time until *amount* units are there (3 per minute)."""
    bucket = TokenBucket(3, MINUTE, now=0.0)
    bucket.level = level
    assert expected_wait == pytest.approx(bucket.wait(amount))


def test_bucket_reports_headers_values() -> None:
    """remaining is floored, used is ceiled, until_full is the time to refill to the limit."""
    bucket = TokenBucket(60, MINUTE, now=0.0)
    bucket.take(2.5)
    assert (57, 3, 2.5) == (bucket.remaining, bucket.used, bucket.until_full())
    bucket.give(100)
    assert (60, 0, 0.0) == (bucket.remaining, bucket.used, bucket.until_full())


def test_bucket_rejects_a_non_positive_limit() -> None:
    """A bucket that could never hold anything is a configuration error."""
    with pytest.raises(ValueError):
        TokenBucket(0, MINUTE, now=0.0)


def _quota() -> Quota:
    return Quota([("requests", MINUTE, 3), ("tokens", MINUTE, 100)], now=0.0)


@pytest.mark.parametrize(
    ("policy", "expected_levels"),
    [
        ("request", (1.0, 90.0)),  # the rejected request still costs one request
        ("full", (1.0, -5.0)),  # ... or everything it asked for, as debt
        ("none", (2.0, 90.0)),
    ],
)
def test_rejected_requests_are_charged_by_policy(
    policy: str, expected_levels: tuple[float, float]
) -> None:
    """A 429 charges per ``charge_rejected``; the admitted request was charged in full."""
    quota = _quota()
    assert quota.admit({"requests": 1, "tokens": 10}, 0.0, "request") is None
    rejection = quota.admit({"requests": 1, "tokens": 95}, 0.0, policy)  # type: ignore[arg-type]
    assert rejection is not None
    assert ("tokens", 100, 10, 95) == (
        rejection.name,
        rejection.limit,
        rejection.used,
        rejection.requested,
    )
    levels = (quota.bucket("requests").level, quota.bucket("tokens").level)  # type: ignore[union-attr]
    assert expected_levels == levels


def test_the_first_short_bucket_is_reported_and_retry_after_covers_all() -> None:
    """Requests are checked before tokens; retry-after waits for every bucket."""
    quota = _quota()
    for _ in range(3):
        assert quota.admit({"requests": 1, "tokens": 30}, 0.0, "none") is None
    rejection = quota.admit({"requests": 1, "tokens": 40}, 0.0, "none")
    assert rejection is not None
    assert "requests" == rejection.name
    # requests: 1 missing at 3/min = 20 s; tokens: 30 missing at 100/min = 18 s
    assert 20.0 == pytest.approx(rejection.retry_after)


def test_retry_after_counts_the_rejection_charge() -> None:
    """Under the default policy the rejected request's own charge is waited out too."""
    quota = _quota()
    for _ in range(3):
        assert quota.admit({"requests": 1, "tokens": 1}, 0.0, "request") is None
    rejection = quota.admit({"requests": 1, "tokens": 1}, 0.0, "request")
    assert rejection is not None
    assert 40.0 == pytest.approx(rejection.retry_after)
    assert quota.admit({"requests": 1, "tokens": 1}, 39.9, "none") is not None
    assert quota.admit({"requests": 1, "tokens": 1}, 40.0, "none") is None


def test_a_request_larger_than_the_capacity_is_too_large() -> None:
    """Tokens beyond the whole bucket can never pass, even when requests ran out first."""
    quota = _quota()
    for _ in range(3):
        quota.admit({"requests": 1, "tokens": 1}, 0.0, "none")
    rejection = quota.admit({"requests": 1, "tokens": 101}, 0.0, "none")
    assert rejection is not None
    assert ("tokens", True) == (rejection.name, rejection.too_large)


@pytest.mark.parametrize(("delta", "expected"), [(5, 95.0), (-5, 85.0), (50, 100.0)])
def test_settle_refunds_or_charges(delta: int, expected: float) -> None:
    """``settle`` corrects a per-minute bucket after the fact, never above its limit."""
    quota = _quota()
    quota.admit({"requests": 1, "tokens": 10}, 0.0, "none")
    quota.settle("tokens", delta)
    assert expected == quota.bucket("tokens").level  # type: ignore[union-attr]


# -- quantized limits: a per-minute limit enforced over a shorter bucket ---------------------


def _short_quota(**limits: int) -> Quota:
    """Per-minute buckets holding 6 s of their limit; per-day ones are unchanged."""
    specs = [(name, MINUTE, limit) for name, limit in limits.items()]
    return Quota(specs, now=0.0, bucket_seconds=6)


def test_a_6_second_bucket_admits_a_tenth_of_the_rpm_at_once() -> None:
    """RPM 10,000 over a 6 s bucket: exactly 1,000 pass at once, the next one is refused."""
    quota = _short_quota(requests=10_000)
    for _ in range(1000):
        assert quota.admit({"requests": 1}, 0.0, "none") is None
    rejection = quota.admit({"requests": 1}, 0.0, "none")
    assert rejection is not None
    # Limit - Used is what the bucket has left (0), as the remaining header says
    assert ("requests", 10_000, 10_000, 1) == (
        rejection.name,
        rejection.limit,
        rejection.used,
        rejection.requested,
    )
    assert 0.006 == pytest.approx(rejection.retry_after)  # one request at 10,000/60 per s


def test_a_6_second_bucket_refills_at_the_per_minute_rate() -> None:
    """After the burst it refills at 10,000/60 = 166.67 requests/s, never beyond 1,000."""
    quota = _short_quota(requests=10_000)
    bucket = quota.bucket("requests")
    assert bucket is not None
    for _ in range(1000):
        quota.admit({"requests": 1}, 0.0, "none")
    admitted = 0
    while quota.admit({"requests": 1}, 1.0, "none") is None:
        admitted += 1
    assert 166 == admitted  # 166.67 dripped in during 1 s
    assert 0.67 == pytest.approx(bucket.level, abs=0.01)
    assert (1000 - 2 / 3) * 0.006 == pytest.approx(bucket.until_full())  # 6 s less 0.67 req
    bucket.refill(3600.0)
    assert (1000.0, 1000) == (bucket.level, bucket.remaining)


@pytest.mark.parametrize(
    ("limit", "bucket_seconds", "expected_capacity"),
    [
        (10_000, 6, 1000.0),
        (1_000_000, 6, 100_000.0),
        (10_000, 60, 10_000.0),
        (10_000, 0.5, 10_000 / 120),
        (60, 1, 1.0),
        (5, 6, 1.0),  # half a request: at least one
        (3, 0.1, 1.0),
    ],
)
def test_bucket_seconds_sets_the_capacity_of_per_minute_buckets(
    limit: int, bucket_seconds: float, expected_capacity: float
) -> None:
    """A per-minute bucket holds ``limit x bucket_seconds / 60`` units, at least one."""
    quota = Quota([("tokens", MINUTE, limit)], now=0.0, bucket_seconds=bucket_seconds)
    bucket = quota.bucket("tokens")
    assert bucket is not None
    # it starts full
    assert pytest.approx((expected_capacity, expected_capacity, limit)) == (
        bucket.capacity,
        bucket.level,
        bucket.limit,
    )


def test_per_day_buckets_ignore_bucket_seconds() -> None:
    """RPD/TPD keep a whole day's worth."""
    quota = Quota([("requests", MINUTE, 600), ("requests", DAY, 1000)], 0.0, bucket_seconds=6)
    minute, day = quota.bucket("requests"), quota.bucket("requests", DAY)
    assert minute is not None
    assert day is not None
    assert (60.0, 1000.0) == (minute.capacity, day.capacity)


def test_without_bucket_seconds_a_bucket_holds_its_whole_limit() -> None:
    """``bucket_seconds=None`` (and 60) is a whole minute's bucket, as before."""
    for bucket_seconds in (None, 60):
        quota = Quota([("requests", MINUTE, 3)], 0.0, bucket_seconds=bucket_seconds)
        for _ in range(3):
            assert quota.admit({"requests": 1}, 0.0, "request") is None
        rejection = quota.admit({"requests": 1}, 0.0, "request")
        assert rejection is not None
        assert (3, 3, 40.0) == (rejection.limit, rejection.used, rejection.retry_after)
        assert "<TokenBucket -1.000/3 per 60s>" == repr(quota.bucket("requests"))


def test_tokens_in_a_short_bucket() -> None:
    """TPM 100,000 over 6 s holds 10,000 tokens; Used is the limit minus what is left."""
    quota = _short_quota(requests=10_000, tokens=100_000)
    assert quota.admit({"requests": 1, "tokens": 6000}, 0.0, "request") is None
    rejection = quota.admit({"requests": 1, "tokens": 6000}, 0.0, "request")
    assert rejection is not None
    assert ("tokens", 100_000, 96_000, 6000) == (
        rejection.name,
        rejection.limit,
        rejection.used,
        rejection.requested,
    )
    # 2,000 tokens missing at 100,000/60 per second
    assert 1.2 == pytest.approx(rejection.retry_after)


def test_a_cost_beyond_the_short_bucket_needs_it_full_and_leaves_debt() -> None:
    """25,000 tokens (within TPM 100,000, beyond its 10,000 bucket) pass only when the bucket
    is full, and the debt makes the next request wait for 25,000 tokens' worth of time."""
    quota = _short_quota(tokens=100_000)
    bucket = quota.bucket("tokens")
    assert bucket is not None
    assert quota.admit({"tokens": 1}, 0.0, "none") is None  # no longer full
    rejection = quota.admit({"tokens": 25_000}, 0.0, "none")
    assert rejection is not None
    assert not rejection.too_large
    assert 0.0006 == pytest.approx(rejection.retry_after)
    assert quota.admit({"tokens": 25_000}, 0.0006, "none") is None
    assert pytest.approx((-15_000.0, 0)) == (bucket.level, bucket.remaining)
    assert 15.0 == pytest.approx(bucket.until_full())  # 25,000 tokens at 100,000/min
    assert 15_001 * 0.0006 == pytest.approx(bucket.wait(1))
    too_large = quota.admit({"tokens": 100_001}, 100.0, "none")
    assert too_large is not None
    assert too_large.too_large


def test_short_bucket_repr_and_validation() -> None:
    """The repr says what a smaller bucket holds; a capacity outside [1, limit] is refused."""
    bucket = TokenBucket(10_000, MINUTE, now=0.0, capacity=1000)
    assert "<TokenBucket 1000.000/10000 per 60s holding 1000>" == repr(bucket)
    for capacity in (0.5, 10_001):
        with pytest.raises(ValueError, match="capacity"):
            TokenBucket(10_000, MINUTE, now=0.0, capacity=capacity)
