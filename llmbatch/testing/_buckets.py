"""Continuous token buckets and the time formats the providers put in rate-limit headers.

A :class:`TokenBucket` refills at ``limit / period`` units per second, continuously, the
way OpenAI and Anthropic describe their limits, and holds up to ``capacity`` units: the
whole ``limit`` by default, or less when a per-minute limit is enforced over a shorter
period (OpenAI: limits "may be quantized", RPM 10,000 enforced as 1,000 per 6 s). It
starts full. Its level may go below zero: a charge that the provider makes anyway (a
rejected request still "contributes to your per-minute limit") becomes debt that refills
first.

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
    """A continuously refilled bucket: ``limit`` units per ``period`` seconds.

    Args:
        limit: the units refilled per ``period`` (what the headers report as the limit).
        period: the limit's period (:data:`MINUTE` or :data:`DAY`).
        now: the clock reading at creation; the bucket starts full.
        capacity: how much the bucket holds; ``None`` is the whole ``limit``. A smaller
            bucket lets a cost larger than it (but within ``limit``) through only when it
            is full, and that cost leaves it in debt: a stream of such requests still
            passes at ``limit`` per ``period``, never faster.
    """

    __slots__ = ("capacity", "level", "limit", "period", "updated")

    def __init__(
        self, limit: int, period: float, now: float, *, capacity: float | None = None
    ) -> None:
        if limit < 1:
            raise ValueError(f"a bucket needs a positive limit, not {limit!r}")
        if capacity is not None and not 1 <= capacity <= limit:
            raise ValueError(f"a bucket's capacity must be within [1, {limit}], not {capacity!r}")
        self.limit = limit
        self.period = period
        self.capacity = float(limit if capacity is None else capacity)
        self.level = self.capacity
        self.updated = now

    def __repr__(self) -> str:
        holds = "" if self.capacity == self.limit else f" holding {self.capacity:g}"
        return f"<TokenBucket {self.level:.3f}/{self.limit} per {self.period:g}s{holds}>"

    def refill(self, now: float) -> None:
        """Add what has dripped in since the last call (never beyond ``capacity``)."""
        elapsed = now - self.updated
        if elapsed > 0:
            # multiply before dividing: 20 s at 3/min is exactly 1.0, not 1.0000000000000002
            self.level = min(self.capacity, self.level + elapsed * self.limit / self.period)
            self.updated = now

    def has(self, amount: float) -> bool:
        """Whether ``amount`` units are available now (call :meth:`refill` first).

        A cost beyond ``capacity`` (and within ``limit``) needs a full bucket.
        """
        return min(amount, self.capacity) <= self.level + _EPSILON

    def take(self, amount: float) -> None:
        """Remove ``amount`` units; the level may go negative (debt)."""
        self.level -= amount

    def give(self, amount: float) -> None:
        """Return ``amount`` units (a refund), never beyond ``capacity``."""
        self.level = min(self.capacity, self.level + amount)

    def wait(self, amount: float) -> float:
        """Seconds until ``amount`` units will be available (``inf`` if never)."""
        if amount > self.limit:
            return math.inf
        missing = min(amount, self.capacity) - self.level
        return 0.0 if missing <= _EPSILON else missing * self.period / self.limit

    def until_full(self) -> float:
        """Seconds until the bucket is full again (what ``x-ratelimit-reset-*`` reports)."""
        return max(0.0, (self.capacity - self.level) * self.period / self.limit)

    @property
    def remaining(self) -> int:
        """Whole units available now (what ``x-ratelimit-remaining-*`` reports)."""
        return max(0, math.floor(self.level + _EPSILON))

    @property
    def used(self) -> int:
        """``limit`` minus the level, in whole units: the "Used" of OpenAI's 429 message.

        For a full-period bucket that is what is in use. A smaller bucket counts the part
        of the limit it cannot hold as used too, so that ``Limit - Used`` is still what it
        has left (the ``remaining`` of the headers) and every rejection still reads
        ``Used + Requested > Limit``: a burst of a few seconds' worth shows "Used" close
        to the limit.
        """
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
