"""The rate-limit buckets of one (API key, model) pair, and the admission rule.

A request is admitted only if *every* bucket holds its cost; then every bucket is
charged at once. Otherwise nothing is admitted and the rejection reports the first
bucket that fell short (requests before tokens, per-minute before per-day), except that
a cost larger than a bucket's whole limit wins: that request can never pass.

What a rejected request still costs is the ``charge_rejected`` policy:

* ``"request"`` (default, as OpenAI documents: "unsuccessful requests contribute to your
  per-minute limit"): one unit from each request bucket, none from the token buckets;
* ``"full"``: its whole cost, from every bucket;
* ``"none"``: nothing.

A charge can push a bucket below zero; that debt refills before anything else passes.
The ``retry_after`` of a rejection is computed *after* that charge: the time until
the same request would be admitted if nothing else arrived.

With ``bucket_seconds`` set, every per-minute bucket holds only that many seconds' worth
of its limit (at least one unit) and still refills at the per-minute rate: OpenAI's
"quantized" limits. A cost is too large only beyond the per-minute limit; a cost beyond
the smaller bucket but within the limit waits for a full bucket and leaves it in debt.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias

from llmbatch.testing._buckets import MINUTE, TokenBucket

__all__ = ["ChargeRejected", "Quota", "Rejection"]

ChargeRejected: TypeAlias = Literal["request", "full", "none"]


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a request was not admitted.

    Args:
        name: the bucket that fell short: ``"requests"``, ``"tokens"``,
            ``"input_tokens"`` or ``"output_tokens"``.
        period: that bucket's period in seconds (60 or 86400).
        limit: its limit per period (what the message reports, whatever the bucket holds).
        used: the limit minus what the bucket held before this request (see
            :attr:`TokenBucket.used <llmbatch.testing._buckets.TokenBucket.used>`).
        requested: what this request asked of it.
        retry_after: seconds until the request would pass; ``inf`` if it never can.
    """

    name: str
    period: float
    limit: int
    used: int
    requested: int
    retry_after: float

    @property
    def too_large(self) -> bool:
        """Whether the request exceeds the bucket's whole limit (and can never pass)."""
        return math.isinf(self.retry_after)


class Quota:
    """The buckets for one (API key, model) pair.

    Args:
        limits: ``(name, period, limit)`` triples in the order rejections are checked.
        now: the clock reading at creation; buckets start full.
        bucket_seconds: if set, per-minute buckets hold this many seconds' worth of
            their limit (at least 1 unit), refilled at the per-minute rate.
    """

    __slots__ = ("_buckets", "_by_name")

    def __init__(
        self,
        limits: Sequence[tuple[str, float, int]],
        now: float,
        *,
        bucket_seconds: float | None = None,
    ) -> None:
        self._buckets: list[tuple[str, TokenBucket]] = []
        for name, period, limit in limits:
            capacity = _capacity(limit, period, bucket_seconds)
            self._buckets.append((name, TokenBucket(limit, period, now, capacity=capacity)))
        self._by_name = {(name, bucket.period): bucket for name, bucket in self._buckets}

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={bucket!r}" for name, bucket in self._buckets)
        return f"<Quota {inner}>"

    def bucket(self, name: str, period: float = MINUTE) -> TokenBucket | None:
        """The bucket called *name* with *period*, if this quota has one."""
        return self._by_name.get((name, period))

    def admit(
        self, costs: Mapping[str, int], now: float, charge_rejected: ChargeRejected
    ) -> Rejection | None:
        """Charge *costs* (by bucket name) if every bucket holds them, else reject.

        Returns:
            ``None`` when admitted, or the :class:`Rejection`.
        """
        for _, bucket in self._buckets:
            bucket.refill(now)
        shortfall: tuple[str, TokenBucket] | None = None
        for name, bucket in self._buckets:
            cost = costs[name]
            if cost > bucket.limit:
                shortfall = (name, bucket)
                break
            if shortfall is None and not bucket.has(cost):
                shortfall = (name, bucket)
        if shortfall is None:
            for name, bucket in self._buckets:
                bucket.take(costs[name])
            return None
        name, short = shortfall
        used = short.used
        if charge_rejected != "none":
            for bucket_name, bucket in self._buckets:
                if charge_rejected == "full" or bucket_name == "requests":
                    bucket.take(costs[bucket_name])
        retry_after = max(bucket.wait(costs[bucket_name]) for bucket_name, bucket in self._buckets)
        return Rejection(name, short.period, short.limit, used, costs[name], retry_after)

    def settle(self, name: str, delta: int) -> None:
        """Correct the per-minute bucket *name* after the fact.

        Args:
            name: the bucket's name.
            delta: units to give back (positive, a refund) or to take (negative).
        """
        bucket = self.bucket(name)
        if bucket is not None:
            if delta >= 0:
                bucket.give(delta)
            else:
                bucket.take(-delta)


def _capacity(limit: int, period: float, bucket_seconds: float | None) -> float | None:
    """What a bucket holds: ``bucket_seconds`` of a per-minute limit, at least 1 unit."""
    if bucket_seconds is None or period != MINUTE:
        return None
    return min(float(limit), max(1.0, limit * bucket_seconds / MINUTE))
