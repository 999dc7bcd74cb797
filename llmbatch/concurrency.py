"""How many requests may be in flight at once, when nobody said.

A fixed cap is wrong at every usage tier but one: 64 requests in flight at ~1 s each
is 64 requests a second, a third of a 10,000 RPM key, whatever its limits say. What the
limits allow is a *rate*; Little's law turns it into the number in flight that
sustains it: ``in flight = rate x latency``. :func:`in_flight_target` sizes the target
from the rate the quota's limits allow and the latency measured so far, with a margin
(latency varies, and requests waiting for their permit count too), between a floor and
a generous safety cap (:data:`SAFETY_CAP`, which also bounds the memory the items held
by the scheduler take). :class:`InFlight` is the gate that holds requests to it, and
re-sizes it as the latency and the limits (learned from the server's headers) change.

An explicit ``max_concurrency`` is a hard cap and is used as is.
"""

from __future__ import annotations

import asyncio
import collections
import math
from dataclasses import dataclass

from llmbatch._log import get_logger

__all__ = ["SAFETY_CAP", "InFlight", "InFlightTarget", "in_flight_target"]

logger = get_logger("llmbatch.concurrency")

#: the most requests in flight when nothing else bounds them (and the most items the
#: scheduler holds at once): thousands of requests, a few MB of prompts
SAFETY_CAP = 2048
#: the least target: small rates still get some parallelism (a slow model, a retry)
FLOOR = 16
#: in flight = rate x latency x MARGIN
MARGIN = 2.0
#: the latency assumed before any answer is measured
START_LATENCY = 2.0


@dataclass(frozen=True, slots=True)
class InFlightTarget:
    """A target and why.

    Attributes:
        limit: requests in flight at most.
        rate: requests per second the limits allow (``None``: no rate limit known).
        latency: the seconds per request it was sized for.
        reason: one line for logs and the live view.
    """

    limit: int
    rate: float | None
    latency: float
    reason: str


def in_flight_target(
    rate: float | None,
    latency: float,
    *,
    burst: float = 0.0,
    cap: int | None = None,
    margin: float = MARGIN,
    floor: int = FLOOR,
    ceiling: int = SAFETY_CAP,
) -> InFlightTarget:
    """The number of requests to keep in flight: ``rate x latency x margin`` (Little's
    law), plus the *burst* the buckets allow at once (so that a full bucket can be
    spent at once), within ``[floor, ceiling]``; an explicit *cap* wins.

    Args:
        rate: requests per second the limits allow (``None``: unknown or unlimited).
        latency: seconds per request (measured, or :data:`START_LATENCY`).
        burst: requests the buckets hold at once.
        cap: an explicit ``max_concurrency`` (a hard cap).
        margin: headroom over Little's law.
        floor: the least target.
        ceiling: the safety cap.
    """
    if cap is not None:
        return InFlightTarget(cap, rate, latency, f"max_concurrency={cap} (given)")
    if rate is None or not math.isfinite(rate) or rate <= 0:
        return InFlightTarget(
            ceiling, None, latency, f"no rate limit known: the safety cap ({ceiling})"
        )
    wanted = math.ceil(rate * latency * margin + burst)
    limit = min(ceiling, max(floor, wanted))
    reason = f"{rate:.1f} req/s x {latency:.2f} s latency x {margin:g}"
    if burst >= 1:
        reason += f" + a burst of {burst:.0f}"
    if limit == ceiling and wanted > ceiling:
        reason += f" = {wanted}, held to the safety cap"
    elif limit == floor and wanted < floor:
        reason += f" = {wanted}, raised to the floor"
    return InFlightTarget(limit, rate, latency, reason)


class InFlight:
    """An adaptive gate: at most :attr:`target` requests in flight.

    ``async with gate:`` around a request; :meth:`observe` each answer's latency;
    :meth:`resize` with the rate the limits allow whenever it may have changed.
    Latency is the median of the last answers (robust to a few slow ones), so the
    target grows and shrinks with it.

    Args:
        cap: an explicit ``max_concurrency`` (fixed; nothing adapts).
        name: for the log.
    """

    WINDOW = 256

    def __init__(self, cap: int | None = None, *, name: str = "") -> None:
        self.cap = cap
        self.name = name
        self._latencies: collections.deque[float] = collections.deque(maxlen=self.WINDOW)
        self._since_sized = 0
        self._rate: float | None = None
        #: whether :meth:`resize` was called once (before: the safety cap)
        self.sized = False
        self.target = in_flight_target(None, START_LATENCY, cap=cap)
        self.in_flight = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def __repr__(self) -> str:
        return f"<InFlight {self.in_flight}/{self.target.limit} waiters={len(self._waiters)}>"

    @property
    def latency(self) -> float:
        """The latency the target is sized for: the median of the recent answers."""
        if not self._latencies:
            return START_LATENCY
        ordered = sorted(self._latencies)
        return ordered[len(ordered) // 2]

    def observe(self, seconds: float) -> None:
        """An answer took *seconds*."""
        self._latencies.append(seconds)
        self._since_sized += 1

    def due(self) -> bool:
        """Whether enough was learned since the last sizing to size again (cheap)."""
        return self._since_sized >= 16 or (self._since_sized > 0 and len(self._latencies) < 16)

    def resize(self, rate: float | None, burst: float = 0.0) -> None:
        """Size the target for *rate* requests per second (and *burst* at once) and the
        measured latency; logs a target that changed by more than a quarter."""
        self._since_sized = 0
        self._rate = rate
        self.sized = True
        if self.cap is not None:
            return
        target = in_flight_target(rate, self.latency, burst=burst)
        before = self.target.limit
        self.target = target
        if abs(target.limit - before) > before / 4:
            logger.info(
                "concurrency.target",
                name=self.name,
                in_flight_target=target.limit,
                reason=target.reason,
            )
        self._wake()

    async def __aenter__(self) -> None:
        if self.in_flight < self.target.limit and not self._waiters:
            self.in_flight += 1
            return
        turn = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        try:
            await turn
        except BaseException:
            if turn.done() and not turn.cancelled():
                self._release()  # handed a slot as it was cancelled: pass it on
            elif turn in self._waiters:
                self._waiters.remove(turn)
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_flight < self.target.limit:
            turn = self._waiters.popleft()
            if not turn.done():
                self.in_flight += 1
                turn.set_result(None)
