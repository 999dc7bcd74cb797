"""Continuous token buckets and the time formats the providers put in rate-limit headers.

A :class:`TokenBucket` holds up to ``limit`` units and refills at ``limit / period`` units
per second, continuously, the way OpenAI and Anthropic describe their limits. It starts
full. Its level may go below zero: a charge that the provider makes anyway (a rejected
request still "contributes to your per-minute limit") becomes debt that refills first.

The bucket never reads a clock itself; callers pass ``now`` so that one clock reading
serves every bucket a request touches, and tests can drive time by hand.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

__all__ = ["DAY", "MINUTE", "TokenBucket", "go_duration", "rfc3339_after"]

MINUTE = 60.0
DAY = 86_400.0
#: float slack when comparing levels, so that 3 x (1/3 of a minute) refills exactly 1 unit
_EPSILON = 1e-9


class TokenBucket:
    """A continuously refilled bucket of ``limit`` units per ``period`` seconds.

    Args:
        limit: the capacity, and the number of units refilled per ``period``.
        period: seconds to refill from empty to full (:data:`MINUTE` or :data:`DAY`).
        now: the clock reading at creation; the bucket starts full.
    """

    __slots__ = ("level", "limit", "period", "updated")

    def __init__(self, limit: int, period: float, now: float) -> None:
        if limit < 1:
            raise ValueError(f"a bucket needs a positive limit, not {limit!r}")
        self.limit = limit
        self.period = period
        self.level = float(limit)
        self.updated = now

    def __repr__(self) -> str:
        return f"<TokenBucket {self.level:.3f}/{self.limit} per {self.period:g}s>"

    def refill(self, now: float) -> None:
        """Add what has dripped in since the last call (never beyond ``limit``)."""
        elapsed = now - self.updated
        if elapsed > 0:
            # multiply before dividing: 20 s at 3/min is exactly 1.0, not 1.0000000000000002
            self.level = min(self.limit, self.level + elapsed * self.limit / self.period)
            self.updated = now

    def has(self, amount: float) -> bool:
        """Whether ``amount`` units are available now (call :meth:`refill` first)."""
        return amount <= self.level + _EPSILON

    def take(self, amount: float) -> None:
        """Remove ``amount`` units; the level may go negative (debt)."""
        self.level -= amount

    def give(self, amount: float) -> None:
        """Return ``amount`` units (a refund), never beyond ``limit``."""
        self.level = min(self.limit, self.level + amount)

    def wait(self, amount: float) -> float:
        """Seconds until ``amount`` units will be available (``inf`` if never)."""
        if amount > self.limit:
            return math.inf
        missing = amount - self.level
        return 0.0 if missing <= _EPSILON else missing * self.period / self.limit

    def until_full(self) -> float:
        """Seconds until the bucket is full again (what ``x-ratelimit-reset-*`` reports)."""
        return max(0.0, (self.limit - self.level) * self.period / self.limit)

    @property
    def remaining(self) -> int:
        """Whole units available now (what ``x-ratelimit-remaining-*`` reports)."""
        return max(0, math.floor(self.level + _EPSILON))

    @property
    def used(self) -> int:
        """Whole units in use now (the "Used" in OpenAI's 429 message)."""
        return max(0, math.ceil(self.limit - self.level - _EPSILON))


def go_duration(seconds: float) -> str:
    """Format a duration the way Go's ``time.Duration.String`` does, at millisecond precision.

    OpenAI's ``x-ratelimit-reset-*`` headers use this format. The value is rounded *up*
    to the millisecond, so a client that waits that long is never early.

    >>> go_duration(0.12), go_duration(1), go_duration(90), go_duration(360), go_duration(7.66)
    ('120ms', '1s', '1m30s', '6m0s', '7.66s')
    """
    ms = max(0, math.ceil(seconds * 1000 - _EPSILON))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    whole, fraction = divmod(ms, 1000)
    text = f"{whole}.{fraction:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    if minutes:
        return f"{minutes}m{text}"
    return text


def rfc3339_after(seconds: float, *, now: datetime | None = None) -> str:
    """The UTC time ``seconds`` from *now* as Anthropic's reset headers write it.

    Anthropic sends whole seconds (``2025-08-21T12:40:59Z``); the moment is rounded up.
    """
    moment = (now or datetime.now(UTC)) + timedelta(seconds=max(0.0, seconds))
    if moment.microsecond:
        moment += timedelta(microseconds=1_000_000 - moment.microsecond)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
