"""The permit the bucket limiters issue (in-process and Redis), with what header feedback
needs to know about it: what the bucket had left right after it was taken, what was in
flight then, what was taken and corrected up to it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from llmbatch.limits._config import DIMENSIONS, Limits, refunds
from llmbatch.limits._contract import Permit


class PermitIssuer(Protocol):
    """What a :class:`BucketPermit` calls back: the limiter that issued it."""

    limits: Limits

    def _release(self, permit: BucketPermit) -> None: ...

    def _settle(self, permit: BucketPermit, actual: Mapping[str, float], refund: bool) -> None: ...


class BucketPermit(Permit):
    """What one :meth:`RateLimiter.acquire <llmbatch.limits.RateLimiter.acquire>` (or a
    Redis limiter's) took; settle it with the actual usage.

    Use it as an async context manager (or call :meth:`release`) to give the
    concurrency slot back when the request is over.
    """

    __slots__ = (
        "_limiter",
        "_released",
        "_settled",
        "acquired_at",
        "adjusted_at",
        "admitted_by",
        "available_after",
        "cost",
        "outstanding_before",
        "refunded_at",
        "released_after",
        "seq",
        "taken_at",
        "units",
    )

    def __init__(
        self,
        limiter: PermitIssuer,
        cost: dict[str, float],
        available_after: dict[str, float],
        adjusted_at: dict[str, float],
        outstanding_before: dict[str, float] | None = None,
        taken_at: dict[str, float] | None = None,
        units: dict[str, float] | None = None,
        acquired_at: float | None = None,
    ) -> None:
        self._limiter = limiter
        self.cost = cost
        #: what each bucket had left right after this permit was taken
        self.available_after = available_after
        #: the limiter's cumulative header corrections at that moment
        self.adjusted_at = adjusted_at
        #: what earlier permits, still unreleased, had taken then (they may reach the
        #: server after this one, so its headers may not count them yet)
        self.outstanding_before = outstanding_before or {}
        #: the limiter's cumulative takings, this permit included
        self.taken_at = taken_at or {}
        #: what the request asked for, by unit (requests, tokens...), bucket or not
        self.units = units or {}
        #: the event loop's time when the permit was taken
        self.acquired_at = acquired_at
        #: the issuing limiter's take counter for this permit (``None``: not tracked)
        self.seq: int | None = None
        #: the limiter's cumulative refunds (settled unused reservations) at that moment
        self.refunded_at: dict[str, float] = {}
        #: the take counter when the permit was released (``None``: not yet)
        self.released_after: int | None = None
        #: a loop time by which the request had certainly reached the server, if it did:
        #: known once its response (or failure) is back
        self.admitted_by: float | None = None
        self._released = False
        self._settled = False

    def __repr__(self) -> str:
        return f"<Permit {self.cost} released={self._released} settled={self._settled}>"

    def settle(
        self,
        *,
        tokens: float | None = None,
        input_tokens: float | None = None,
        output_tokens: float | None = None,
        refund: bool | None = None,
    ) -> None:
        """Record the actual usage: charge what was under-reserved, refund the rest if
        the rule allows (``refund``: the provider's rule, used unless
        ``Limits.refund_unused`` says otherwise)."""
        if self._settled:
            return
        self._settled = True
        actual = {"tokens": tokens, "input_tokens": input_tokens, "output_tokens": output_tokens}
        used = {k: float(v) for k, v in actual.items() if v is not None}
        self._limiter._settle(self, used, refunds(self._limiter.limits, refund))

    @property
    def released(self) -> bool:
        """Whether :meth:`release` was called."""
        return self._released

    def release(self) -> None:
        """Give the concurrency slot back (idempotent)."""
        if not self._released:
            self._released = True
            self._limiter._release(self)


def plausible_limit(dimension: str, limit: float, permit: BucketPermit | None = None) -> bool:
    """Whether a limit a server reports may be adopted (headers are hints).

    Values of 0 and 1 are the odd ones providers are known to send now and then; and a
    server that has just admitted a request cannot have a limit below that request's
    own cost. Either would make every later request wait or fail for nothing.
    """
    if limit <= 1:
        return False
    if permit is not None:
        unit = DIMENSIONS[dimension][0]
        if limit < permit.units.get(unit, 0.0):
            return False
    return True


def send_lag(permit: BucketPermit, processing: float | None, now: float) -> float:
    """Seconds between taking *permit* and the server admitting its request (an upper
    bound): the time to the response minus the server's own *processing* time
    (``RateLimitHeaders.processing``), or the whole time to the response when unknown."""
    if permit.acquired_at is None:
        return 0.0
    elapsed = max(0.0, now - permit.acquired_at)
    return elapsed if processing is None else max(0.0, elapsed - processing)
