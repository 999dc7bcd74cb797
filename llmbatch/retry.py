"""Retry policies, built from tenacity's own objects.

A :class:`RetryPolicy` is three tenacity callables (``stop``, ``wait``, ``retry``) and a
per-attempt timeout. Compose them with tenacity's operators, as with any tenacity
policy::

    from tenacity import stop_after_attempt, stop_after_delay, wait_exponential_jitter
    policy = RetryPolicy(
        stop=stop_after_attempt(8) | stop_after_delay(600),
        wait=wait_retry_after(wait_exponential_jitter(multiplier=1, max=60)),
    )

llmbatch adds only what is specific to LLM providers:

* :func:`retry_if_transient` retries :class:`~llmbatch.errors.TransientError` (rate
  limits, 5xx/529, timeouts, broken connections) and nothing else: a bad request, a
  revoked key or an exhausted quota is never retried;
* :class:`wait_retry_after` waits what the provider asked for (``retry-after-ms``,
  ``retry-after`` seconds or HTTP date, or the rate-limit reset header, parsed at the
  adapter boundary into ``error.retry_after``), capped, and falls back to another wait
  (exponential backoff with full jitter by default: a random wait between 0 and
  0.5 s x 2^attempt, at most 30 s) when there is no hint;
* :class:`RetryLog`, a ``before_sleep`` hook that logs each retry through structlog and
  counts attempts, retries by error class and time spent waiting.

Provider SDKs are always built with ``max_retries=0``: this is the only retry layer, so
the rate limiter sees every attempt.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)
from tenacity.retry import retry_base
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from llmbatch._log import get_logger
from llmbatch.context import current_item
from llmbatch.errors import RateLimited, Timeout, TransientError

__all__ = [
    "RetryLog",
    "RetryPolicy",
    "RetryStatistics",
    "parse_retry_after",
    "retry_if_transient",
    "stop_if_batch_aborted",
    "timed",
    "wait_retry_after",
]

T = TypeVar("T")
logger = get_logger("llmbatch.retry")


def parse_retry_after(headers: Mapping[str, str], *, now: datetime | None = None) -> float | None:
    """Seconds the server asks to wait, from its headers; ``None`` when it says nothing usable.

    Order, as openai-python reads them: ``retry-after-ms`` (also Azure's
    ``x-ms-retry-after-ms``), then ``retry-after`` as (float) seconds, then as an HTTP
    date. Negative, non-finite or unparsable values are ignored.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    for name in ("retry-after-ms", "x-ms-retry-after-ms"):
        value = lower.get(name)
        if value is not None:
            try:
                ms = float(value)
            except ValueError:
                continue
            if math.isfinite(ms) and ms >= 0:
                return ms / 1000
    value = lower.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def retry_if_transient() -> retry_base:
    """Retry transient errors (rate limits, 5xx/529, timeouts, connections) only."""
    return retry_if_exception_type(TransientError)


class stop_if_batch_aborted(stop_base):  # lower case like tenacity's own stop_* classes
    """Stop once the batch running this item was aborted (a fatal error, fail-fast).

    The runner lets a request already at the provider finish when it aborts a batch
    (see :class:`~llmbatch.runner.ItemContext`); this stops that item from trying
    again if the request failed. Outside a batch it never stops anything.
    """

    def __call__(self, retry_state: RetryCallState) -> bool:
        item = current_item()
        return item is not None and item.stopping

    def __repr__(self) -> str:
        return "stop_if_batch_aborted()"


class wait_retry_after(wait_base):  # lower case like tenacity's own wait_* classes
    """Wait the provider's ``retry_after`` hint (capped at *max_wait*), else *fallback*.

    Args:
        fallback: the wait when the error carries no hint.
        max_wait: the longest hint honoured; a longer one is capped to it.
        ignore_rate_limits: wait 0 on :class:`~llmbatch.errors.RateLimited` (the shared
            limiter's cooldown does the waiting for every worker at once).
    """

    def __init__(
        self,
        fallback: wait_base | None = None,
        *,
        max_wait: float = 120.0,
        ignore_rate_limits: bool = False,
    ) -> None:
        self.fallback = fallback or wait_random_exponential(multiplier=0.5, max=30)
        self.max_wait = max_wait
        self.ignore_rate_limits = ignore_rate_limits

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None and outcome.failed else None
        if self.ignore_rate_limits and isinstance(exc, RateLimited):
            return 0.0
        hint = getattr(exc, "retry_after", None)
        if isinstance(hint, int | float) and math.isfinite(hint) and hint >= 0:
            return min(float(hint), self.max_wait)
        return float(self.fallback(retry_state))

    def __repr__(self) -> str:
        return f"wait_retry_after(fallback={self.fallback!r}, max_wait={self.max_wait!r})"


@dataclass(frozen=True, slots=True)
class RetryStatistics:
    """What a :class:`RetryLog` counted."""

    attempts: int
    retries: dict[str, int]
    waited_seconds: float


@dataclass(slots=True)
class RetryLog:
    """A tenacity ``before_sleep`` hook: logs each retry and counts them.

    One instance can serve many items (counts add up); ``statistics()`` snapshots it.
    """

    retries: Counter[str] = field(default_factory=Counter)
    waited: float = 0.0
    attempts: int = 0

    def __call__(self, retry_state: RetryCallState) -> None:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None and outcome.failed else None
        name = type(exc).__name__
        wait = retry_state.next_action.sleep if retry_state.next_action else 0.0
        self.retries[name] += 1
        self.waited += wait
        item = current_item()
        logger.info(
            "retry.scheduled",
            item_index=item.index if item is not None else None,
            item_key=item.key if item is not None else None,
            attempt=retry_state.attempt_number,
            error=name,
            wait=round(wait, 3),
            message=str(exc)[:200] if exc else None,
        )

    def statistics(self) -> RetryStatistics:
        """A frozen snapshot."""
        return RetryStatistics(self.attempts, dict(self.retries), self.waited)


async def timed(awaitable: Awaitable[T], seconds: float | None, **context: Any) -> T:
    """``await awaitable``, raising :class:`~llmbatch.errors.Timeout` (with *context*:
    provider, model, attempt...) if it takes more than *seconds* (``None``: no limit)."""
    if seconds is None:
        return await awaitable
    try:
        async with asyncio.timeout(seconds):
            return await awaitable
    except TimeoutError as exc:
        raise Timeout(f"no answer within {seconds:g} s", **context) from exc


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """When to retry, how long to wait, when to give up.

    Args:
        stop: a tenacity stop (default: 6 attempts).
        wait: a tenacity wait (default: the provider's hint, else exponential backoff
            0.5 s → 30 s with full jitter).
        retry: a tenacity retry predicate (default: transient errors only).
        attempt_timeout: seconds one attempt may take before it counts as a
            :class:`~llmbatch.errors.Timeout` (``None``: no limit of ours). Under
            :class:`~llmbatch.client.LLMClient` only the provider's answer is timed:
            waiting for the rate limiter is not part of an attempt's time.
    """

    stop: stop_base = field(default_factory=lambda: stop_after_attempt(6))
    wait: wait_base = field(default_factory=wait_retry_after)
    retry: retry_base = field(default_factory=retry_if_transient)
    attempt_timeout: float | None = None

    @classmethod
    def none(cls) -> RetryPolicy:
        """One attempt, no retry."""
        return cls(stop=stop_after_attempt(1))

    @classmethod
    def patient(cls) -> RetryPolicy:
        """For long unattended jobs: up to 20 attempts or an hour, waits up to 5 minutes."""
        return cls(
            stop=stop_after_attempt(20) | stop_after_delay(3600),
            wait=wait_retry_after(wait_random_exponential(multiplier=1, max=300), max_wait=300),
        )

    def copy(self, **changes: Any) -> RetryPolicy:
        """A copy with *changes* applied (policies are values: tweak by copying)."""
        return replace(self, **changes)

    def retrying(
        self,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        before_sleep: Callable[[RetryCallState], None] | None = None,
    ) -> AsyncRetrying:
        """A tenacity ``AsyncRetrying`` for this policy (``sleep`` injectable for tests)."""
        return AsyncRetrying(
            stop=self.stop,
            wait=self.wait,
            retry=self.retry,
            sleep=sleep,
            before_sleep=before_sleep,
            reraise=True,
        )

    async def call(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        log: RetryLog | None = None,
        on_attempt: Callable[[int], None] | None = None,
        time_attempts: bool = True,
    ) -> T:
        """Run ``await fn()`` under this policy; the last error propagates when it gives up.

        Args:
            fn: the attempt (called again for each retry).
            sleep: how to wait between attempts.
            log: a :class:`RetryLog` to log and count retries.
            on_attempt: called with the attempt number (from 1) before each attempt.
            time_attempts: hold each ``fn()`` to ``attempt_timeout``; ``False`` when
                *fn* times the part that counts itself (with :func:`timed`).
        """
        async for attempt in self.retrying(sleep=sleep, before_sleep=log):
            with attempt:
                number = attempt.retry_state.attempt_number
                if log is not None:
                    log.attempts += 1
                if on_attempt is not None:
                    on_attempt(number)
                limit = self.attempt_timeout if time_attempts else None
                return await timed(fn(), limit, attempt=number)
        raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover
