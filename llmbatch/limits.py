"""Client-side rate limits: run at a provider's limit without tripping 429s.

A :class:`RateLimiter` enforces one quota (one provider, model and API key) with

* **token buckets** (RPM, TPM, Anthropic's input/output TPM, optional per-day), built on
  ``aiolimiter``'s leaky bucket and therefore on ``loop.time()``;
* a **concurrency gate** (``max_concurrency``), with AIMD when no rate limit is known;
* one :meth:`RateLimiter.acquire` that takes every dimension at once, first come first
  served, so a big request is never starved by small ones and no bucket is held while
  another one refills. A waiter that is cancelled takes nothing;
* **settling**: a :class:`Permit` is settled with the actual usage; the difference is
  refunded or charged where the provider's rule allows (``Limits.refund_unused``);
* **header feedback**: :meth:`RateLimiter.observe` reads ``x-ratelimit-*`` (OpenAI, Go
  durations) and ``anthropic-ratelimit-*`` (RFC 3339) headers. When the server has
  less left than we believe (another process spends the same key) the local bucket is
  drained down to it; ``Limits.auto()`` learns the limits themselves from them;
* a **cooldown** on a rate-limit 429: every worker sharing the quota pauses until the
  retry-after, and the bucket that overflowed restarts empty, so traffic resumes at the
  refill rate instead of in a burst.

A request that can never fit (more tokens than a bucket holds) raises
:class:`RequestTooLarge` at once instead of waiting forever.

:func:`get_limiter` returns the process-wide limiter of a quota, so every node, client
and flow in the event loop that talks to the same (provider, endpoint, key, model)
shares it.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
import hashlib
import math
import re
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, ClassVar, Protocol

from aiolimiter import AsyncLimiter

from llmbatch._log import get_logger
from llmbatch.errors import RequestTooLarge

__all__ = [
    "LimiterStatistics",
    "Limits",
    "Permit",
    "RateLimitHeaders",
    "RateLimiter",
    "RequestTooLarge",
    "get_limiter",
    "key_fingerprint",
    "parse_go_duration",
    "parse_reset",
    "plausible_limit",
    "quota_name",
    "refunds",
    "request_burst",
    "request_rate",
    "send_lag",
]

logger = get_logger("llmbatch.limits")

MINUTE = 60.0
DAY = 86_400.0
#: permits remembered by take counter for header corrections, and how many of them one
#: correction looks back over (older ones in flight count as uncertain in full)
_RECENT = 4096
_SCAN = 1024
#: the concurrency cap AIMD probes upward from while no rate limit is known, and the most
#: it grows to unless ``max_concurrency`` says otherwise
_AIMD_START = 8
_AIMD_CEILING = 64


# -- configuration ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """The limits of one quota. Every field is optional; ``None`` means "not limited".

    Args:
        rpm: requests per minute.
        tpm: tokens per minute (OpenAI: prompt + reserved completion tokens).
        input_tpm: input tokens per minute (Anthropic ITPM).
        output_tpm: output tokens per minute (Anthropic OTPM).
        rpd: requests per day.
        tpd: tokens per day.
        max_concurrency: requests in flight at most (a hard cap; ``None``: in-flight
            requests follow the rate limits, see :class:`~llmbatch.client.LLMClient`).
        initial_fill: share of each bucket available at start. ``None`` (the default)
            is a slow start: at most ``slow_start`` seconds of the limit (and half the
            bucket) go out before the server's first headers say how full its bucket
            really is, which then set the level exactly. A key whose limit is enforced
            over a few seconds (OpenAI: limits "may be quantized") holds only that much
            at once, so a bigger first burst would be answered with 429s; a full-minute
            bucket is used at once all the same, as soon as the first answer shows it.
        slow_start: seconds of the limit the first burst may take (``initial_fill=None``).
        refund_unused: give back reserved tokens a response did not use. ``None`` (the
            default) follows the provider's rule, which the client passes on settling:
            OpenAI keeps its reservation, Anthropic counts the tokens actually used (so
            an unused ``max_tokens`` reservation comes back). ``True``/``False`` force it.
        learn: treat these limits as a starting estimate: the limits the server
            reports in its headers replace them, higher or lower, and missing ones are
            learned (see :meth:`auto`; model profiles are such estimates). ``False``
            (limits given explicitly) never raises them; a lower limit the server
            reports still wins, as pacing above it only earns 429s.
        learn_burst: learn how much the server's bucket holds from the ``remaining``
            it reports, and never burst beyond it (a per-minute limit enforced over
            a few seconds holds a few seconds' worth).
        aimd: adapt the concurrency cap (additive increase, halve on 429) while no rate
            limit is known.
        headroom: fraction of each learned or configured limit to stay under (0.0-0.5):
            lowers the rate itself.
        reserve: fraction of each bucket kept unspent as a cushion (0.0-0.5). Header
            feedback leaves differences with the server smaller than one unit plus this
            fraction uncorrected (rounding, estimates that differ by a few tokens), and
            the cushion absorbs exactly them, so such drift never turns into 429s. The
            long-run rate is unchanged: the cushion costs ``reserve`` times the bucket's
            period once per run (0.15 s on a per-minute limit at the default).
        transit: seconds a request may take to reach the server, connection set-up
            included. A server bucket that is full gains nothing while the first
            requests of a burst are on their way, so a request taken from a (nearly)
            full bucket counts this much refill as in use; the server's headers give
            back what it did not need.
    """

    rpm: float | None = None
    tpm: float | None = None
    input_tpm: float | None = None
    output_tpm: float | None = None
    rpd: float | None = None
    tpd: float | None = None
    max_concurrency: int | None = None
    initial_fill: float | None = None
    slow_start: float = 1.0
    refund_unused: bool | None = None
    learn: bool = False
    learn_burst: bool = True
    aimd: bool = False
    headroom: float = 0.0
    reserve: float = 0.0025
    transit: float = 0.25

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm", "input_tpm", "output_tpm", "rpd", "tpd"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"Limits.{name} must be positive, not {value!r}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"Limits.max_concurrency must be >= 1, not {self.max_concurrency!r}")
        if self.initial_fill is not None and not 0.0 <= self.initial_fill <= 1.0:
            raise ValueError(
                f"Limits.initial_fill must be within [0, 1] or None, not {self.initial_fill!r}"
            )
        if not self.slow_start > 0:
            raise ValueError(f"Limits.slow_start must be positive, not {self.slow_start!r}")
        if not 0.0 <= self.headroom <= 0.5:
            raise ValueError(f"Limits.headroom must be within [0, 0.5], not {self.headroom!r}")
        if not 0.0 <= self.reserve <= 0.5:
            raise ValueError(f"Limits.reserve must be within [0, 0.5], not {self.reserve!r}")
        if not 0.0 <= self.transit <= 60.0:
            raise ValueError(f"Limits.transit must be within [0, 60] s, not {self.transit!r}")

    @classmethod
    def auto(cls, *, max_concurrency: int | None = None, **overrides: Any) -> Limits:
        """Limits learned from the provider's headers, with AIMD until they are known
        (probing from 8 requests in flight up to *max_concurrency*, default 64; once
        limits are known, they pace, and *max_concurrency* stays a cap only if given)."""
        return cls(max_concurrency=max_concurrency, learn=True, aimd=True, **overrides)

    def copy(self, **changes: Any) -> Limits:
        """A copy with *changes* applied."""
        return replace(self, **changes)

    def start_fill(self, limit: float, period: float) -> float:
        """The share of a bucket of *limit* units per *period* seconds available at
        start: ``initial_fill``, or the slow start (``slow_start`` seconds of a
        per-minute limit, at most half the bucket; half of a per-day one, whose
        quota is not enforced over seconds)."""
        if self.initial_fill is not None:
            return self.initial_fill
        if period > MINUTE:
            return 0.5
        return min(0.5, self.slow_start / period)


# -- header parsing --------------------------------------------------------------------

_GO_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|us|µs|ns|m|s)")
_GO_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_go_duration(text: str) -> float | None:
    """Seconds in a Go-style duration (``"6m0s"``, ``"120ms"``, ``"1h2m3.5s"``), else ``None``.

    A bare number is read as seconds. Garbage gives ``None``: headers are hints.
    """
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        return value if math.isfinite(value) and value >= 0 else None
    pos, total = 0, 0.0
    for match in _GO_PART.finditer(text):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _GO_UNITS[match.group(2)]
        pos = match.end()
    return total if pos == len(text) else None


def parse_reset(text: str, *, now: datetime | None = None) -> float | None:
    """Seconds until a reset given as a Go duration (OpenAI) or RFC 3339 time (Anthropic)."""
    seconds = parse_go_duration(text)
    if seconds is not None:
        return seconds
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - (now or datetime.now(UTC))).total_seconds())


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return int(number) if math.isfinite(number) and number >= 0 else None


@dataclass(frozen=True, slots=True)
class RateLimitHeaders:
    """What one response's rate-limit headers say, per dimension.

    ``limits``, ``remaining`` and ``resets`` map a dimension (``"rpm"``, ``"tpm"``,
    ``"input_tpm"``, ``"output_tpm"``) to the limit, the units left and the seconds
    until the bucket is full again; ``processing`` is the server's own handling time in
    seconds (``openai-processing-ms``), when it says.
    """

    limits: dict[str, int] = field(default_factory=dict)
    remaining: dict[str, int] = field(default_factory=dict)
    resets: dict[str, float] = field(default_factory=dict)
    processing: float | None = None

    _NAMES: ClassVar[dict[str, str]] = {
        # OpenAI
        "x-ratelimit-{}-requests": "rpm",
        "x-ratelimit-{}-tokens": "tpm",
        # only when a project-scoped limit applies: the stricter of the two binds
        "x-ratelimit-{}-project-tokens": "tpm",
        # Anthropic
        "anthropic-ratelimit-requests-{}": "rpm",
        "anthropic-ratelimit-input-tokens-{}": "input_tpm",
        "anthropic-ratelimit-output-tokens-{}": "output_tpm",
    }

    @classmethod
    def parse(cls, headers: Mapping[str, str], *, now: datetime | None = None) -> RateLimitHeaders:
        """Read the headers (case-insensitively); missing or garbled values are skipped.

        Where two limits report on one dimension (OpenAI's organization and project
        token limits), the one with less remaining is the one that binds: its limit,
        remaining and reset are kept together.
        """
        lower = {k.lower(): v for k, v in headers.items()}
        limits: dict[str, int] = {}
        remaining: dict[str, int] = {}
        resets: dict[str, float] = {}
        for pattern, dimension in cls._NAMES.items():
            limit = _int(lower.get(pattern.format("limit")))
            left = _int(lower.get(pattern.format("remaining")))
            reset_text = lower.get(pattern.format("reset"))
            reset = None if reset_text is None else parse_reset(reset_text, now=now)
            if limit is None and left is None:
                continue
            if dimension in remaining and (left is None or left >= remaining[dimension]):
                continue  # the limit already read binds sooner
            for found in (limits, remaining, resets):
                found.pop(dimension, None)
            if limit is not None and limit > 0:
                limits[dimension] = limit
            if left is not None:
                remaining[dimension] = left
            if reset is not None:
                resets[dimension] = reset
        ms = _int(lower.get("openai-processing-ms"))
        return cls(limits, remaining, resets, None if ms is None else ms / 1000)

    def __bool__(self) -> bool:
        return bool(self.limits or self.remaining)


# -- buckets ---------------------------------------------------------------------------


class _Bucket(AsyncLimiter):
    """aiolimiter's leaky bucket, plus the level arithmetic a multi-dimension limiter needs.

    The level is the amount *in use*; capacity frees up continuously at ``max_rate`` per
    ``time_period``. The level may exceed ``max_rate`` (debt from settling or a 429).
    """

    __slots__ = ("burst", "name", "period")

    def __init__(self, name: str, max_rate: float, time_period: float, fill: float) -> None:
        super().__init__(max_rate, time_period)
        self.name = name
        #: the period the limit is stated for (60 s, a day): the capacity may be less
        #: than a period's worth (:meth:`learn_burst`), the rate stays limit / period
        self.period = time_period
        #: what the server's bucket is seen to hold at most (``None``: a full period)
        self.burst: float | None = None
        self._leak()
        self._level = max_rate * (1.0 - fill)

    @property
    def limit(self) -> float:
        """The limit: units the server grants per :attr:`period`."""
        return round(self.nominal_rate * self.period, 6)  # no float noise in the figure

    def _shape(self, rate: float, capacity: float) -> None:
        """Refill at *rate* units per second (less what others spend), hold *capacity*."""
        self._leak()
        external = self.external
        self.max_rate = capacity
        self.time_period = capacity / rate
        self.set_external(external)

    def learn_burst(self, seen: float) -> bool:
        """The server's bucket holds at least *seen* units: never hold more than the
        most it is seen to hold (when that is less than a period's worth). Whether the
        capacity changed."""
        if self.burst is not None and seen <= self.burst:
            return False
        self.burst = seen
        capacity = min(self.limit, seen)
        if abs(capacity - self.max_rate) < 0.5:
            return False
        available = self.available
        self._shape(self.nominal_rate, capacity)
        # What may be taken now stays as it was, within the smaller bucket (what is "in
        # use" of a bigger one says nothing about this one).
        self.set_available(min(available, capacity))
        return True

    def _leak(self) -> None:
        try:
            super()._leak()
        except RuntimeError:
            pass  # no running loop (a snapshot from outside it): the level as last updated

    @property
    def level(self) -> float:
        """The amount in use now."""
        self._leak()
        return self._level

    @property
    def rate(self) -> float:
        """Units freed per second for this limiter (the server's refill less what others
        are seen to spend)."""
        return self._rate_per_sec

    @property
    def nominal_rate(self) -> float:
        """Units the server frees per second."""
        return self.max_rate / self.time_period

    @property
    def external(self) -> float:
        """Units per second of the server's refill left to other spenders."""
        return self.nominal_rate - self._rate_per_sec

    def set_external(self, rate: float) -> None:
        """Leave *rate* units per second of the server's refill to other spenders (at
        most ``_EXTERNAL_CEILING`` of it)."""
        self._leak()
        self._rate_per_sec = self.nominal_rate - min(rate, _EXTERNAL_CEILING * self.nominal_rate)

    @property
    def available(self) -> float:
        """The amount that may be taken now."""
        return self.max_rate - self.level

    def time_until(self, amount: float) -> float:
        """Seconds until *amount* fits (0 when it fits now). An amount beyond the
        capacity (a learned burst smaller than the request) fits an empty bucket."""
        missing = self.level + min(amount, self.max_rate) - self.max_rate
        return 0.0 if missing <= 1e-9 else missing / self._rate_per_sec

    def take(self, amount: float, *, transit: float = 0.0) -> None:
        """Add *amount* to the level (may go into debt).

        *transit* is how long the request may take to reach the server. Taken from a
        bucket that is (nearly) full, it arrives at a server bucket that is full too and
        gains no refill meanwhile, while this one starts refilling now: so at least
        *transit* seconds of refill count as in use.
        """
        self._leak()
        self._level = max(self._level, self._rate_per_sec * transit) + amount

    def give_back(self, amount: float) -> None:
        """Remove *amount* from the level (a refund)."""
        self._leak()
        self._level = max(0.0, self._level - amount)

    def set_available(self, amount: float) -> None:
        """Make exactly *amount* available now."""
        self._leak()
        self._level = max(0.0, self.max_rate - amount)

    def resize(self, limit: float) -> None:
        """Change the limit (the refill rate, and the capacity with it unless a smaller
        burst was learned), keeping what is in use."""
        capacity = limit if self.burst is None else min(limit, self.burst)
        self._shape(limit / self.period, capacity)


#: at most this share of a bucket's refill is ever left to other spenders
_EXTERNAL_CEILING = 0.9
#: a first answer showing less than this share of the limit left (with our requests in
#: flight counted back) means a bucket smaller than the period's limit; more may be
#: another spender on a full-period bucket, which is not taken for a small bucket
_BURST_EVIDENCE = 0.5


class _ExternalSpend:
    """What others spend of one quota dimension, measured from the server's own counts.

    Between two of this limiter's requests the server admitted, in all, what its
    ``remaining`` fell by plus what it refilled meanwhile; what this limiter took in
    between is known exactly; the rest is other spenders (another process on the same
    key). The estimate is that rest, less one unit of the server's rounding, over the
    last minute's readings (spans under ``MIN_SPAN`` s are too short to tell send lags
    from spending). Readings from a server
    bucket more than half full are left out: refill beyond a full bucket is lost, and
    would pass for spending.
    """

    __slots__ = ("_readings", "rate")

    WINDOW = 60.0
    MIN_SPAN = 5.0

    def __init__(self) -> None:
        #: (take time, what the server had left after admitting it, cumulative takings)
        self._readings: collections.deque[tuple[float, float, float]] = collections.deque()
        #: the estimate, units per second
        self.rate = 0.0

    def read(self, at: float, server_left: float, taken: float, bucket: _Bucket) -> float:
        """Add a reading and return the estimate (units per second)."""
        if server_left > bucket.max_rate / 2:
            return self.rate
        self._readings.append((at, server_left, taken))
        while self._readings and self._readings[0][0] < at - self.WINDOW:
            self._readings.popleft()
        first_at, first_left, first_taken = self._readings[0]
        span = at - first_at
        if span < self.MIN_SPAN:
            return self.rate
        admitted = first_left - server_left + bucket.nominal_rate * span
        # Servers report whole units left (rounded down): a unit of difference is noise.
        others = admitted - (taken - first_taken) - 1.0
        self.rate = min(max(0.0, others / span), _EXTERNAL_CEILING * bucket.nominal_rate)
        return self.rate


#: the dimensions a 429 of unknown kind is taken to concern: the per-minute ones (a
#: per-day quota is refused with its own message, and emptying it would stall a day)
_MINUTE_DIMENSIONS = ("rpm", "tpm", "input_tpm", "output_tpm")

_DIMENSIONS: dict[str, tuple[str, float]] = {
    # dimension -> (what it charges, period)
    "rpm": ("requests", MINUTE),
    "tpm": ("tokens", MINUTE),
    "input_tpm": ("input_tokens", MINUTE),
    "output_tpm": ("output_tokens", MINUTE),
    "rpd": ("requests", DAY),
    "tpd": ("tokens", DAY),
}


# -- permits and statistics -------------------------------------------------------------


class _PermitIssuer(Protocol):
    limits: Limits

    def _release(self, permit: Permit) -> None: ...

    def _settle(self, permit: Permit, actual: Mapping[str, float], refund: bool) -> None: ...


def refunds(limits: Limits, provider_rule: bool | None) -> bool:
    """Whether the unused part of a reservation comes back on settling:
    ``Limits.refund_unused`` if set, else the provider's rule (``None``: no)."""
    if limits.refund_unused is not None:
        return limits.refund_unused
    return bool(provider_rule)


class Permit:
    """What one :meth:`RateLimiter.acquire` took; settle it with the actual usage.

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
        limiter: _PermitIssuer,
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

    async def __aenter__(self) -> Permit:
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
    """A snapshot of a :class:`RateLimiter`."""

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


def plausible_limit(dimension: str, limit: float, permit: Permit | None = None) -> bool:
    """Whether a limit a server reports may be adopted (headers are hints).

    Values of 0 and 1 are the odd ones providers are known to send now and then; and a
    server that has just admitted a request cannot have a limit below that request's
    own cost. Either would make every later request wait or fail for nothing.
    """
    if limit <= 1:
        return False
    if permit is not None:
        unit = _DIMENSIONS[dimension][0]
        if limit < permit.units.get(unit, 0.0):
            return False
    return True


def request_burst(capacity: Mapping[str, float], mean_cost: Mapping[str, float]) -> float:
    """Requests the per-minute buckets hold at once (:attr:`LimiterStatistics.capacity`)
    for requests costing *mean_cost* per unit; 0 when none is known."""
    bursts: list[float] = []
    for dim, held in capacity.items():
        unit, period = _DIMENSIONS[dim]
        if period > MINUTE:
            continue
        cost = 1.0 if unit == "requests" else mean_cost.get(unit, 0.0)
        if cost > 0:
            bursts.append(held / cost)
    return min(bursts) if bursts else 0.0


def request_rate(limits: Mapping[str, float], mean_cost: Mapping[str, float]) -> float | None:
    """Requests per second the per-minute *limits* allow (``{"rpm": 10_000, "tpm": ...}``,
    as :attr:`LimiterStatistics.limits` gives them) for requests costing *mean_cost*
    per unit (``{"tokens": 900}``), or ``None`` when none binds. Per-day limits are a
    budget, not a pace, and do not count."""
    rates: list[float] = []
    for dim, limit in limits.items():
        unit, period = _DIMENSIONS[dim]
        if period > MINUTE:
            continue
        cost = 1.0 if unit == "requests" else mean_cost.get(unit, 0.0)
        if cost > 0:
            rates.append(limit / period / cost)
    return min(rates) if rates else None


def send_lag(permit: Permit, processing: float | None, now: float) -> float:
    """Seconds between taking *permit* and the server admitting its request (an upper
    bound): the time to the response minus the server's own *processing* time
    (``RateLimitHeaders.processing``), or the whole time to the response when unknown."""
    if permit.acquired_at is None:
        return 0.0
    elapsed = max(0.0, now - permit.acquired_at)
    return elapsed if processing is None else max(0.0, elapsed - processing)


#: the permits ``async with limiter:`` holds in this task, innermost last, with the
#: limiter each came from: nesting (the same limiter or several) releases each its own
_ENTERED: contextvars.ContextVar[tuple[tuple[object, Permit], ...]] = contextvars.ContextVar(
    "llmbatch_entered_permits", default=()
)


def _enter(limiter: object, permit: Permit) -> None:
    """Record that ``async with limiter`` took *permit* in this task."""
    _ENTERED.set((*_ENTERED.get(), (limiter, permit)))


def _exit(limiter: object) -> None:
    """Release the innermost permit ``async with limiter`` took in this task."""
    entered = _ENTERED.get()
    for i in range(len(entered) - 1, -1, -1):
        if entered[i][0] is limiter:
            _ENTERED.set(entered[:i] + entered[i + 1 :])
            entered[i][1].release()
            return


# -- the limiter ------------------------------------------------------------------------


class RateLimiter:
    """Enforces one quota's :class:`Limits`; see the module docstring.

    Build it inside the event loop that uses it (the buckets follow that loop's clock).
    ``async with limiter:`` acquires one request and releases it on exit, so a limiter
    can be passed straight to a parallel node's ``limiter=``.

    Args:
        limits: the limits to enforce.
        name: a label for logs and ``repr`` (e.g. ``"openai/gpt-4o-mini"``).
    """

    def __init__(self, limits: Limits | None = None, *, name: str = "default") -> None:
        self.limits = limits or Limits()
        self.name = name
        self._buckets: dict[str, _Bucket] = {}
        self._adjusted: collections.defaultdict[str, float] = collections.defaultdict(float)
        self._outstanding: collections.defaultdict[str, float] = collections.defaultdict(float)
        self._taken: collections.defaultdict[str, float] = collections.defaultdict(float)
        self._refunded: collections.defaultdict[str, float] = collections.defaultdict(float)
        self._outstanding_units: collections.defaultdict[str, float] = collections.defaultdict(
            float
        )
        for dimension in _DIMENSIONS:
            capacity = getattr(self.limits, dimension)
            if capacity is not None:
                self._add_bucket(dimension, capacity)
        self._cap: float | None = (
            float(self.limits.max_concurrency) if self.limits.max_concurrency else None
        )
        if self.limits.aimd and not self._buckets:
            # probe upward from a modest start
            self._cap = min(self._cap or float(_AIMD_CEILING), _AIMD_START)
        self._in_flight = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._changed: asyncio.Event | None = None
        self._paused_until = 0.0
        self._settle_until = 0.0
        self._synced: set[str] = set()
        self._learned: list[str] = []
        # The last _RECENT permits by take counter: what observe() needs to tell which
        # earlier requests had certainly reached the server before a given one.
        self._seq = 0
        self._recent: dict[int, Permit] = {}
        self._external: dict[str, _ExternalSpend] = {}
        # statistics
        self._acquired = 0
        self._waited = 0.0
        self._max_wait = 0.0
        self._rate_limited = 0
        self._corrections = 0

    def _adjust(self, bucket: _Bucket, delta: float) -> None:
        """Make *delta* more (or, negative, less) available in *bucket*, and remember it."""
        before = bucket.available
        bucket.set_available(min(bucket.max_rate, before + delta))
        self._adjusted[bucket.name] -= bucket.available - before

    def _reshape(self, bucket: _Bucket, change: Callable[[], object]) -> object:
        """Apply *change* (a new limit or capacity) to *bucket*, and count what it made
        available as a correction: an answer to a permit taken before it must not lift
        the bucket again by the same amount."""
        before = bucket.available
        result = change()
        self._adjusted[bucket.name] -= bucket.available - before
        return result

    def _add_bucket(self, dimension: str, capacity: float) -> None:
        _, period = _DIMENSIONS[dimension]
        effective = capacity * (1.0 - self.limits.headroom)
        fill = self.limits.start_fill(effective, period)
        self._buckets[dimension] = _Bucket(dimension, effective, period, fill)

    def __repr__(self) -> str:
        levels = ", ".join(
            f"{name}={b.available:,.0f}/{b.max_rate:,.0f}" for name, b in self._buckets.items()
        )
        cap = "" if self._cap is None else f" cap={self._cap:g}"
        return (
            f"<RateLimiter {self.name} {levels or 'unlimited'} in_flight={self._in_flight}"
            f"{cap} waiters={len(self._waiters)}>"
        )

    # -- acquiring ---------------------------------------------------------------------

    def _cost(
        self, requests: float, tokens: float, input_tokens: float, output_tokens: float
    ) -> dict[str, float]:
        units = {
            "requests": requests,
            "tokens": tokens,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
        }
        cost = {dim: units[unit] for dim, (unit, _) in _DIMENSIONS.items() if dim in self._buckets}
        for dim, amount in cost.items():
            bucket = self._buckets[dim]
            if amount > bucket.limit:
                raise RequestTooLarge(dim, amount, bucket.limit)
        return cost

    def _loop_time(self) -> float:
        return asyncio.get_running_loop().time()

    def _delay(self, cost: Mapping[str, float]) -> float:
        """Seconds until *cost* fits every bucket and the cooldown is over (0: now)."""
        delay = max(0.0, self._paused_until - self._loop_time())
        if self._acquired == 0 and not self._synced and self.limits.initial_fill is None:
            # The very first request goes at once, even beyond a slow start's small
            # fill: nothing is known until the server answers one.
            return delay
        for dim, amount in cost.items():
            bucket = self._buckets[dim]
            cushion = bucket.max_rate * self.limits.reserve
            if amount + cushion > bucket.max_rate:
                cushion = 0.0  # a request this big may use the whole bucket
            delay = max(delay, bucket.time_until(amount + cushion))
        return delay

    def _slot_free(self) -> bool:
        return self._cap is None or self._in_flight < int(self._cap)

    def _take(self, cost: dict[str, float], units: dict[str, float]) -> Permit:
        after: dict[str, float] = {}
        outstanding: dict[str, float] = {}
        for dim, amount in cost.items():
            bucket = self._buckets[dim]
            bucket.take(amount, transit=self.limits.transit)
            after[dim] = bucket.available
            outstanding[dim] = self._outstanding[dim]
            self._outstanding[dim] += amount
            self._taken[dim] += amount
        self._in_flight += 1
        self._acquired += 1
        adjusted = {dim: self._adjusted[dim] for dim in cost}
        taken = {dim: self._taken[dim] for dim in cost}
        for unit, amount in units.items():
            self._outstanding_units[unit] += amount
        permit = Permit(self, cost, after, adjusted, outstanding, taken, units, self._loop_time())
        permit.refunded_at = {dim: self._refunded[dim] for dim in cost}
        self._seq += 1
        permit.seq = self._seq
        self._recent[self._seq] = permit
        self._recent.pop(self._seq - _RECENT, None)
        return permit

    async def acquire(
        self,
        requests: float = 1,
        tokens: float = 0,
        *,
        input_tokens: float = 0,
        output_tokens: float = 0,
    ) -> Permit:
        """Wait until the request fits every limit, take it all at once, return a permit.

        Waiters are served in arrival order.

        Raises:
            RequestTooLarge: the request exceeds a bucket's capacity.
        """
        cost = self._cost(requests, tokens, input_tokens, output_tokens)
        units = {
            "requests": float(requests),
            "tokens": float(tokens),
            "input_tokens": float(input_tokens),
            "output_tokens": float(output_tokens),
        }
        if not self._waiters and self._slot_free() and self._delay(cost) == 0.0:
            return self._take(cost, units)  # fast path: no suspension
        loop = asyncio.get_running_loop()
        started = loop.time()
        turn: asyncio.Future[None] = loop.create_future()
        self._waiters.append(turn)
        if len(self._waiters) == 1:
            turn.set_result(None)
        try:
            await turn  # wait to be at the head of the line
            while True:
                # Recomputed each time: limits may have been learned while we waited.
                cost = self._cost(requests, tokens, input_tokens, output_tokens)
                delay = self._delay(cost)
                if delay == 0.0 and self._slot_free():
                    break
                await self._wait_for_change(None if delay == 0.0 else delay)
        finally:
            self._waiters.remove(turn)
            if self._waiters and not self._waiters[0].done():
                self._waiters[0].set_result(None)  # next in line
        waited = loop.time() - started
        self._waited += waited
        self._max_wait = max(self._max_wait, waited)
        if waited > 1.0:
            logger.debug("limits.waited", limiter=self.name, seconds=round(waited, 3))
        return self._take(cost, units)

    async def _wait_for_change(self, seconds: float | None) -> None:
        if self._changed is None:
            self._changed = asyncio.Event()
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), seconds)
        except TimeoutError:
            pass

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    def _release(self, permit: Permit) -> None:
        permit.released_after = self._seq
        if permit.admitted_by is None:
            # Its answer (or failure) is back: if it reached the server, it did by now.
            permit.admitted_by = self._loop_time()
        self._in_flight -= 1
        for dim, amount in permit.cost.items():
            self._outstanding[dim] = max(0.0, self._outstanding[dim] - amount)
        for unit, amount in permit.units.items():
            self._outstanding_units[unit] = max(0.0, self._outstanding_units[unit] - amount)
        self._notify()

    def _settle(self, permit: Permit, actual: Mapping[str, float], refund: bool) -> None:
        for dim, reserved in permit.cost.items():
            unit, _ = _DIMENSIONS[dim]
            if unit not in actual:
                continue
            difference = actual[unit] - reserved
            bucket = self._buckets[dim]
            if difference > 0:
                bucket.take(difference)
            elif difference < 0 and refund:
                before = bucket.available
                bucket.give_back(-difference)
                self._refunded[dim] += bucket.available - before
        if self.limits.aimd and self._cap is not None and not self._buckets:
            ceiling = float(self.limits.max_concurrency or _AIMD_CEILING)
            self._cap = min(ceiling, self._cap + 1.0 / self._cap)
        self._notify()

    async def __aenter__(self) -> Permit:
        permit = await self.acquire()
        _enter(self, permit)
        return permit

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _exit(self)

    # -- feedback ----------------------------------------------------------------------

    def observe(
        self, headers: Mapping[str, str] | RateLimitHeaders, permit: Permit | None = None
    ) -> None:
        """Correct the buckets from a response's rate-limit headers.

        The server's ``remaining`` right after admitting *permit*'s request is compared
        with what this limiter had left right after taking *permit*. Less on the server
        (someone else spends the same quota, or it counts tokens differently) drains the
        bucket; more (a conservative start, an over-estimated charge) lifts it, but only
        by what is certain: permits taken earlier and still in flight may not have
        reached the server yet, so their cost is not counted as free; likewise a drain
        ignores what permits taken later may already have spent there. Each difference
        is corrected once, however many responses report it. With ``Limits.learn`` a limit
        the server reports is adopted or updated.
        """
        info = headers if isinstance(headers, RateLimitHeaders) else RateLimitHeaders.parse(headers)
        lag = 0.0 if permit is None else send_lag(permit, info.processing, self._loop_time())
        if permit is not None and permit.acquired_at is not None:
            # The server admitted this request at most its send lag after the permit.
            by = permit.acquired_at + lag
            permit.admitted_by = by if permit.admitted_by is None else min(permit.admitted_by, by)
        if not info:
            return
        if self.limits.learn and info.limits and not self._synced:
            self._drop_unreported(info)
        for dim, limit in info.limits.items():
            bucket = self._buckets.get(dim)
            if bucket is None and not self.limits.learn:
                continue
            effective = limit * (1.0 - self.limits.headroom)
            if bucket is not None and (
                abs(bucket.limit - effective) <= 0.5
                or (effective > bucket.limit and not self.limits.learn)
            ):
                continue  # the same; or higher than a limit given explicitly
            if not plausible_limit(dim, limit, permit):
                logger.debug("limits.implausible", limiter=self.name, dimension=dim, limit=limit)
                continue
            if bucket is None:
                self._add_bucket(dim, limit)
                self._learned.append(dim)
                logger.info("limits.learned", limiter=self.name, dimension=dim, limit=limit)
                if self.limits.aimd:
                    # The buckets pace from now on: the probing cap has done its job.
                    self._cap = float(self.limits.max_concurrency or 0) or None
            else:
                logger.info(
                    "limits.adopted",
                    limiter=self.name,
                    dimension=dim,
                    limit=limit,
                    was=round(bucket.limit / (1.0 - self.limits.headroom)),
                    detail="the limit the server reports for this key replaces the one "
                    + ("configured" if self.limits.learn else "given"),
                )
                self._reshape(bucket, functools.partial(bucket.resize, effective))
        for dim, server_left in info.remaining.items():
            bucket = self._buckets.get(dim)
            if bucket is None:
                continue
            if self.limits.learn_burst:
                self._learn_burst(bucket, dim, server_left, permit)
            if permit is not None and dim in permit.available_after:
                # What the server has left right after admitting this request, against
                # what we believed right after taking its permit, net of the corrections
                # applied since (so one deficit is never corrected twice).
                already = self._adjusted[dim] - permit.adjusted_at[dim]
                delta = server_left - permit.available_after[dim] + already
                if delta > 0:
                    # Earlier permits still in flight may reach the server after this
                    # one: its count may not include them yet. And the server refilled
                    # between our acquire and its admission, as our bucket did since:
                    # that refill must not count twice. Never lift by more than what is
                    # certain.
                    refill = bucket.nominal_rate * lag
                    # Refunds credited here since the permit may have reached the server
                    # before its request did: they are in its count and in our bucket.
                    refunds = self._refunded[dim] - permit.refunded_at.get(dim, 0.0)
                    uncertain = self._uncertain_before(permit, dim) + refill + refunds
                    delta = max(0.0, delta - uncertain)
                else:
                    # Later permits may have reached the server before this one: its
                    # count may include them already. Drain only what they cannot explain.
                    since = self._taken[dim] - permit.taken_at.get(dim, self._taken[dim])
                    delta = min(0.0, delta + since)
            else:
                # No permit to compare with (or the bucket was learned after it was
                # taken): compare with now, counting every request in flight as not yet
                # seen by the server when lifting.
                delta = server_left - bucket.available
                if delta > 0:
                    unit = _DIMENSIONS[dim][0]
                    others = self._outstanding_units[unit]
                    if permit is not None and not permit.released:
                        others -= permit.units.get(unit, 0.0)  # its own request was counted
                    delta = max(0.0, delta - others)
                if dim in self._synced:
                    delta = min(delta, 0.0)  # without a permit, only ever drain
            if delta > 0 and self._loop_time() < self._settle_until:
                delta = 0.0  # after a 429, trust the cooldown over older headers
            # Lifts are already bounded by what is certain: any whole unit counts. Drains
            # allow for the server's rounding (one unit) and for what the cushion absorbs.
            tolerance = 0.5 if delta > 0 else 1.0 + bucket.max_rate * self.limits.reserve
            first = dim not in self._synced
            self._synced.add(dim)
            if first or abs(delta) > tolerance:
                self._adjust(bucket, delta)
                self._corrections += 1
                logger.debug(
                    "limits.corrected", limiter=self.name, dimension=dim, delta=round(delta, 1)
                )
            if permit is not None and permit.acquired_at is not None and dim in permit.taken_at:
                self._estimate_external(bucket, permit, server_left)
        self._notify()

    def _drop_unreported(self, info: RateLimitHeaders) -> None:
        """The first headers of a server that reports its limits: a per-minute limit of
        the estimate (a profile) that it does not report is not one it enforces (an
        OpenAI-compatible server without a token limit), so it no longer paces."""
        for dim in [d for d in self._buckets if d in _MINUTE_DIMENSIONS]:
            if dim not in info.limits and dim not in info.remaining:
                del self._buckets[dim]
                logger.info(
                    "limits.dropped",
                    limiter=self.name,
                    dimension=dim,
                    detail="the server reports its limits but not this one: not paced",
                )

    def _learn_burst(
        self, bucket: _Bucket, dim: str, server_left: float, permit: Permit | None
    ) -> None:
        """How much the server's bucket holds, from its ``remaining``: at least one more
        than it ever reported left. The first answer (after a slow start, the server's
        bucket is as full as it will be) tells: when even that plus everything that may
        have reached the server since (our requests in flight) is well short of the
        limit, the limit is enforced over a shorter period, so hold no more than that.
        Later answers only ever raise it (the server showed more left); a low
        ``remaining`` later on is spending, not a smaller bucket."""
        seen = server_left + 1.0
        if bucket.burst is None and dim in self._synced:
            return  # not judged at the first answer: a full period's bucket
        if bucket.burst is not None and seen <= bucket.burst:
            return
        unit = _DIMENSIONS[dim][0]
        in_flight = self._outstanding_units[unit]
        if permit is not None and not permit.released:
            in_flight -= permit.units.get(unit, 0.0)
        if bucket.burst is None and seen + max(0.0, in_flight) >= _BURST_EVIDENCE * bucket.limit:
            return  # a full period's bucket, as far as can be told
        if self._reshape(bucket, lambda: bucket.learn_burst(seen)):
            logger.info(
                "limits.burst",
                limiter=self.name,
                dimension=dim,
                holds=round(bucket.max_rate),
                limit=round(bucket.limit),
                detail="the server's bucket holds less than a minute of the limit: "
                "bursts are kept within it",
            )

    def _estimate_external(self, bucket: _Bucket, permit: Permit, server_left: float) -> None:
        """Update what others are seen to spend of *bucket*'s quota, and leave it to them."""
        assert permit.acquired_at is not None
        spend = self._external.setdefault(bucket.name, _ExternalSpend())
        before = bucket.external
        rate = spend.read(permit.acquired_at, server_left, permit.taken_at[bucket.name], bucket)
        if abs(rate - before) > 1e-9:
            bucket.set_external(rate)
            if (rate == 0.0) != (before == 0.0):
                logger.info(
                    "limits.shared",
                    limiter=self.name,
                    dimension=bucket.name,
                    others_per_minute=round(rate * 60, 1),
                )

    def _uncertain_before(self, permit: Permit, dim: str) -> float:
        """What permits taken before *permit*, and in flight then, may have spent at the
        server only after its request arrived: their cost in *dim*.

        An earlier permit whose request certainly reached the server before *permit* was
        taken (``admitted_by`` known and strictly earlier) is counted in the server's
        answer, so it is not uncertain. The last :data:`_SCAN` earlier permits are looked at one by
        one; anything older that was in flight (``outstanding_before``) counts in full.
        """
        total = permit.outstanding_before.get(dim, 0.0)
        if permit.seq is None or permit.acquired_at is None or total <= 0.0:
            return total
        covered = uncertain = 0.0
        for seq in range(permit.seq - 1, max(0, permit.seq - 1 - _SCAN), -1):
            other = self._recent.get(seq)
            if other is None:
                break  # forgotten: the rest counts in full
            if other.released_after is not None and other.released_after < permit.seq:
                continue  # released before this permit was taken: not in flight then
            amount = other.cost.get(dim, 0.0)
            covered += amount
            if other.admitted_by is None or other.admitted_by >= permit.acquired_at:
                uncertain += amount
            if covered >= total - 1e-9:
                break  # every earlier permit in flight then has been seen
        return uncertain + max(0.0, total - covered)

    def on_rate_limited(
        self, retry_after: float | None = None, *, dimension: str | None = None
    ) -> None:
        """A rate-limit 429 arrived: pause every waiter, restart the bucket empty.

        Args:
            retry_after: the server's hint in seconds (``None``: one second).
            dimension: the bucket that overflowed (``"rpm"``, ``"tpm"``...), if known;
                otherwise every per-minute bucket (never a per-day one: a day's quota
                would take a day to refill).
        """
        self._rate_limited += 1
        now = self._loop_time()
        already_cooling = now < self._paused_until
        if retry_after is None or retry_after <= 0:
            retry_after = 1.0
        self._paused_until = max(self._paused_until, now + retry_after)
        self._settle_until = max(self._settle_until, now + 2 * retry_after + 1.0)
        if dimension in self._buckets:
            targets = [dimension]
        else:
            targets = [d for d in self._buckets if d in _MINUTE_DIMENSIONS]
        for dim in targets:
            # Empty at the end of the pause: resume at the refill rate, not in a burst.
            bucket = self._buckets[dim]
            self._adjust(bucket, -(bucket.available + retry_after * bucket.rate))
        probing = self.limits.aimd and not self._buckets
        if probing and self._cap is not None and not already_cooling:
            # Probing for an unknown limit: halve, once per cooldown however many 429s
            # it brings. Once limits are known the buckets pace, not the cap.
            self._cap = max(1.0, self._cap / 2)
        logger.info(
            "limits.cooldown",
            limiter=self.name,
            seconds=round(retry_after, 3),
            dimension=dimension,
        )
        self._notify()

    # -- introspection -----------------------------------------------------------------

    def statistics(self) -> LimiterStatistics:
        """A frozen snapshot of counters and levels."""
        cooldown = 0.0
        try:
            cooldown = max(0.0, self._paused_until - self._loop_time())
        except RuntimeError:
            pass  # no running loop
        return LimiterStatistics(
            acquired=self._acquired,
            waiting=len(self._waiters),
            in_flight=self._in_flight,
            concurrency_cap=self._cap,
            waited_seconds=self._waited,
            max_wait_seconds=self._max_wait,
            rate_limited=self._rate_limited,
            cooldown_remaining=cooldown,
            header_corrections=self._corrections,
            learned=tuple(self._learned),
            available={d: b.available for d, b in self._buckets.items()},
            capacity={d: b.max_rate for d, b in self._buckets.items()},
            others={d: b.external * 60 for d, b in self._buckets.items() if b.external},
            limits={d: b.limit for d, b in self._buckets.items()},
        )


# -- registry ---------------------------------------------------------------------------


def key_fingerprint(api_key: str | None) -> str:
    """A short, irreversible name for an API key (never the key itself)."""
    if not api_key:
        return "anonymous"
    return "key-" + hashlib.sha256(api_key.encode()).hexdigest()[:12]


def quota_name(
    provider: str, model: str, *, api_key: str | None = None, endpoint: str = "chat"
) -> str:
    """The name of one quota: ``"openai/chat/key-1a2b3c4d5e6f/gpt-4o-mini"``.

    The same (provider, endpoint, key, model) always gives the same name, in every
    process, so it keys both the in-process registry and the shared Redis buckets; the
    key appears only as its :func:`key_fingerprint`.
    """
    return f"{provider}/{endpoint}/{key_fingerprint(api_key)}/{model}"


_REGISTRY: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, RateLimiter]] = (
    weakref.WeakKeyDictionary()
)


def get_limiter(
    provider: str,
    model: str,
    *,
    api_key: str | None = None,
    endpoint: str = "chat",
    limits: Limits | None = None,
    default_limits: Limits | None = None,
) -> RateLimiter:
    """The shared limiter of one quota in the running event loop, created on first use.

    Every caller naming the same (provider, endpoint, key, model) gets the same object.
    The first caller's *limits* (else *default_limits*) configure it; a later caller
    passing different explicit *limits* gets a ``ValueError`` rather than a silently
    different quota, while *default_limits* never conflict.
    """
    loop = asyncio.get_running_loop()
    per_loop = _REGISTRY.setdefault(loop, {})
    key = quota_name(provider, model, api_key=api_key, endpoint=endpoint)
    limiter = per_loop.get(key)
    if limiter is None:
        limiter = RateLimiter(limits or default_limits, name=f"{provider}/{model}")
        per_loop[key] = limiter
    elif limits is not None and limits != limiter.limits:
        raise ValueError(
            f"the quota {provider}/{endpoint}/{model} already has limits {limiter.limits!r}"
        )
    return limiter
