"""A fake clock that makes time-based code run instantly and deterministically.

`FakeClock` is one object for the two ways llmbatch code reads time:

* code that takes an injected ``clock`` / ``sleep`` pair (the retry layer, the
  simulator's buckets) gets ``clock.time`` and ``clock.sleep``;
* code that reads ``loop.time()`` and schedules with ``loop.call_later`` (aiolimiter,
  ``asyncio.sleep``, ``asyncio.wait_for``) runs inside ``clock.patch_loop()``, which
  makes the running event loop use virtual time.

Inside ``patch_loop()`` the loop never blocks waiting for a timer: whenever every task
is asleep, virtual time jumps straight to the next timer, in the spirit of trio's
``MockClock(autojump_threshold=0)``. A test that awaits ``asyncio.sleep(3600)`` finishes
in microseconds and sees ``clock.time()`` advanced by exactly one hour.

Real I/O still works: the loop handles whatever sockets are ready before it lets virtual
time jump, and blocks for I/O only when no timer is pending. A client and a server in the
same loop (llmbatch's simulator over 127.0.0.1, given ``clock=fake.time``) therefore run
a whole rate-limited exchange on virtual time: time passes only when every task waits
for a timer, never while bytes are in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import selectors
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["FakeClock"]


class FakeClock:
    """Virtual monotonic time for tests.

    Args:
        start: the initial reading of ``time()``.
    """

    __slots__ = ("_now", "sleeps")

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        #: every duration passed to :meth:`sleep`, in call order
        self.sleeps: list[float] = []

    def __repr__(self) -> str:
        return f"<FakeClock now={self._now:.6f} sleeps={len(self.sleeps)}>"

    def time(self) -> float:
        """The current virtual time in seconds."""
        return self._now

    __call__ = time

    def advance(self, seconds: float) -> None:
        """Move virtual time forward by *seconds* (never backward)."""
        if seconds < 0:
            raise ValueError(f"cannot move a clock backward (advance({seconds!r}))")
        self._now += seconds

    async def sleep(self, seconds: float) -> None:
        """An ``asyncio.sleep`` replacement for code that takes ``sleep=``.

        Records the duration, advances virtual time by it and yields to the loop once.
        """
        seconds = max(0.0, float(seconds))
        self.sleeps.append(seconds)
        self._now += seconds
        await asyncio.sleep(0)

    @contextlib.contextmanager
    def patch_loop(self, loop: asyncio.AbstractEventLoop | None = None) -> Iterator[FakeClock]:
        """Make *loop* (default: the running loop) run on this clock's virtual time.

        Only selector-based loops (the default on Linux and macOS) are supported.
        """
        loop = loop or asyncio.get_running_loop()
        selector = getattr(loop, "_selector", None)
        if not isinstance(selector, selectors.BaseSelector):
            raise TypeError(f"FakeClock.patch_loop needs a selector event loop, not {loop!r}")
        real_select: Callable[..., Any] = selector.select

        def select(timeout: float | None = None) -> Any:
            if timeout is None or timeout <= 0:
                return real_select(timeout)
            ready = real_select(0)
            if ready:
                return ready  # I/O first: time does not pass while there is work
            # Every task is idle until the next timer: jump to it.
            self._now += timeout
            return real_select(0)

        loop.time = self.time  # type: ignore[method-assign]
        selector.select = select  # type: ignore[method-assign]
        try:
            yield self
        finally:
            del loop.time
            del selector.select
