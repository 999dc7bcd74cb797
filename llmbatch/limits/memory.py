"""The in-process limiter: one quota enforced in this event loop, and the registry that
shares it.

A :class:`RateLimiter` enforces one quota (one provider, model and API key) with

* **token buckets** (RPM, TPM, Anthropic's input/output TPM, optional per-day) on the
  event loop's clock (``loop.time()``);
* a **concurrency gate** (``max_concurrency``), with AIMD when no rate limit is known;
* one :meth:`RateLimiter.acquire` that takes every dimension at once, first come first
  served, so a big request is never starved by small ones and no bucket is held while
  another one refills. A waiter that is cancelled takes nothing;
* **settling**: a permit is settled with the actual usage; the difference is refunded
  or charged where the provider's rule allows (``Limits.refund_unused``);
* **header feedback**: :meth:`RateLimiter.observe` reads ``x-ratelimit-*`` (OpenAI, Go
  durations) and ``anthropic-ratelimit-*`` (RFC 3339) headers. When the server has
  less left than we believe (another process spends the same key) the local bucket is
  drained down to it; ``Limits.auto()`` learns the limits themselves from them;
* a **cooldown** on a rate-limit 429: every worker sharing the quota pauses until the
  retry-after, and the bucket that overflowed restarts empty, so traffic resumes at the
  refill rate instead of in a burst.

A request that can never fit (more tokens than a bucket holds) raises
:class:`~llmbatch.errors.RequestTooLarge` at once instead of waiting forever.

:func:`get_limiter` returns the process-wide limiter of a quota, so every node, client
and flow in the event loop that talks to the same (provider, endpoint, key, model)
shares it.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
import weakref
from collections.abc import Callable, Mapping

from llmbatch._log import get_logger
from llmbatch.errors import RequestTooLarge
from llmbatch.limits._bucket import EXTERNAL_CEILING, Bucket
from llmbatch.limits._config import (
    AIMD_CEILING,
    AIMD_START,
    DIMENSIONS,
    MINUTE_DIMENSIONS,
    Limits,
)
from llmbatch.limits._contract import Limiter, LimiterStatistics, Permit
from llmbatch.limits._headers import RateLimitHeaders, correction
from llmbatch.limits._permit import BucketPermit, plausible_limit, send_lag

__all__ = ["RateLimiter", "get_limiter", "key_fingerprint", "quota_name"]

logger = get_logger("llmbatch.limits")

#: permits remembered by take counter for header corrections, and how many of them one
#: correction looks back over (older ones in flight count as uncertain in full)
_RECENT = 4096
_SCAN = 1024
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

    def read(self, at: float, server_left: float, taken: float, bucket: Bucket) -> float:
        """Add a reading and return the estimate (units per second)."""
        if server_left > bucket.capacity / 2:
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
        self.rate = min(max(0.0, others / span), EXTERNAL_CEILING * bucket.nominal_rate)
        return self.rate


class RateLimiter(Limiter):
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
        self._buckets: dict[str, Bucket] = {}
        self._adjusted: collections.defaultdict[str, float] = collections.defaultdict(float)
        self._outstanding: collections.defaultdict[str, float] = collections.defaultdict(float)
        self._taken: collections.defaultdict[str, float] = collections.defaultdict(float)
        self._refunded: collections.defaultdict[str, float] = collections.defaultdict(float)
        self._outstanding_units: collections.defaultdict[str, float] = collections.defaultdict(
            float
        )
        for dimension in DIMENSIONS:
            capacity = getattr(self.limits, dimension)
            if capacity is not None:
                self._add_bucket(dimension, capacity)
        self._cap: float | None = (
            float(self.limits.max_concurrency) if self.limits.max_concurrency else None
        )
        if self.limits.aimd and not self._buckets:
            # probe upward from a modest start
            self._cap = min(self._cap or float(AIMD_CEILING), AIMD_START)
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
        self._recent: dict[int, BucketPermit] = {}
        self._external: dict[str, _ExternalSpend] = {}
        # statistics
        self._acquired = 0
        self._waited = 0.0
        self._max_wait = 0.0
        self._rate_limited = 0
        self._corrections = 0

    def _adjust(self, bucket: Bucket, delta: float) -> None:
        """Make *delta* more (or, negative, less) available in *bucket*, and remember it."""
        before = bucket.available
        bucket.set_available(min(bucket.capacity, before + delta))
        self._adjusted[bucket.name] -= bucket.available - before

    def _reshape(self, bucket: Bucket, change: Callable[[], object]) -> object:
        """Apply *change* (a new limit or capacity) to *bucket*, and count what it made
        available as a correction: an answer to a permit taken before it must not lift
        the bucket again by the same amount."""
        before = bucket.available
        result = change()
        self._adjusted[bucket.name] -= bucket.available - before
        return result

    def _add_bucket(self, dimension: str, capacity: float) -> None:
        _, period = DIMENSIONS[dimension]
        effective = capacity * (1.0 - self.limits.headroom)
        fill = self.limits.start_fill(effective, period)
        self._buckets[dimension] = Bucket(dimension, effective, period, fill)

    def __repr__(self) -> str:
        levels = ", ".join(
            f"{name}={b.available:,.0f}/{b.capacity:,.0f}" for name, b in self._buckets.items()
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
        cost = {dim: units[unit] for dim, (unit, _) in DIMENSIONS.items() if dim in self._buckets}
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
            cushion = bucket.capacity * self.limits.reserve
            if amount + cushion > bucket.capacity:
                cushion = 0.0  # a request this big may use the whole bucket
            delay = max(delay, bucket.time_until(amount + cushion))
        return delay

    def _slot_free(self) -> bool:
        return self._cap is None or self._in_flight < int(self._cap)

    def _take(self, cost: dict[str, float], units: dict[str, float]) -> BucketPermit:
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
        permit = BucketPermit(
            self, cost, after, adjusted, outstanding, taken, units, self._loop_time()
        )
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
    ) -> BucketPermit:
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

    def _release(self, permit: BucketPermit) -> None:
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

    def _settle(self, permit: BucketPermit, actual: Mapping[str, float], refund: bool) -> None:
        for dim, reserved in permit.cost.items():
            unit, _ = DIMENSIONS[dim]
            if unit not in actual:
                continue
            difference = actual[unit] - reserved
            bucket = self._buckets.get(dim)
            if bucket is None:
                continue  # dropped since (the server does not enforce it): nothing to settle
            if difference > 0:
                bucket.take(difference)
            elif difference < 0 and refund:
                before = bucket.available
                bucket.give_back(-difference)
                self._refunded[dim] += bucket.available - before
        if self.limits.aimd and self._cap is not None and not self._buckets:
            ceiling = float(self.limits.max_concurrency or AIMD_CEILING)
            self._cap = min(ceiling, self._cap + 1.0 / self._cap)
        self._notify()

    # -- feedback ----------------------------------------------------------------------

    async def observe(
        self, headers: Mapping[str, str] | RateLimitHeaders, permit: Permit | None = None
    ) -> None:
        """Correct the buckets from a response's rate-limit headers (see
        :func:`~llmbatch.limits._headers.correction` for the rule).

        The server's ``remaining`` right after admitting *permit*'s request is compared
        with what this limiter had left right after taking *permit*. Less on the server
        (someone else spends the same quota, or it counts tokens differently) drains the
        bucket; more (a conservative start, an over-estimated charge) lifts it, but only
        by what is certain: permits taken earlier and still in flight may not have
        reached the server yet, so their cost is not counted as free; likewise a drain
        ignores what permits taken later may already have spent there. Each difference
        is corrected once, however many responses report it. With ``Limits.learn`` a limit
        the server reports is adopted or updated.

        Raises:
            TypeError: *permit* was not issued by a bucket limiter.
        """
        if permit is not None and not isinstance(permit, BucketPermit):
            raise TypeError(f"{permit!r} is not a permit of {self!r}")
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
        # After a 429, trust the cooldown over headers sent before it: no lift.
        settling = self._loop_time() < self._settle_until
        for dim, server_left in info.remaining.items():
            bucket = self._buckets.get(dim)
            if bucket is None:
                continue
            if self.limits.learn_burst:
                self._learn_burst(bucket, dim, server_left, permit)
            first = dim not in self._synced
            self._synced.add(dim)
            if permit is not None and dim in permit.available_after:
                # What the server has left right after admitting this request, against
                # what we believed right after taking its permit, net of the corrections
                # applied since (see correction()).
                believed = permit.available_after[dim]
                corrected = self._adjusted[dim] - permit.adjusted_at[dim]
                uncertain = taken = 0.0
                if server_left - believed + corrected > 0:
                    # A lift (worked out only then: the look-back costs a scan). Earlier
                    # permits still in flight may reach the server after this one: its
                    # count may not include them yet. The server refilled between our
                    # acquire and its admission, as our bucket did since: that refill
                    # must not count twice. Refunds credited here since the permit may
                    # have reached the server before its request did: they are in its
                    # count and in our bucket.
                    refill = bucket.nominal_rate * lag
                    refunds = self._refunded[dim] - permit.refunded_at.get(dim, 0.0)
                    uncertain = self._uncertain_before(permit, dim) + refill + refunds
                else:
                    # Later permits may have reached the server before this one: its
                    # count may include them already.
                    taken = self._taken[dim] - permit.taken_at.get(dim, self._taken[dim])
                delta = correction(
                    server_left,
                    believed,
                    corrected_since=corrected,
                    uncertain=uncertain,
                    taken_since=taken,
                    capacity=bucket.capacity,
                    reserve=self.limits.reserve,
                    first=first,
                    settling=settling,
                )
            else:
                # No permit to compare with (or the bucket was learned after it was
                # taken): compare with now, counting every request in flight as not yet
                # seen by the server when lifting.
                unit = DIMENSIONS[dim][0]
                others = self._outstanding_units[unit]
                if permit is not None and not permit.released:
                    others -= permit.units.get(unit, 0.0)  # its own request was counted
                delta = correction(
                    server_left,
                    bucket.available,
                    uncertain=others,
                    capacity=bucket.capacity,
                    reserve=self.limits.reserve,
                    first=first,
                    settling=settling,
                    measured=False,
                )
            if delta is not None:
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
        for dim in [d for d in self._buckets if d in MINUTE_DIMENSIONS]:
            if dim not in info.limits and dim not in info.remaining:
                del self._buckets[dim]
                logger.info(
                    "limits.dropped",
                    limiter=self.name,
                    dimension=dim,
                    detail="the server reports its limits but not this one: not paced",
                )

    def _learn_burst(
        self, bucket: Bucket, dim: str, server_left: float, permit: BucketPermit | None
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
        unit = DIMENSIONS[dim][0]
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
                holds=round(bucket.capacity),
                limit=round(bucket.limit),
                detail="the server's bucket holds less than a minute of the limit: "
                "bursts are kept within it",
            )

    def _estimate_external(self, bucket: Bucket, permit: BucketPermit, server_left: float) -> None:
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

    def _uncertain_before(self, permit: BucketPermit, dim: str) -> float:
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

    async def on_rate_limited(
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
            targets = [d for d in self._buckets if d in MINUTE_DIMENSIONS]
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
            capacity={d: b.capacity for d, b in self._buckets.items()},
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
