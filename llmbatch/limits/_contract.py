"""The limiter contract: what every limiter (in-process, Redis, a Ray actor) offers.

:class:`~llmbatch.client.LLMClient` is typed against :class:`Limiter` alone, and one
contract test suite (``tests/limits/test_contract.py``) runs against every
implementation. The contract, in one place:

* ``await limiter.acquire(requests=1, tokens=0, *, input_tokens=0, output_tokens=0)``
  waits until the request fits every limit, takes it all at once and returns a
  :class:`Permit`; a request that can never fit raises
  :class:`~llmbatch.errors.RequestTooLarge` at once; a waiter that is cancelled takes
  nothing.
* Every piece of feedback to the limiter is a coroutine: ``observe(headers, permit)``
  (a response's rate-limit headers), ``on_rate_limited(retry_after, dimension=...)`` (a
  429: every sharer of the quota pauses). When it returns, the quota has taken it in,
  wherever the quota is kept, so the next ``acquire`` sees it. A failure (the store of
  a shared quota gone) raises; the client logs it and keeps the answer.
* ``permit.release()`` gives the concurrency slot back and ``permit.settle(...)``
  records the actual usage. Both are plain calls: they are bookkeeping on a permit the
  caller holds, they must work in a ``finally`` block and from synchronous code, and a
  limiter that keeps its quota elsewhere queues them (Redis: background updates that
  :meth:`Limiter.aclose` waits for; Ray: calls to the actor that nobody waits for)
  rather than make the caller wait for a round trip after every answer.
* ``statistics()`` is a :class:`LimiterStatistics` snapshot; ``async with limiter:``
  acquires one request and releases it on exit; ``await limiter.check()`` fails early
  (:class:`~llmbatch.errors.LimiterUnavailable`) when the quota's store cannot be used;
  ``await limiter.aclose()`` finishes pending updates and closes what the limiter opened.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

from llmbatch.limits._headers import RateLimitHeaders


@runtime_checkable
class Permit(Protocol):
    """What one :meth:`Limiter.acquire` took. Release it when the request is over (or
    use it as an async context manager), and settle it with the actual usage."""

    __slots__ = ()

    def release(self) -> None:
        """Give the concurrency slot back (idempotent)."""
        ...

    def settle(
        self,
        *,
        tokens: float | None = None,
        input_tokens: float | None = None,
        output_tokens: float | None = None,
        refund: bool | None = None,
    ) -> None:
        """Record the actual usage: charge what was under-reserved, and refund the rest
        if the rule allows (``refund``: the provider's rule, used unless
        ``Limits.refund_unused`` says otherwise). Settling twice changes nothing."""
        ...

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


@dataclass(frozen=True, slots=True)
class LimiterStatistics:
    """A snapshot of a limiter (see :meth:`Limiter.statistics`)."""

    acquired: int
    waiting: int
    in_flight: int
    concurrency_cap: float | None
    waited_seconds: float
    max_wait_seconds: float
    rate_limited: int
    cooldown_remaining: float
    header_corrections: int
    learned: tuple[str, ...]
    available: dict[str, float]
    capacity: dict[str, float]
    #: units per minute others are seen to spend of each dimension (the headers show it)
    others: dict[str, float] = field(default_factory=dict)
    #: the limit of each dimension, per its period (``capacity`` is what a bucket holds
    #: at once: less when the server enforces the limit over a shorter period)
    limits: dict[str, float] = field(default_factory=dict)


#: the permits ``async with limiter:`` holds in this task, innermost last, with the
#: limiter each came from: nesting (the same limiter or several) releases each its own
_ENTERED: contextvars.ContextVar[tuple[tuple[object, Permit], ...]] = contextvars.ContextVar(
    "llmbatch_entered_permits", default=()
)


@runtime_checkable
class Limiter(Protocol):
    """Enforces one quota: see the module docstring for the contract.

    Implementations may subclass it to inherit ``async with`` and a no-op ``aclose``.
    """

    async def acquire(
        self,
        requests: float = 1,
        tokens: float = 0,
        *,
        input_tokens: float = 0,
        output_tokens: float = 0,
    ) -> Permit:
        """Wait until the request fits every limit, take it all at once, return a permit.

        Raises:
            RequestTooLarge: the request exceeds what a limit can ever hold.
        """
        ...

    async def observe(
        self, headers: Mapping[str, str] | RateLimitHeaders, permit: Permit | None = None
    ) -> None:
        """Correct the quota from a response's rate-limit headers (*permit*: the permit
        of the request answered, which the correction is measured against)."""
        ...

    async def on_rate_limited(
        self, retry_after: float | None = None, *, dimension: str | None = None
    ) -> None:
        """A rate-limit 429 arrived: pause every sharer of the quota for *retry_after*
        seconds (``None``: one second), and restart the bucket of *dimension* (``None``:
        every per-minute one) empty."""
        ...

    def statistics(self) -> LimiterStatistics:
        """A snapshot of counters and levels."""
        ...

    async def check(self) -> None:
        """Make sure the quota can be used before anything is sent (a shared quota's
        store is reachable and accepts us); by default there is nothing to check.

        Raises:
            LimiterUnavailable: it cannot (fatal: no request may go without a permit).
        """
        return

    async def aclose(self) -> None:
        """Finish pending updates and close what the limiter opened (by default:
        nothing to do)."""
        return

    async def __aenter__(self) -> Permit:
        permit = await self.acquire()
        _ENTERED.set((*_ENTERED.get(), (self, permit)))
        return permit

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Release the innermost permit ``async with self`` took in this task.
        entered = _ENTERED.get()
        for i in range(len(entered) - 1, -1, -1):
            if entered[i][0] is self:
                _ENTERED.set(entered[:i] + entered[i + 1 :])
                entered[i][1].release()
                return
