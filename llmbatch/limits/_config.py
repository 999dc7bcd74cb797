"""The limits of one quota (:class:`Limits`), and what they mean in requests.

The dimension table here is the one place that says which unit each limit counts and
over what period: every limiter (in-process, Redis) and the pacing helpers read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

MINUTE = 60.0
DAY = 86_400.0

#: dimension -> (the unit it charges, its period in seconds)
DIMENSIONS: dict[str, tuple[str, float]] = {
    "rpm": ("requests", MINUTE),
    "tpm": ("tokens", MINUTE),
    "input_tpm": ("input_tokens", MINUTE),
    "output_tpm": ("output_tokens", MINUTE),
    "rpd": ("requests", DAY),
    "tpd": ("tokens", DAY),
}

#: the units a request is counted in (every dimension charges one of them)
UNITS = ("requests", "tokens", "input_tokens", "output_tokens")

#: the dimensions a 429 of unknown kind is taken to concern: the per-minute ones (a
#: per-day quota is refused with its own message, and emptying it would stall a day)
MINUTE_DIMENSIONS = ("rpm", "tpm", "input_tpm", "output_tpm")

#: the concurrency cap AIMD probes upward from while no rate limit is known, and the most
#: it grows to unless ``max_concurrency`` says otherwise (the Redis scripts use the same)
AIMD_START = 8
AIMD_CEILING = 64


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
        for name in DIMENSIONS:
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


def refunds(limits: Limits, provider_rule: bool | None) -> bool:
    """Whether the unused part of a reservation comes back on settling:
    ``Limits.refund_unused`` if set, else the provider's rule (``None``: no)."""
    if limits.refund_unused is not None:
        return limits.refund_unused
    return bool(provider_rule)


def request_burst(capacity: Mapping[str, float], mean_cost: Mapping[str, float]) -> float:
    """Requests the per-minute buckets hold at once (:attr:`LimiterStatistics.capacity`)
    for requests costing *mean_cost* per unit; 0 when none is known."""
    bursts: list[float] = []
    for dim, held in capacity.items():
        unit, period = DIMENSIONS[dim]
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
        unit, period = DIMENSIONS[dim]
        if period > MINUTE:
            continue
        cost = 1.0 if unit == "requests" else mean_cost.get(unit, 0.0)
        if cost > 0:
            rates.append(limit / period / cost)
    return min(rates) if rates else None
