"""The leaky bucket of one quota dimension, on the running event loop's clock.

A bucket of our own rather than ``aiolimiter.AsyncLimiter``: the limiter needs to read
and set the level, take without waiting (into debt, after settling or a 429), give back
a refund, refill more slowly than the server does (what other spenders take), and know
how long until an amount fits. aiolimiter's public surface (``acquire``,
``has_capacity``) offers none of that, and building on its private ``_level``,
``_leak`` and ``_rate_per_sec`` tied us to its internals for the few lines of leak
arithmetic below. The clock is the same: ``loop.time()``, which ``FakeClock.patch_loop``
makes virtual.
"""

from __future__ import annotations

import asyncio

#: at most this share of a bucket's refill is ever left to other spenders
EXTERNAL_CEILING = 0.9


class Bucket:
    """The level is the amount *in use*; capacity frees up continuously at
    :attr:`rate` units per second. The level may exceed :attr:`capacity` (debt from
    settling or a 429).

    Args:
        name: the dimension (``"rpm"``, ``"tpm"``...).
        capacity: what the bucket holds.
        period: the period the limit is stated for (60 s, a day): the bucket refills
            *capacity* per *period*.
        fill: the share of *capacity* available at start.
    """

    __slots__ = ("_last", "_level", "_rate", "burst", "capacity", "name", "nominal_rate", "period")

    def __init__(self, name: str, capacity: float, period: float, fill: float) -> None:
        self.name = name
        self.capacity = capacity
        #: the period the limit is stated for (60 s, a day): the capacity may be less
        #: than a period's worth (:meth:`learn_burst`), the rate stays limit / period
        self.period = period
        #: units the server frees per second
        self.nominal_rate = capacity / period
        #: what the server's bucket is seen to hold at most (``None``: a full period)
        self.burst: float | None = None
        self._rate = self.nominal_rate
        self._level = 0.0
        self._last = 0.0
        self._leak()
        self._level = capacity * (1.0 - fill)

    def __repr__(self) -> str:
        return (
            f"<Bucket {self.name} level={self._level:,.1f}/{self.capacity:,.1f} "
            f"rate={self._rate:g}/s>"
        )

    def _leak(self) -> None:
        """Drip out what was freed since the last update."""
        try:
            now = asyncio.get_running_loop().time()
        except RuntimeError:
            return  # no running loop (a snapshot from outside it): the level as last updated
        if self._level:
            self._level = max(self._level - (now - self._last) * self._rate, 0.0)
        self._last = now

    @property
    def limit(self) -> float:
        """The limit: units the server grants per :attr:`period`."""
        return round(self.nominal_rate * self.period, 6)  # no float noise in the figure

    def _shape(self, rate: float, capacity: float) -> None:
        """Refill at *rate* units per second (less what others spend), hold *capacity*."""
        self._leak()
        external = self.external
        self.capacity = capacity
        self.nominal_rate = rate
        self.set_external(external)

    def learn_burst(self, seen: float) -> bool:
        """The server's bucket holds at least *seen* units: never hold more than the
        most it is seen to hold (when that is less than a period's worth). Whether the
        capacity changed."""
        if self.burst is not None and seen <= self.burst:
            return False
        self.burst = seen
        capacity = min(self.limit, seen)
        if abs(capacity - self.capacity) < 0.5:
            return False
        available = self.available
        self._shape(self.nominal_rate, capacity)
        # What may be taken now stays as it was, within the smaller bucket (what is "in
        # use" of a bigger one says nothing about this one).
        self.set_available(min(available, capacity))
        return True

    @property
    def level(self) -> float:
        """The amount in use now."""
        self._leak()
        return self._level

    @property
    def rate(self) -> float:
        """Units freed per second for this limiter (the server's refill less what others
        are seen to spend)."""
        return self._rate

    @property
    def external(self) -> float:
        """Units per second of the server's refill left to other spenders."""
        return self.nominal_rate - self._rate

    def set_external(self, rate: float) -> None:
        """Leave *rate* units per second of the server's refill to other spenders (at
        most :data:`EXTERNAL_CEILING` of it)."""
        self._leak()
        self._rate = self.nominal_rate - min(rate, EXTERNAL_CEILING * self.nominal_rate)

    @property
    def available(self) -> float:
        """The amount that may be taken now."""
        return self.capacity - self.level

    def time_until(self, amount: float) -> float:
        """Seconds until *amount* fits (0 when it fits now). An amount beyond the
        capacity (a learned burst smaller than the request) fits an empty bucket."""
        missing = self.level + min(amount, self.capacity) - self.capacity
        return 0.0 if missing <= 1e-9 else missing / self._rate

    def take(self, amount: float, *, transit: float = 0.0) -> None:
        """Add *amount* to the level (may go into debt).

        *transit* is how long the request may take to reach the server. Taken from a
        bucket that is (nearly) full, it arrives at a server bucket that is full too and
        gains no refill meanwhile, while this one starts refilling now: so at least
        *transit* seconds of refill count as in use.
        """
        self._leak()
        self._level = max(self._level, self._rate * transit) + amount

    def give_back(self, amount: float) -> None:
        """Remove *amount* from the level (a refund)."""
        self._leak()
        self._level = max(0.0, self._level - amount)

    def set_available(self, amount: float) -> None:
        """Make exactly *amount* available now."""
        self._leak()
        self._level = max(0.0, self.capacity - amount)

    def resize(self, limit: float) -> None:
        """Change the limit (the refill rate, and the capacity with it unless a smaller
        burst was learned), keeping what is in use."""
        capacity = limit if self.burst is None else min(limit, self.burst)
        self._shape(limit / self.period, capacity)
