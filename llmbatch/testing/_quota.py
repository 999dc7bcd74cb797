"""The rate-limit buckets of one (API key, model) pair, and the admission rule.

A request is admitted only if *every* bucket holds its cost; then every bucket is
charged at once. Otherwise nothing is admitted and the rejection reports the first
bucket that fell short (requests before tokens, per-minute before per-day), except that
a cost larger than a bucket's whole capacity wins: that request can never pass.

What a rejected request still costs is the ``charge_rejected`` policy:

* ``"request"`` (default, as OpenAI documents: "unsuccessful requests contribute to your
  per-minute limit"): one unit from each request bucket, none from the token buckets;
* ``"full"``: its whole cost, from every bucket;
* ``"none"``: nothing.

A charge can push a bucket below zero; that debt refills before anything else passes.
The ``retry_after`` of a rejection is computed *after* that charge: the time until
the same request would be admitted if nothing else arrived.
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
        limit: its capacity.
        used: units in use before this request (capacity minus level).
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
        """Whether the request exceeds the bucket's whole capacity."""
        return math.isinf(self.retry_after)


class Quota:
    """The buckets for one (API key, model) pair.

    Args:
        limits: ``(name, period, limit)`` triples in the order rejections are checked.
        now: the clock reading at creation; buckets start full.
    """

    __slots__ = ("_buckets",)

    def __init__(self, limits: Sequence[tuple[str, float, int]], now: float) -> None:
        self._buckets = [(name, TokenBucket(limit, period, now)) for name, period, limit in limits]

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={bucket!r}" for name, bucket in self._buckets)
        return f"<Quota {inner}>"

    def bucket(self, name: str, period: float = MINUTE) -> TokenBucket | None:
        """The bucket called *name* with *period*, if this quota has one."""
        for bucket_name, bucket in self._buckets:
            if bucket_name == name and bucket.period == period:
                return bucket
        return None

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
